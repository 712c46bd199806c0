"""ONNX Runtime GenAI: the KV-cache decoder folder ``export_genai`` writes, run by
``onnxruntime_genai`` itself, against greedy generation in torch with our layers (HF
``generate``, which keeps its own KV cache). Tiny random Llama and Phi-3 here, in every
format; SmolLM2-135M-Instruct (NF4, real weights) without an adapter, with two switchable
adapters, and with a merged one; the exported MatMulBnb4 bytes; bad input."""
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime_genai as og  # the [onnx] extra: a missing install must fail here, not skip
import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.integrations.onnx import ExportError, export_genai
from qlora_kernels.integrations.onnx import layers as export_layers
from qlora_kernels.integrations.onnx import ortops
from qlora_kernels.nn import Linear4bit
from qlora_kernels.integrations.onnx.genai.generate import generate

NEW = 32          # greedy tokens compared (the issue: at least 32)
LOGITS_REL = 1e-3  # step logits, relative to the largest logit of the step


def tiny(family: str, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    # initializer_range 0.3: a random model with the default 0.02 repeats one token forever,
    # which would compare nothing
    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              initializer_range=0.3)
    torch.manual_seed(0)
    if family == "phi3":
        m = Phi3ForCausalLM(Phi3Config(**kw))
    else:
        m = LlamaForCausalLM(LlamaConfig(**kw, tie_word_embeddings=tie))
    return qk.quantize_model(m.eval(), skip=("lm_head",))


