"""``export_genai()``: a model folder that ``onnxruntime_genai.Model(out_dir)`` loads as it is —
``model.onnx`` (the KV-cache decoder, graph.py), ``genai_config.json``, the tokenizer files,
and ``adapters/<name>.onnx_adapter`` for each switchable adapter. Written into a temporary
folder beside ``out_dir`` and renamed into place: a failure leaves nothing half-written."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import layers, ortops
from ..errors import FORMATS, ExportError
from . import adapters as adapter_files
from . import arch as arch_mod
from . import config, graph, linears

MODEL_FILE = "model.onnx"
_EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, with room for the graph


@dataclass
class GenaiExportResult:
    out_dir: str
    weight_format: str
    family: str
    layers: int                  # 4-bit base weights written in weight_format
    dense: int                   # dense layers written as they were (the head among them)
    merged: int                  # adapters merged into their base
    adapters: dict = field(default_factory=dict)  # name -> adapter file (relative to out_dir)
    weight_error: float = 0.0    # max |W - W_written| / max |W| over re-encoded weights
    ort_error: dict | None = None  # ONNX Runtime vs torch on a short prompt (None with verify_output=False)
    tokenizer_files: list = field(default_factory=list)
    node_counts: dict = field(default_factory=dict)
    seconds: float = 0.0
    custom_ops_library: str | None = None  # our operator library's file in out_dir, if the graph uses it

    def summary(self) -> str:
        lines = [f"wrote {self.out_dir} for ONNX Runtime GenAI ({self.family}, {self.weight_format}; "
                 f"{self.layers} 4-bit layers, {self.dense} dense, {self.merged} adapters merged, "
                 f"{len(self.adapters)} switchable: {', '.join(self.adapters) or '-'}) in {self.seconds:.1f} s"]
        if self.custom_ops_library:
            ours = sorted(op for op in (ortops.OP, ortops.OP_INT8, ortops.OP_DENSE) if op in self.node_counts)
            lines.append(f"our operators {', '.join(ours)} (the exact bytes, our kernels) from the folder's "
                         f"{self.custom_ops_library}")
        if self.weight_error:
            lines.append(f"re-quantization error: weights max rel {self.weight_error:.3g}")
        if not self.tokenizer_files:
            lines.append("no tokenizer written (pass tokenizer=...): onnxruntime_genai.Tokenizer needs one")
        if self.ort_error is not None:
            lines.append(f"ONNX Runtime vs torch (no cache, one prompt): logits max abs error "
                         f"{self.ort_error['max_abs']:.3g} (rel {self.ort_error['max_rel']:.3g})")
        return "\n".join(lines)


def check_out_dir(out_dir, overwrite: bool, inputs=()) -> Path:
    """``out_dir`` as check_target takes it; with ``overwrite`` on an existing folder, also
    refused when replacing it would delete the folder the process is in (for "." the rename
    fails outright, after the whole export) or one of ``inputs`` (the model's, tokenizer's or
    an adapter's folder, read by this very export)."""
    from ..exporter import check_target

    target = check_target(out_dir, overwrite, folder=True)
    if target.exists():
        resolved = target.resolve()
        cwd = Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents:
            raise ExportError(f"out_dir {out_dir} is the current folder or holds it: replacing it would delete the "
                              "folder you are in; write to another folder")
        for src in inputs:
            p = Path(src).resolve()
            if p == resolved or resolved in p.parents:
                raise ExportError(f"out_dir {out_dir} holds {src}, an input of this export (model, tokenizer or "
                                  "adapter folder): replacing it would delete it; write to another folder")
    return target


def _input_folders(model, tokenizer, adapters) -> list:
    """The folders an export reads from: the model's own (its tokenizer is copied from it),
    a tokenizer folder, adapter folders."""
    out = []
    name = getattr(getattr(arch_mod.core_model(model), "config", None), "_name_or_path", "") or ""
    if name and Path(name).is_dir():
        out.append(name)
    if isinstance(tokenizer, (str, os.PathLike)):
        out.append(tokenizer)
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    srcs = adapters.values() if isinstance(adapters, Mapping) else adapters if isinstance(adapters, (list, tuple)) \
        else ()
    out += [a for a in srcs if isinstance(a, (str, os.PathLike))]
    return out


def _given_adapters(adapters, arch) -> dict:
    """name -> params from ``adapters``: a mapping name -> PEFT folder (or params dict as
    from_folder gives), or a list of folders (named after the folder)."""
    if adapters is None:
        return {}
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    if isinstance(adapters, Mapping):
        items = list(adapters.items())
    elif isinstance(adapters, (list, tuple)):
        items = [(Path(a).name, a) for a in adapters]
    else:
        raise ExportError(f"adapters must be a list of PEFT adapter folders or a dict name -> folder, "
                          f"got {type(adapters).__name__}")
    out = {}
    for name, src in items:
        if name in out:
            raise ExportError(f"adapters: the name {name!r} is given twice")
        if isinstance(src, (str, os.PathLike)):
            out[name] = (adapter_files.from_folder(src, arch), str(src))
        elif isinstance(src, Mapping):
            out[name] = (dict(src), "tensors")
        else:
            raise ExportError(f"adapters[{name!r}] must be a PEFT adapter folder, got {type(src).__name__}")
    return out


def _save(proto, path: Path) -> None:
    import onnx

    # counted from the initializers: protobuf refuses to even size a message past 2 GB
    external = sum(len(t.raw_data) for t in proto.graph.initializer) > _EXTERNAL_DATA_BYTES
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def _refuse_other_adapters(lm, arch) -> None:
    """LoRA anywhere but the decoder's projections (an adapted embedding, say) has no place in
    this graph: refused, never silently dropped (docs/onnx.md)."""
    from ....nn import LoraLinear

    try:
        from peft.tuners.lora.layer import LoraLayer
        types: tuple = (LoraLayer, LoraLinear)
    except ImportError:
        types = (LoraLinear,)
    projections = {p for i in range(arch.layers) for p in arch.projections(i).values()}
    for name, mod in lm.named_modules():
        if isinstance(mod, types) and name not in projections:
            raise ExportError(f"{name}: LoRA outside the decoder's projections is not exported; merge it into the "
                              f"model first (PEFT's merge_and_unload) or leave that module out of the adapter")


def _verify(folder: Path, model, arch, active: dict | None, custom_ops: bool) -> dict:
    """The decoder, with an empty cache, on a short prompt against the torch model."""
    import numpy as np

    from .. import contrib, verify

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, arch.vocab, (1, 7), generator=g)
    mask = torch.ones_like(ids)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    for i in range(arch.layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, arch.kv_heads, 0, arch.head_size), dtype=np.float32)
    for k, v in (active or {}).items():
        feeds[k] = v.numpy()
    sess = contrib.session(str(folder / MODEL_FILE), quiet=True,
                           custom_ops=str(folder / ortops.FOLDER_FILE) if custom_ops else None)
    got = torch.from_numpy(sess.run(["logits"], feeds)[0])
    return verify.errors(verify.torch_logits(model, ids, mask), got)


