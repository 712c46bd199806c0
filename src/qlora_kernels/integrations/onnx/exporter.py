"""``export()``: check the arguments, swap the layers (layers.py), trace with the dynamo
exporter (ops.py translates our ops), write the file atomically, verify in ONNX Runtime."""
from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import layers, ops, verify
from .errors import ExportError

DEFAULT_OPSET = 18
_EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, with room for the graph


@dataclass
class ExportResult:
    path: str
    weight_format: str
    merge_adapters: bool
    layers: int                      # 4-bit base weights written in weight_format
    dense: int                       # dense layers written as they were
    adapters: int                    # adapters kept as branches
    merged: int                      # adapters merged into their base
    weight_error: float              # max |W - W_written| / max |W| (0 when nothing was re-encoded)
    requant_error: dict | None       # torch logits, original vs with the written weights
    ort_error: dict | None           # ORT logits vs the original torch model (None with verify=False)
    node_counts: dict = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"wrote {self.path} ({self.weight_format}; {self.layers} 4-bit layers, {self.dense} dense, "
                 f"{self.adapters} adapters as branches, {self.merged} merged) in {self.seconds:.1f} s"]
        if self.weight_error:
            lines.append(f"re-quantization error: weights max rel {self.weight_error:.3g}; logits max abs "
                         f"{self.requant_error['max_abs']:.3g} (rel {self.requant_error['max_rel']:.3g})")
        if self.ort_error is not None:
            lines.append(f"ONNX Runtime vs torch: logits max abs error {self.ort_error['max_abs']:.3g} "
                         f"(rel {self.ort_error['max_rel']:.3g})")
        return "\n".join(lines)


def check_target(path, overwrite: bool, folder: bool = False) -> Path:
    """The file (``folder``: the folder) an export is about to write: refused before any
    work if it exists without ``overwrite``, is of the other kind, or its parent folder is
    missing or not writable. ``folder`` names the argument ``out_dir``, else ``path``."""
    arg = "out_dir" if folder else "path"
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ExportError(f"{arg} must be a {'folder' if folder else 'file'} path, got {path!r}")
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise ExportError(f"{arg} {p} exists and is not a folder")
    if not folder and p.is_dir():
        raise ExportError(f"{arg} {p} is a folder; give the .onnx file to write")
    if p.exists() and not overwrite:
        raise ExportError(f"{arg} {p} exists; pass overwrite=True (--overwrite) to replace it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"{arg} {p}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"{arg} {p}: folder {parent} is not writable")
    return p


def check_path(path, overwrite: bool) -> Path:
    return check_target(path, overwrite)


def _example(model, example_inputs) -> tuple[torch.Tensor, torch.Tensor]:
    if example_inputs is None:
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
        if vocab < 2:
            raise ExportError("example_inputs is required: the model has no config.vocab_size to draw tokens from")
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, vocab, (2, 8), generator=g)
        return ids, torch.ones_like(ids)
    if isinstance(example_inputs, torch.Tensor):
        ids, mask = example_inputs, None
    elif isinstance(example_inputs, (tuple, list)) and 1 <= len(example_inputs) <= 2:
        # torch.onnx.export's positional args: (input_ids,) or (input_ids, attention_mask)
        ids, mask = example_inputs[0], (example_inputs[1] if len(example_inputs) == 2 else None)
    elif isinstance(example_inputs, Mapping) and "input_ids" in example_inputs:  # a dict or a BatchEncoding
        ids, mask = example_inputs["input_ids"], example_inputs.get("attention_mask")
    else:
        raise ExportError("example_inputs must be an input_ids tensor, a tuple (input_ids[, attention_mask]) as "
                          "torch.onnx.export takes, or a dict with 'input_ids' (and optionally 'attention_mask'), "
                          f"got {type(example_inputs).__name__}" + (f" of {len(example_inputs)} items"
                                                                     if isinstance(example_inputs, (tuple, list))
                                                                     else ""))
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ExportError("example_inputs['input_ids'] must be an integer tensor [batch, sequence]")
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ExportError(f"example_inputs['input_ids'] is empty: shape {tuple(ids.shape)}")
    mask = torch.ones_like(ids) if mask is None else mask
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        raise ExportError("example_inputs['attention_mask'] must be a tensor shaped like input_ids")
    return ids.long(), mask.long()


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]