def og_greedy(folder, prompt: list, n: int = NEW, adapter: str | None = None):
    """(tokens, per-step logits) from onnxruntime_genai; min_length keeps EOS from ending it early."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    if adapter is not None:
        ads = og.Adapters(model)
        ads.load(str(Path(folder) / "adapters" / f"{adapter}.onnx_adapter"), adapter)
        gen.set_active_adapter(ads, adapter)
    gen.append_tokens(prompt)
    toks, logits = [], []
    while not gen.is_done():
        logits.append(np.array(gen.get_logits(), dtype=np.float32).reshape(-1).copy())
        gen.generate_next_token()
        toks.append(int(gen.get_next_tokens()[0]))
    return toks, logits


def torch_greedy(model, prompt: list, n: int = NEW):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), [lg[0].float().numpy() for lg in out.logits]


def assert_same_generation(got, want):
    (gt, gl), (wt, wl) = got, want
    assert len(gt) == len(wt) == NEW
    assert gt == wt
    for step, (a, b) in enumerate(zip(gl, wl)):
        ok = np.isfinite(a)  # GenAI masks EOS in place while min_length holds; torch's raw logits do not
        rel = float(np.abs(a[ok] - b[ok]).max() / np.abs(b[ok]).max())
        assert rel <= LOGITS_REL, (step, rel)


def nbits_reference(model):
    """The torch model computing what the nbits folder holds: every 4-bit layer re-quantized
    to MatMulNBits (layers.swap) and the dense head too (export_genai's nbits default)."""
    import copy

    ref = copy.deepcopy(model)
    export_layers.swap(ref, "nbits", False)
    head = ref.get_output_embeddings()
    ref.lm_head = export_layers.NBitsBase(head.weight.detach().float(), head.bias)
    return ref.eval()


def adapter_params(folder, rel) -> dict:
    """An adapter file's tensors, copied while the AdapterFormat that owns their memory is
    alive: ``read_adapter(f).get_parameters()`` on a temporary returns views into freed
    memory, which the next read reuses (two files then compare equal whatever they hold)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(Path(folder) / rel))
    return {k: v.numpy().copy() for k, v in fmt.get_parameters().items()}


PROMPT = [5, 17, 33, 9, 100, 7, 250, 3]


@pytest.mark.parametrize("family", ["llama", "phi3"])
@pytest.mark.parametrize("fmt", ["bnb4", "bnb4-ort", "nbits", "fp32"])
def test_tiny_models_generate_as_torch(tmp_path, family, fmt):
    """bnb4: our operator library's MatMul4bit (the default where the library is built);
    bnb4-ort: ONNX Runtime's own MatMulBnb4 on the same bytes (custom_ops=False)."""
    model = tiny(family)
    ops = {"bnb4": True, "bnb4-ort": False}.get(fmt)
    fmt = fmt.split("-")[0]
    res = export_genai(model, tmp_path / "m", weight_format=fmt, custom_ops=ops, log=None)
    assert (res.node_counts.get("MatMul4bit", 0) > 0) == bool(ops)
    assert (res.node_counts.get("MatMulBnb4", 0) > 0) == (ops is False)
    assert (tmp_path / "m" / ortops.FOLDER_FILE).is_file() == bool(ops)
    assert res.family == family and res.layers >= 2 * (4 if family == "phi3" else 7)
    if fmt != "nbits":  # export's own check is against the original model: nbits re-quantizes
        assert res.ort_error["max_rel"] < LOGITS_REL
    cfg = json.loads((tmp_path / "m" / "genai_config.json").read_text())
    assert cfg["model"]["type"] == family and cfg["model"]["decoder"]["num_key_value_heads"] == 2
    assert cfg["model"]["decoder"]["session_options"].get("custom_ops_library") == (ortops.FOLDER_FILE if ops
                                                                                    else None)
    ref = nbits_reference(model) if fmt == "nbits" else model
    got = og_greedy(tmp_path / "m", PROMPT)
    want = torch_greedy(ref, PROMPT)
    assert len(set(want[0])) > 3, "the tiny model must not repeat one token (it would compare nothing)"
    assert_same_generation(got, want)


def test_bnb4_int8_compute_generates_as_torch_compute_int8(tmp_path):
    """bnb4 with accuracy_level 4: our MatMul4bitInt8 on the same bytes, against the torch
    model with every 4-bit layer at compute="int8" (the same kernels, the same bits per
    layer; the head stays dense fp32)."""
    import copy

    model = tiny("llama")
    res = export_genai(model, tmp_path / "m", weight_format="bnb4", accuracy_level=4, custom_ops=True, log=None)
    assert res.node_counts.get("MatMul4bitInt8", 0) == 10 and "MatMul4bit" not in res.node_counts
    ref = copy.deepcopy(model)
    layers = [m for m in ref.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14
    for m in layers:
        m.compute = "int8"
    assert_same_generation(og_greedy(tmp_path / "m", PROMPT), torch_greedy(ref.eval(), PROMPT))


def test_tiny_untied_llama_and_accuracy_level(tmp_path):
    """An untied head (its own weight); int8-compute MatMulNBits (accuracy_level 4) runs
    and stays close (not bit-faithful: activations are quantized per block)."""
    model = tiny("llama", tie=False)
    res = export_genai(model, tmp_path / "m", weight_format="nbits", accuracy_level=4, log=None)
    toks, logits = og_greedy(tmp_path / "m", PROMPT)
    ref_toks, ref_logits = torch_greedy(nbits_reference(model), PROMPT)
    first = logits[0]
    assert float(np.abs(first - ref_logits[0]).max() / np.abs(ref_logits[0]).max()) < 0.1
    assert res.weight_error > 0


def test_weights_past_the_protobuf_limit_go_to_external_data(tmp_path, monkeypatch):
    """Models past 2 GB (Phi-3-mini in fp32) are written as model.onnx + model.onnx.data;
    the limit is lowered here so a tiny model takes that path."""
    from qlora_kernels.integrations.onnx.genai import export as export_mod

    monkeypatch.setattr(export_mod, "_EXTERNAL_DATA_BYTES", 0)
    model = tiny("phi3")
    export_genai(model, tmp_path / "m", weight_format="fp32", log=None)
    assert (tmp_path / "m" / "model.onnx.data").stat().st_size > (tmp_path / "m" / "model.onnx").stat().st_size
    assert_same_generation(og_greedy(tmp_path / "m", PROMPT), torch_greedy(model, PROMPT))


# ---------------------------------------------------------------- SmolLM2-135M ---------

# the smollm2 fixture (NF4 SmolLM2, two adapters, a chat prompt) is conftest.py's


@pytest.fixture(scope="module")
def smollm2_folder(smollm2, tmp_path_factory):
    pm, _ = smollm2
    out = tmp_path_factory.mktemp("smollm2-genai") / "switchable"
    res = export_genai(pm, out, weight_format="bnb4", log=None)
    return out, res


def test_smollm2_switchable_adapters_generate_as_torch(smollm2, smollm2_folder):
    pm, prompt = smollm2
    folder, res = smollm2_folder
    assert sorted(res.adapters) == ["default", "second"]
    assert res.layers == 210 and res.tokenizer_files  # every projection 4-bit; the tokenizer is in the folder
    assert res.ort_error["max_rel"] < 1e-4
    with pm.disable_adapter():
        want = torch_greedy(pm, prompt)
    assert_same_generation(og_greedy(folder, prompt), want)
    answers = {}
    for name in ("default", "second"):
        pm.set_adapter(name)
        want = torch_greedy(pm, prompt)
        assert_same_generation(og_greedy(folder, prompt, adapter=name), want)
        answers[name] = want[0]
    pm.set_adapter("default")
    assert answers["default"] != answers["second"]  # two adapters, two answers


def test_smollm2_merged_adapter_generates_as_torch(smollm2, tmp_path):
    """Merged into NF4 (the merged weight re-quantized, as PEFT does when merging into a
    4-bit layer); the torch reference holds the same re-quantized bytes."""
    import copy

    pm, prompt = smollm2
    res = export_genai(pm, tmp_path / "merged", weight_format="bnb4", merge_adapters=True, log=None)
    assert res.merged == 210 and not res.adapters and res.weight_error > 0
    ref = copy.deepcopy(pm.get_base_model())
    # the same merge the export does, as torch modules (Bnb4Base runs our linear_4bit)
    export_layers.swap(ref, "bnb4", True)
    assert_same_generation(og_greedy(tmp_path / "merged", prompt), torch_greedy(ref.eval(), prompt))


@pytest.mark.parametrize("encoding", ["ours", "portable"])
def test_smollm2_bnb4_initializers_are_our_bytes(smollm2, smollm2_folder, tmp_path, encoding):
    """The default export where the operator library is built (CI builds it): our
    MatMul4bit with the NF4 codebook of formats.py; ``custom_ops=False``: ONNX Runtime's
    MatMulBnb4. Both hold the model's very bytes."""
    import onnx
    from onnx import numpy_helper

    pm, _ = smollm2
    if encoding == "ours":
        folder, _ = smollm2_folder
    else:
        folder = tmp_path / "portable"
        export_genai(pm, folder, weight_format="bnb4", custom_ops=False, verify_output=False, log=None)
    proto = onnx.load(str(folder / "model.onnx"))
    inits = {i.name: i for i in proto.graph.initializer}
    lm = pm.get_base_model()
    if encoding == "ours":
        assert not [n for n in proto.graph.node if n.op_type == "MatMulBnb4"]
        nodes = [n for n in proto.graph.node if n.op_type == ortops.OP and n.domain == ortops.DOMAIN]
        code = numpy_helper.to_array(inits["qlora_kernels.codebook.nf4"])
        assert np.array_equal(code, qk.formats.codebook_cpu("nf4").numpy())
        assert {n.input[3] for n in nodes} == {"qlora_kernels.codebook.nf4"}
    else:
        assert not [n for n in proto.graph.node if n.domain == ortops.DOMAIN]
        nodes = [n for n in proto.graph.node if n.op_type == "MatMulBnb4"]
    # every projection has a switchable adapter, so q/k/v stay three nodes (packing them
    # would need the three adapter branches concatenated)
    assert len(nodes) == 30 * 7
    for node in nodes:
        path = node.name.strip("/").rsplit("/", 1)[0]
        parts = [path.replace("qkv_proj", r) for r in ("q_proj", "k_proj", "v_proj")] if "qkv_proj" in path \
            else [path]
        want = b"".join(lm.get_submodule(p).get_base_layer().weight.detach().numpy().tobytes() for p in parts)
        got = numpy_helper.to_array(inits[node.input[1]])
        assert got.dtype == np.uint8 and got.tobytes() == want, path
        absmax = numpy_helper.to_array(inits[node.input[2]])
        want_absmax = torch.cat([lm.get_submodule(p).get_base_layer().prepared().absmax.float().reshape(-1)
                                 for p in parts]).numpy()
        assert np.array_equal(absmax, want_absmax), path


def test_generate_streams_an_answer(smollm2_folder):
    folder, _ = smollm2_folder
    pieces = []
    r = generate(folder, "What is the capital of France?", max_new_tokens=12, on_text=pieces.append)
    assert r.tokens and "".join(pieces) == r.text and len(r.tokens) <= 12
    assert "Paris" in r.text  # the base model's answer (the random adapters say anything)
    assert generate(folder, "What is the capital of France?", adapter="default", max_new_tokens=4).tokens
    with pytest.raises(ExportError, match=r"adapter 'nope'.*has: default, second"):
        generate(folder, "hi", adapter="nope")


# ---------------------------------------------------------------- bad input ------------

def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ExportError, match=r"'gpt2'.*supported: llama, phi3"):
        export_genai(m, tmp_path / "m", log=None)
    assert not (tmp_path / "m").exists()


def test_adapter_for_another_base_is_refused_naming_the_tensor(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "other")
    with pytest.raises(ExportError, match=r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight.*"
                                          r"another base"):
        export_genai(tiny("llama"), tmp_path / "m", adapters=[tmp_path / "other"], log=None)
    assert not (tmp_path / "m").exists()


def test_folder_adapter_from_peft_matches_the_model_adapter(tmp_path):
    """A PEFT folder (as qlora-kernels finetune and stock PEFT write it) gives the same
    adapter file as the PEFT model it was saved from."""
    from qlora_kernels.bench.onnx import random_lora

    pm = random_lora(tiny("llama"), ["q_proj", "v_proj", "down_proj"], r=4, std=0.05, seed=1)
    pm.save_pretrained(tmp_path / "run")
    a = export_genai(pm, tmp_path / "a", log=None)
    b = export_genai(tiny("llama"), tmp_path / "b", adapters={"default": tmp_path / "run"}, log=None,
                     verify_output=False)
    pa = adapter_params(tmp_path / "a", a.adapters["default"])
    pb = adapter_params(tmp_path / "b", b.adapters["default"])
    assert sorted(pa) == sorted(pb) and len(pa) == 2 * 3 * 2
    for k in pa:
        assert np.allclose(pa[k], pb[k], rtol=0, atol=1e-7), k


def test_existing_folder_needs_overwrite_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from qlora_kernels.integrations.onnx.genai import adapters as adapter_files

    from qlora_kernels.bench.onnx import random_lora

    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    model = random_lora(tiny("llama"), ["q_proj"], r=2, std=0.05)
    with pytest.raises(ExportError, match="exists; pass overwrite=True"):
        export_genai(model, out, log=None)

    def dies(params, path):  # after model.onnx is written, before the folder is complete
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_files, "write", dies)
    with pytest.raises(OSError, match="disk full"):
        export_genai(model, out, overwrite=True, log=None)
    assert sorted(os.listdir(tmp_path)) == ["m"] and sorted(os.listdir(out)) == ["keep.txt"]
    with pytest.raises(OSError, match="disk full"):
        export_genai(model, tmp_path / "fresh", log=None)
    assert sorted(os.listdir(tmp_path)) == ["m"]
    monkeypatch.undo()
    export_genai(model, out, overwrite=True, log=None, verify_output=False)
    assert (out / "model.onnx").is_file() and not (out / "keep.txt").exists()


