"""``qlora-kernels export``: a model folder with the adapter folder PEFT (and so
``qlora-kernels finetune``) writes, to an ONNX file that matches the torch model in ORT."""
import json

import pytest
import torch

from qlora_kernels import cli
from qlora_kernels.integrations.onnx import contrib, verify

from .finetune_helpers import build_tiny_model
from .onnx_helpers import REL_TOL, with_lora


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    import qlora_kernels as qk

    root = tmp_path_factory.mktemp("export-cli")
    model_dir = build_tiny_model(root / "model")
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    qk.quantize_model(m, skip=("lm_head",))
    pm = with_lora(m, ["q_proj", "v_proj", "down_proj"])
    pm.save_pretrained(root / "run")
    (root / "run" / "metrics.json").write_text(json.dumps({"config": {"method": "qlora"}}))
    return model_dir, root / "run", pm


def _run(args, capsys):
    rc = cli.main(["export", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_export_model_and_adapter(folders, tmp_path, capsys):
    model_dir, run, pm = folders
    out = tmp_path / "tiny.onnx"
    # no --model: the base is the folder the adapter names (PEFT's base_model_name_or_path), as
    # PEFT's AutoPeftModel loads it, not our default model
    rc, stdout, err = _run(["--onnx", str(out), "--adapter", str(run)], capsys)
    assert rc == 0, err
    assert f"base model: {model_dir.resolve()} (the adapter's base_model_name_or_path" in stdout
    assert f"wrote {out} (bnb4;" in stdout and "ONNX Runtime vs torch: logits max abs error" in stdout
    ids = torch.randint(1, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = verify.torch_logits(pm, ids, torch.ones_like(ids))
    got = verify.ort_logits(contrib.session(str(out)), ids, torch.ones_like(ids))
    assert verify.errors(ref, got)["max_rel"] <= REL_TOL

    rc, _, err = _run(["--onnx", str(out), "--model", str(model_dir)], capsys)
    assert rc == 2 and "exists; pass overwrite=True (--overwrite)" in err

    rc, stdout, err = _run(["--onnx", str(out), "--model", str(model_dir), "--adapter", str(run), "--overwrite",
                            "--weight-format", "nbits", "--merge-adapters", "--no-verify"], capsys)
    assert rc == 0, err
    assert "re-quantization error" in stdout and "ONNX Runtime vs torch" not in stdout
    import onnx

    proto = onnx.load(str(out))
    assert sum(n.op_type == "MatMulNBits" for n in proto.graph.node) == 14
    assert not any(".lora_" in i.name for i in proto.graph.initializer)
    assert {p.key: p.value for p in proto.metadata_props}["merge_adapters"] == "True"


def test_bad_input(folders, tmp_path, capsys):
    model_dir, _, _ = folders
    rc, _, err = _run(["--onnx", str(tmp_path / "no" / "x.onnx"), "--model", str(model_dir)], capsys)
    assert rc == 2 and "does not exist" in err
    rc, _, err = _run(["--onnx", str(tmp_path / "x.onnx"), "--model", str(model_dir), "--adapter",
                       str(tmp_path)], capsys)
    assert rc == 2 and "no adapter_config.json" in err
    rc, _, err = _run(["--onnx", str(tmp_path / "x.onnx"), "--model", str(tmp_path / "nothing")], capsys)
    assert rc == 2 and "no such folder" in err
    rc, _, err = _run(["--onnx", str(tmp_path / "x.onnx"), "--model", str(model_dir), "--merge-adapters"], capsys)
    assert rc == 2 and "--merge-adapters merges the --adapter given, and none was" in err
    with pytest.raises(SystemExit):
        cli.main(["export", "--onnx", str(tmp_path / "x.onnx"), "--weight-format", "int8"])
    assert not (tmp_path / "x.onnx").exists()