def _trace(wrapper: torch.nn.Module, ids, mask, opset: int):
    import warnings

    batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    try:
        import onnxscript  # noqa: F401  the dynamo exporter's graph builder
    except ImportError as e:
        raise ExportError("ONNX export needs onnxscript: pip install 'qlora-kernels[onnx]'") from e
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(wrapper, (ids, mask), dynamo=True, dynamic_shapes=dyn, opset_version=opset,
                                     input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                     custom_translation_table=ops.translation_table(), verbose=False,
                                     # onnxscript's optimizer took over half the time of a
                                     # 135M-model export (pattern rewrites over ~10k nodes);
                                     # ONNX Runtime folds constants and fuses at session load.
                                     optimize=False)
        except Exception as e:  # the exporter's errors are pages long: keep the cause, point at the model
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise ExportError(f"torch.onnx.export failed: {first}") from e


def _tidy_names(program) -> dict:
    """Initializers named after the model's own parameters (without the wrapper's prefix),
    so adapter tensors can be found and swapped by their PEFT names."""
    counts: dict = {}
    graph = program.model.graph
    for name, value in list(graph.initializers.items()):
        if name.startswith("model."):
            value.name = name[len("model."):]
    for node in graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _write(program, path: Path, meta: dict) -> None:
    """Save next to the target, then rename: a failure leaves no half-written file."""
    program.model.metadata_props.update({k: str(v) for k, v in meta.items()})
    nbytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    external = nbytes > _EXTERNAL_DATA_BYTES
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent or "."))
    try:
        tmp = tmpdir / path.name
        program.save(str(tmp), external_data=external)
        if external:
            data = path.with_name(path.name + ".data")
            program_data = tmpdir / (path.name + ".data")
            if not program_data.exists():
                raise ExportError(f"expected external data file {program_data} was not written")
            os.replace(program_data, data)
        os.replace(tmp, path)
    finally:
        for f in tmpdir.iterdir() if tmpdir.exists() else ():
            f.unlink()
        if tmpdir.exists():
            tmpdir.rmdir()


def export(model: torch.nn.Module, path, example_inputs=None, weight_format: str = "bnb4",
           merge_adapters: bool = False, opset: int | None = None, overwrite: bool = False,
           verify_output: bool = True, log=print) -> ExportResult:
    """Export ``model`` to the ONNX file ``path`` (see the module docstring and docs/onnx.md).

    weight_format: "bnb4" (MatMulBnb4, the exact 4-bit bytes), "nbits" (MatMulNBits int4,
    symmetric, block 64; the re-quantization error is reported) or "fp32" (dequantized).
    merge_adapters: merge LoRA/DoRA into the base weight (re-encoded in weight_format)
    instead of keeping them as swappable MatMul branches.
    verify_output: run the file in ONNX Runtime on example_inputs and report the error."""
    t0 = time.perf_counter()
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if weight_format not in layers.FORMATS:
        raise ExportError(f"weight_format must be one of {layers.FORMATS}, got {weight_format!r}")
    if opset is None:
        opset = DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or not 18 <= opset <= 23:
        raise ExportError(f"opset must be an int from 18 to 23 (the dynamo exporter's range), got {opset!r}")
    target = check_path(path, overwrite)
    ids, mask = _example(model, example_inputs)

    was_training = model.training
    model.eval()
    try:
        ref = verify.torch_logits(model, ids, mask)
        work = copy.deepcopy(model)
    finally:
        model.train(was_training)
    report = layers.swap(work, weight_format, merge_adapters)
    layers.check_bnb4_modules(work)
    work.eval()
    mine = verify.torch_logits(work, ids, mask)
    requant = verify.errors(ref, mine, mask)
    program = _trace(_Logits(work), ids, mask, opset)
    counts = _tidy_names(program)
    from ... import __version__

    _write(program, target, {"producer": f"qlora-kernels {__version__}", "weight_format": weight_format,
                             "merge_adapters": merge_adapters, "adapters_as_branches": report.adapters})
    result = ExportResult(str(target), weight_format, merge_adapters, report.layers, report.dense, report.adapters,
                          report.merged, report.weight_error, requant, None, counts)
    if verify_output:
        result.ort_error = verify.run(str(target), model.eval(), ids, mask)
        model.train(was_training)
    result.seconds = time.perf_counter() - t0
    if log is not None:
        log(result.summary())
    return result