def test_dora_cannot_be_switchable_and_bad_arguments(tmp_path):
    from qlora_kernels.bench.onnx import random_lora

    dora = random_lora(tiny("llama"), ["q_proj"], r=2, dora=True, std=0.05)
    with pytest.raises(ExportError, match=r"q_proj.*DoRA.*merge"):
        export_genai(dora, tmp_path / "d", log=None)
    merged = export_genai(dora, tmp_path / "d", merge_adapters=True, weight_format="fp32", log=None)
    assert merged.merged == 2 and merged.ort_error["max_rel"] < 1e-4
    model = tiny("llama")
    with pytest.raises(ExportError, match="weight_format must be one of"):
        export_genai(model, tmp_path / "x", weight_format="int4", log=None)
    with pytest.raises(ExportError, match="accuracy_level applies to MatMulNBits"):
        export_genai(model, tmp_path / "x", weight_format="bnb4", accuracy_level=4, custom_ops=False, log=None)
    with pytest.raises(ExportError, match=r"our operators \(bnb4\) is 0 \(fp32\) or 4 \(int8\), got 2"):
        export_genai(model, tmp_path / "x", weight_format="bnb4", accuracy_level=2, custom_ops=True, log=None)
    with pytest.raises(ExportError, match="folder .* does not exist"):
        export_genai(model, tmp_path / "no" / "x", log=None)
    with pytest.raises(ExportError, match="adapter name"):
        export_genai(model, tmp_path / "x", adapters={"../evil": {}}, log=None)
    assert sorted(os.listdir(tmp_path)) == ["d"]
    # a folder without a tokenizer (a model built from a config has none): GenAI's bare
    # RuntimeError ("Failed to open a json file") came out of generate as a traceback
    with pytest.raises(ExportError, match=r"no tokenizer \(tokenizer.json, tokenizer_config.json missing\)"):
        generate(tmp_path / "d", "hi", chat=False, max_new_tokens=2)