def _active_adapter(model) -> str | None:
    """The PEFT model's one active adapter (transformers models have a method of the same
    name that needs a newer PEFT: only a PeftModel is asked)."""
    if not hasattr(model, "get_base_model"):
        return "default"  # our own LoraLinear layers name their adapter "default"
    names = getattr(model, "active_adapters", None)
    if isinstance(names, str):
        names = [names]
    return names[0] if names and len(names) == 1 else None


def export_genai(model: torch.nn.Module, out_dir, weight_format: str = "bnb4", adapters=None,
                 merge_adapters: bool = False, tokenizer=None, overwrite: bool = False, accuracy_level: int = 0,
                 quantize_head: bool | None = None, search: dict | None = None, verify_output: bool = True,
                 custom_ops: bool | None = None, log=print) -> GenaiExportResult:
    """Write ``model`` (a Llama-family or Phi-3 causal LM with our 4-bit layers, dense, or a
    PEFT model on either) as an ONNX Runtime GenAI model folder ``out_dir`` (docs/onnx.md).

    weight_format: "bnb4" (MatMulBnb4 on our very bytes), "nbits" (MatMulNBits int4,
    re-quantized; ``accuracy_level`` as ONNX Runtime defines it: 0 fp32 compute, 4 int8) or
    "fp32". Adapters: the PEFT model's own adapters become switchable adapter files unless
    ``merge_adapters`` (then its active adapters are merged into the base); ``adapters`` adds
    more, from PEFT adapter folders (a list, named after the folder, or a dict name -> folder).
    ``tokenizer``: a transformers tokenizer or a folder; default: the model's own folder.
    ``quantize_head``: write a dense output head as MatMulNBits too (default: with "nbits",
    as ONNX Runtime GenAI's builder does for int4); the re-quantization error is reported.
    ``search``: overrides of genai_config.json's search options (max_length, do_sample, ...).
    ``custom_ops``: with "bnb4", write the 4-bit layers as our ``qlora_kernels.MatMul4bit``
    (the same bytes, computed by our kernels: ONNX Runtime's MatMulBnb4 dequantizes its whole
    weight per call; ``accuracy_level=4``: MatMul4bitInt8, int8 activations as our
    ``compute="int8"``) and copy our operator library into the folder; None (default): when
    this build has the library; False: ONNX Runtime's own MatMulBnb4, which any ONNX Runtime runs."""
    t0 = time.perf_counter()
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if weight_format not in FORMATS:
        raise ExportError(f"weight_format must be one of {FORMATS}, got {weight_format!r}")
    if accuracy_level not in (0, 1, 2, 3, 4) or isinstance(accuracy_level, bool):
        raise ExportError(f"accuracy_level must be 0..4 (ONNX Runtime's MatMulNBits levels), got {accuracy_level!r}")
    if quantize_head is not None and not isinstance(quantize_head, bool):
        raise ExportError(f"quantize_head must be True, False or None, got {quantize_head!r}")
    use_ops = ortops.resolve(custom_ops, weight_format)
    # accuracy_level as ONNX Runtime defines it for MatMulNBits; our operators have two of
    # its levels: 0 (fp32, MatMul4bit) and 4 (int8 activations, MatMul4bitInt8)
    if use_ops and accuracy_level not in (0, 4):
        raise ExportError(f"accuracy_level with our operators (bnb4) is 0 (fp32) or 4 (int8), got {accuracy_level}")
    if accuracy_level and weight_format != "nbits" and not quantize_head and not use_ops:
        raise ExportError("accuracy_level applies to MatMulNBits (weight_format='nbits' or quantize_head=True) "
                          "and to our operators (weight_format='bnb4' with custom_ops)")
    target = check_out_dir(out_dir, overwrite, _input_folders(model, tokenizer, adapters))
    arch = arch_mod.read(model)
    if arch.head_size % 8:
        raise ExportError(f"head size {arch.head_size}: ONNX Runtime's GroupQueryAttention on CPU runs head sizes that "
                          f"are multiples of 8")
    _refuse_other_adapters(arch_mod.core_model(model), arch)
    tables = arch_mod.rotary_tables(model, arch)

    files = {} if merge_adapters else {n: (p, "the model") for n, p in adapter_files.from_model(model, arch).items()}
    for name, value in _given_adapters(adapters, arch).items():
        if name in files:
            raise ExportError(f"adapters: {name!r} is both an adapter of the model and a given adapter")
        files[name] = value

    report = layers.SwapReport()
    lm = arch_mod.core_model(model)
    shapes = {}
    for i in range(arch.layers):
        for path in arch.projections(i).values():
            base = lm.get_submodule(path)
            base = base.get_base_layer() if hasattr(base, "get_base_layer") else getattr(base, "base_layer", base)
            shapes[path] = (int(base.in_features), int(base.out_features))
    checked = {name: adapter_files.check(name, params, shapes, src) for name, (params, src) in files.items()}
    switchable = {k.rsplit(".lora_", 1)[0] for params in checked.values() for k in params}

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            lin = linears.plan(model, arch, weight_format, merge_adapters, switchable, accuracy_level, report)
            head = linears.head(model, arch, weight_format, accuracy_level,
                                weight_format == "nbits" if quantize_head is None else quantize_head, report)
            norms = {"norm": lm.model.norm.weight.detach().float()}
            for i, layer in enumerate(lm.model.layers):
                norms[f"layers.{i}.input_layernorm"] = layer.input_layernorm.weight.detach().float()
                norms[f"layers.{i}.post_attention_layernorm"] = layer.post_attention_layernorm.weight.detach().float()
            embed = lm.get_input_embeddings().weight.detach().float()
            b = graph.build(arch, lin, tables, embed, norms, head)
        from .... import __version__

        proto = b.model(f"qlora-kernels {__version__}",
                        {"weight_format": weight_format, "merge_adapters": merge_adapters,
                         "switchable_adapters": ",".join(sorted(checked))})
        if use_ops:
            ortops.use_library(proto, int8=accuracy_level == 4)
        layers.check_bnb4_block_sizes(proto)  # what is left of ONNX Runtime's MatMulBnb4
        counts: dict = {}
        for node in proto.graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1

        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent or "."))
        try:
            # mkdtemp makes the folder 0700, and the rename keeps that: give it the mode a new
            # folder gets (umask applied), so that other accounts can read the model
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            _save(proto, tmp / MODEL_FILE)
            del proto, b
            written = {}
            if checked:
                (tmp / "adapters").mkdir()
                for name, params in checked.items():
                    rel = f"adapters/{name}{adapter_files.ADAPTER_SUFFIX}"
                    adapter_files.write(params, tmp / rel)
                    written[name] = rel
            if use_ops:
                shutil.copyfile(ortops.require(), tmp / ortops.FOLDER_FILE)
            cfg = config.genai_config(arch, MODEL_FILE, search, ortops.FOLDER_FILE if use_ops else None)
            (tmp / "genai_config.json").write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")
            tok_files = config.write_tokenizer(config.tokenizer_source(model, tokenizer), tmp)
            ort_error = None
            if verify_output:
                active = _active_adapter(model)
                # only an adapter of the model itself is what torch runs: a given folder that
                # happens to share the name (e.g. "default" on a model without adapters) is not
                own = not merge_adapters and active in files and files[active][1] == "the model"
                ort_error = _verify(tmp, model, arch, checked[active] if own else None, use_ops)
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent or "."))
                os.replace(target, old / "x")
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        model.train(was_training)
    result = GenaiExportResult(str(target), weight_format, arch.family, report.layers, report.dense, report.merged,
                               written, report.weight_error, ort_error, tok_files, counts,
                               custom_ops_library=ortops.FOLDER_FILE if use_ops else None)
    result.seconds = time.perf_counter() - t0
    if log is not None:
        log(result.summary())
    return result