# ---------------------------------------------------------------- the commands ---------

def test_export_genai_and_generate_commands(tmp_path, capsys):
    from qlora_kernels import cli

    from qlora_kernels.bench.onnx import random_lora

    from .finetune_helpers import build_tiny_model

    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(tmp_path / "model")
    for name, seed in (("run-a", 1), ("run-b", 2)):  # a fresh base each: PEFT wraps the layers in place
        base = qk.quantize_model(AutoModelForCausalLM.from_pretrained(model_dir), skip=("lm_head",))
        random_lora(base, ["q_proj", "v_proj"], r=2, std=0.05, seed=seed).save_pretrained(tmp_path / name)
    out = tmp_path / "genai"
    rc = cli.main(["export", "--genai", str(out), "--model", str(model_dir), "--adapter", str(tmp_path / "run-a"),
                   "--adapter", str(tmp_path / "run-b"), "--weight-format", "nbits"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert "2 switchable: run-a, run-b" in stdout
    assert sorted(os.listdir(out / "adapters")) == ["run-a.onnx_adapter", "run-b.onnx_adapter"]
    assert (out / "tokenizer.json").is_file() and "chat_template" in json.loads(
        (out / "tokenizer_config.json").read_text())
    rc = cli.main(["generate", "--genai", str(out), "--prompt", "Hello", "--adapter", "run-b",
                   "--max-new-tokens", "5"])
    stdout, err = capsys.readouterr()
    assert rc == 0 and stdout.strip() and "new tokens at" in err
    rc = cli.main(["export", "--genai", str(out), "--model", str(model_dir), "--adapter", str(tmp_path / "run-a"),
                   "--adapter", str(tmp_path / "run-b"), "--merge-adapters", "--overwrite"])
    assert rc == 2 and "--merge-adapters takes exactly one --adapter, got 2" in capsys.readouterr().err
    rc = cli.main(["export", "--genai", str(out), "--model", str(model_dir)])
    assert rc == 2 and "exists; pass overwrite=True" in capsys.readouterr().err
    rc = cli.main(["generate", "--genai", str(tmp_path / "nothing"), "--prompt", "hi"])
    assert rc == 2 and "no genai_config.json" in capsys.readouterr().err
    # bnb4: our MatMul4bit by default; --portable keeps ONNX Runtime's MatMulBnb4;
    # --quantize-head writes the dense head as MatMulNBits
    for flags, ops in (([], {"MatMul4bit"}), (["--portable", "--quantize-head"], {"MatMulBnb4", "MatMulNBits"})):
        rc = cli.main(["export", "--genai", str(out), "--model", str(model_dir), "--overwrite", *flags])
        stdout, err = capsys.readouterr()
        assert rc == 0, err
        import onnx

        got = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node} & {"MatMul4bit", "MatMulBnb4",
                                                                                   "MatMulNBits"}
        assert got == ops, flags
        assert (out / ortops.FOLDER_FILE).is_file() == ("--portable" not in flags)
    for flags, msg in ((["--genai", str(tmp_path / "p"), "--portable", "--weight-format", "nbits"],
                        "--portable applies to --weight-format bnb4"),
                       (["--onnx", str(tmp_path / "p.onnx"), "--quantize-head"], "--quantize-head applies to --genai")):
        rc = cli.main(["export", "--model", str(model_dir), *flags])
        assert rc == 2 and msg in capsys.readouterr().err


# ---------------------------------------------------------------- review ---------------

def test_folder_adapter_rank_and_alpha_patterns_are_regexes_as_in_peft(tmp_path):
    """PEFT matches rank_pattern / alpha_pattern keys as regexes on the module name
    (``(.*\\.)?(key)$``); a regex key must give the scaling PEFT's model uses (the
    folder's file equal to the model's own), and rsLoRA's alpha/sqrt(r) too."""
    from peft import LoraConfig

    from qlora_kernels.integrations.peft import get_peft_model

    pm = get_peft_model(tiny("llama"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                  use_rslora=True, rank_pattern={r".*\.0\.self_attn\.q_proj": 8},
                                                  alpha_pattern={r"layers\.1\..*": 32}))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.eval().save_pretrained(tmp_path / "run")
    a = export_genai(pm, tmp_path / "a", verify_output=False, log=None)
    b = export_genai(tiny("llama"), tmp_path / "b", adapters={"default": tmp_path / "run"}, verify_output=False,
                     log=None)
    pa, pb = adapter_params(tmp_path / "a", a.adapters["default"]), adapter_params(tmp_path / "b",
                                                                                     b.adapters["default"])
    assert pa["model.layers.0.self_attn.q_proj.lora_A.weight"].shape[1] == 8
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert np.allclose(pa[k], pb[k], rtol=0, atol=1e-7), k


def test_verify_feeds_only_the_models_own_active_adapter(tmp_path):
    """A model without adapters, exported with a folder adapter that happens to be named
    "default": the torch model runs no adapter, so the check must not feed that one (it
    reported a 15% logits error for a correct export)."""
    from qlora_kernels.bench.onnx import random_lora

    random_lora(tiny("llama"), ["q_proj", "v_proj"], r=4, std=0.05, seed=1).save_pretrained(tmp_path / "default")
    res = export_genai(tiny("llama"), tmp_path / "m", adapters=[tmp_path / "default"], log=None)
    assert res.adapters == {"default": "adapters/default.onnx_adapter"}
    assert res.ort_error["max_rel"] < LOGITS_REL


def test_export_genai_refuses_adapters_trained_on_different_bases(tmp_path, capsys):
    """--base defaults to what the adapter was trained on (metrics.json); with several
    adapters that disagree (one lora on a dense base, one qlora on NF4), no single base is
    right for both: refused naming --base, not silently the first one's."""
    from transformers import AutoModelForCausalLM

    from qlora_kernels import cli
    from qlora_kernels.bench.onnx import random_lora

    from .finetune_helpers import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model")
    for name, method in (("run-lora", "lora"), ("run-qlora", "qlora")):
        random_lora(AutoModelForCausalLM.from_pretrained(model_dir), ["q_proj"], r=2).save_pretrained(tmp_path / name)
        (tmp_path / name / "metrics.json").write_text(json.dumps({"config": {"method": method}}))
    args = ["export", "--genai", str(tmp_path / "out"), "--model", str(model_dir), "--adapter",
            str(tmp_path / "run-lora"), "--adapter", str(tmp_path / "run-qlora"), "--no-verify"]
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "--base" in err and "run-lora" in err and "run-qlora" in err, err
    assert not (tmp_path / "out").exists()
    assert cli.main(args + ["--base", "nf4"]) == 0


def test_overwrite_refuses_the_current_folder_and_the_export_inputs(tmp_path, monkeypatch):
    """overwrite=True on "." died after the whole export with EBUSY (a folder cannot be
    renamed to inside itself) and left its ".old" folder behind; on the folder holding the
    model's own files or an adapter it deleted the export's input. Both are refused up
    front, naming out_dir; a plain existing folder is still replaced."""
    from qlora_kernels.bench.onnx import random_lora

    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    model = tiny("llama")
    for out in (".", work, tmp_path):
        with pytest.raises(ExportError, match=r"out_dir .*current folder"):
            export_genai(model, out, overwrite=True, log=None, verify_output=False)
    assert sorted(os.listdir(work)) == ["keep.txt"]
    random_lora(tiny("llama"), ["q_proj"], r=2, std=0.05).save_pretrained(tmp_path / "runs" / "a")
    with pytest.raises(ExportError, match=r"out_dir .*runs.*holds .*a, an input"):
        export_genai(model, tmp_path / "runs", adapters=[tmp_path / "runs" / "a"], overwrite=True, log=None)
    with pytest.raises(ExportError, match=r"out_dir .*holds .*an input"):
        export_genai(model, tmp_path / "runs", tokenizer=tmp_path / "runs" / "a", overwrite=True, log=None)
    assert (tmp_path / "runs" / "a" / "adapter_config.json").is_file()
    export_genai(model, tmp_path / "runs", overwrite=True, log=None, verify_output=False)
    assert (tmp_path / "runs" / "model.onnx").is_file()


def test_generate_fits_the_context_and_names_a_missing_chat_template(tmp_path):
    """generate asked GenAI for max_length = prompt + max_new_tokens, and GenAI raised a bare
    RuntimeError (a traceback from the command) when that passed the context; the answer is
    now cut at the context, and only a prompt that fills it is refused, naming the numbers.
    A tokenizer without a chat template (a base model) is named with --raw, not GenAI's
    'Empty chat template.'."""
    from transformers import AutoModelForCausalLM

    from .finetune_helpers import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model")  # max_position_embeddings 256
    out = tmp_path / "g"
    export_genai(AutoModelForCausalLM.from_pretrained(model_dir).eval(), out, weight_format="fp32", log=None,
                 verify_output=False)
    r = generate(out, "hello " * 200, max_new_tokens=100, chat=False)
    assert r.prompt_tokens == 201 and 1 <= len(r.tokens) <= 256 - 201  # "hello" + 199 " hello" + " "
    with pytest.raises(ExportError, match=r"prompt is 301 tokens.*context_length is 256"):
        generate(out, "hello " * 300, max_new_tokens=4, chat=False)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ExportError, match=r"no chat template.*--raw"):
        generate(out, "hello", max_new_tokens=2)
    assert generate(out, "hello", max_new_tokens=2, chat=False).tokens


def test_phi3_sliding_window_generates_as_torch(tmp_path):
    """Phi-3-mini-4k's config has sliding_window 2047 (of 4096), and was refused: the window
    is GroupQueryAttention's local_window_size. A window of 5 over an 8-token prompt and 32
    new tokens is passed all the way (a window one off either way changes the first token)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    m = Phi3ForCausalLM(Phi3Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3,
                                   sliding_window=5)).eval()
    res = export_genai(m, tmp_path / "m", weight_format="fp32", log=None)
    assert res.ort_error["max_rel"] < LOGITS_REL
    assert_same_generation(og_greedy(tmp_path / "m", PROMPT), torch_greedy(m, PROMPT))


def test_the_folder_gets_the_usual_permissions(tmp_path):
    """The folder is written as a tempfile.mkdtemp folder (mode 0700) and renamed into place:
    it must end with the mode any new folder gets (0755 under umask 022), else another user
    (a serving account, a container) cannot read the model."""
    old = os.umask(0o022)
    try:
        export_genai(tiny("llama"), tmp_path / "m", log=None, verify_output=False)
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755


def test_batch_of_two_prompts_of_different_lengths(tmp_path):
    """Batch 2 through onnxruntime_genai: prompts padded on the right with pad_token_id (as
    GenAI's Tokenizer.encode_batch pads), seqlens_k from the mask per row; each row greedy
    as torch on that prompt alone."""
    model = tiny("llama")
    export_genai(model, tmp_path / "m", weight_format="fp32", log=None, verify_output=False)
    rows, n = [PROMPT, PROMPT[2:5]], 12
    m = og.Model(str(tmp_path / "m"))
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=len(PROMPT) + n, min_length=len(PROMPT) + n, batch_size=2,
                              do_sample=False)
    gen = og.Generator(m, params)
    gen.append_tokens(np.array([r + [0] * (len(PROMPT) - len(r)) for r in rows], dtype=np.int32))
    got = [[], []]
    while not gen.is_done():
        gen.generate_next_token()
        for i, t in enumerate(gen.get_next_tokens()):
            got[i].append(int(t))
    for i, r in enumerate(rows):
        want = torch_greedy(model, r, n)[0]
        assert got[i][:len(want)] == want, i


def test_exports_onnx_runtime_could_not_run_are_refused_before_writing(tmp_path):
    """Found by a review: LoRA on the embedding was dropped without a word (the export then
    disagreed with torch by 160%), a MatMulBnb4 of block size 512 and a head size of 18 were
    written and ONNX Runtime refused them at load."""
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_kernels.integrations.peft import get_peft_model

    pm = get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                  init_lora_weights=False))
    for merge in (False, True):
        with pytest.raises(ExportError, match=r"embed_tokens: LoRA outside the decoder's projections"):
            export_genai(pm, tmp_path / "e", merge_adapters=merge, log=None)
    torch.manual_seed(0)
    coarse = qk.quantize_model(LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).eval(), blocksize=512)
    with pytest.raises(ExportError, match=r"MatMulBnb4 runs block sizes \(16, 32, 64, 128, 256\), this layer has 512"):
        export_genai(coarse, tmp_path / "b", custom_ops=False, log=None)
    odd = qk.quantize_model(LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=72, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).eval())
    with pytest.raises(ExportError, match="head size 18"):
        export_genai(odd, tmp_path / "h", log=None)
    assert not os.listdir(tmp_path)
