"""The native decode step (csrc/decode.h, integrations/hf_decode.py) inside transformers'
generate: the same tokens as the model's own forward and step logits within 1e-4 of the
step's largest logit, on every CPU path this machine runs (the attention kernel is per
ISA), for Llama (GQA, tied and untied heads) and Phi-3, with 4-bit and dense projections
and LoRA adapters; what it refuses, what makes a step fall back, and the plan's checks."""
import contextlib

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _C
from qlora_kernels.bench.onnx import LLAMA, random_lora
from qlora_kernels.integrations import hf_decode

from .conftest import kernel_paths, on_path

NEW = 24
REL = 1e-4


def tiny(family: str = "llama", tie: bool = True, skip=("lm_head",), hidden: int = 72, heads: int = 6,
         kv_heads: int = 2, window=None):
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    # hidden 72 (head_size 12): rows of 72 four-bit values straddle the 64-value blocks;
    # initializer_range 0.3 keeps a random model from repeating one token forever
    kw = dict(vocab_size=300, hidden_size=hidden, intermediate_size=100, num_hidden_layers=3, num_attention_heads=heads,
              num_key_value_heads=kv_heads, max_position_embeddings=96, initializer_range=0.3, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if family == "phi3":
        m = Phi3ForCausalLM(Phi3Config(**kw, sliding_window=window))
    else:
        m = LlamaForCausalLM(LlamaConfig(**kw, tie_word_embeddings=tie))
    return qk.quantize_model(m.eval(), skip=skip)


def lm_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def generate(model, prompt, new=NEW):
    with torch.no_grad():
        out = model.generate(input_ids=prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             cache_implementation="static", output_scores=True, return_dict_in_generate=True)
    return out.sequences[0, prompt.shape[1]:].tolist(), out.scores


def assert_close_scores(ref, got):
    """Step by step, within REL of the step's largest logit (min_new_tokens masks EOS: -inf
    in both)."""
    for a, b in zip(ref, got):
        fin = torch.isfinite(a)
        assert torch.equal(fin, torch.isfinite(b))
        assert float((a[fin] - b[fin]).abs().max()) <= REL * float(a[fin].abs().max())


def native_vs_own(model, prompt, new=NEW):
    """Greedy generation with the model's own forward, then with the native step: the same
    tokens, close step logits. Returns (the native run's status, its tokens); the model is
    left without the native step."""
    ref_tokens, ref_scores = generate(model, prompt, new)
    hf_decode.enable_native_decode(model)
    try:
        tokens, scores = generate(model, prompt, new)
        st = hf_decode.status(model)
    finally:
        hf_decode.disable_native_decode(model)
    assert tokens == ref_tokens
    assert_close_scores(ref_scores, scores)
    return st, tokens


def own_forward_agrees(model, tokens, scores):
    """With the native step disabled, the model generates these tokens and scores from
    PROMPT."""
    hf_decode.disable_native_decode(model)
    ref_tokens, ref_scores = generate(model, PROMPT, len(tokens))
    assert tokens == ref_tokens
    assert_close_scores(ref_scores, scores)


def assert_same_generation(model, prompt, new=NEW):
    st, tokens = native_vs_own(model, prompt, new)
    assert st["steps"] == new - 1 and st["fallbacks"] == 0, st
    assert len(set(tokens)) > 3  # the comparison compared something


PROMPT = torch.tensor([[5, 17, 42, 7, 99, 3, 250]])


@pytest.mark.parametrize("isa", kernel_paths())
@pytest.mark.parametrize("variant", ["llama-nf4", "llama-untied-lora", "llama-dense-lora", "phi3-lora", "mha"])
def test_generate_matches_the_models_own_forward(isa, variant):
    if variant == "llama-nf4":
        m = tiny()
    elif variant == "llama-untied-lora":
        m = random_lora(tiny(tie=False, skip=()), LLAMA, r=4, std=0.1)
    elif variant == "llama-dense-lora":  # some projections left dense, LoRA on all of them
        m = random_lora(tiny(skip=("lm_head", "v_proj", "down_proj")), LLAMA, r=3, std=0.1)
    elif variant == "phi3-lora":
        m = random_lora(tiny("phi3"), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], r=4, std=0.1)
    else:  # no grouping: kv_heads == heads
        m = tiny(hidden=64, heads=4, kv_heads=4)
    with on_path("cpu", isa):
        assert_same_generation(m, PROMPT)


def test_a_sliding_window_runs_the_models_own_forward():
    st, _ = native_vs_own(tiny("phi3", window=5), PROMPT, 12)
    # a sliding cache layer is not the native step's layout: every step is transformers'
    assert st["steps"] == 0 and st["fallbacks"] == 11 and "sliding" in st["last_fallback"], st


def test_a_weight_changed_between_steps_is_seen():
    """In place between two decode steps: the next step runs the model's own forward and
    plans again; the logits are those of the changed model."""
    from transformers import StaticCache

    m = random_lora(tiny(), LLAMA, r=4, std=0.1)
    lm = lm_of(m)
    B = lm.model.layers[1].self_attn.o_proj.lora_B["default"].weight
    norm = lm.model.layers[0].input_layernorm.weight
    packed = lm.model.layers[2].mlp.up_proj.base_layer.weight
    original = (B.detach().clone(), norm.detach().clone(), packed.detach().clone())

    def run():
        cache = StaticCache(config=lm.config, max_cache_len=32)
        logits = []
        with torch.no_grad():
            out = m(input_ids=PROMPT, cache=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            for i in range(6):
                if i == 2:
                    B.mul_(3.0)
                if i == 3:  # a 4-bit weight's bytes, edited in place
                    packed.view(-1)[:40] = 0x5A
                if i == 4:
                    norm.data = norm.data * 0.5  # a new storage
                out = m(input_ids=nxt, cache=cache, use_cache=True)
                logits.append(out.logits[0, -1])
                nxt = out.logits[:, -1:].argmax(-1)
        return logits

    ref = run()
    with torch.no_grad():
        B.copy_(original[0])
        packed.copy_(original[2])
    norm.data = original[1].clone()
    hf_decode.enable_native_decode(m)
    got = run()
    st = hf_decode.status(m)
    for a, b in zip(ref, got):
        assert float((a - b).abs().max()) <= REL * float(a.abs().max())
    assert st["fallbacks"] == 3 and st["steps"] == 3, st


def manual_steps(m, changes=(), n=5, cache_config=None):
    """The prompt, then n one-token greedy steps over a StaticCache (no attention mask);
    changes: {step: f(lm, cache)} run before that step. Returns each step's logits."""
    from transformers import StaticCache

    lm = lm_of(m)
    cache = StaticCache(config=cache_config or lm.config, max_cache_len=32)
    logits = []
    with torch.no_grad():
        out = m(input_ids=PROMPT, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        for i in range(n):
            if i in dict(changes):
                dict(changes)[i](lm, cache)
            out = m(input_ids=nxt, cache=cache, use_cache=True)
            logits.append(out.logits[0, -1])
            nxt = out.logits[:, -1:].argmax(-1)
    return logits


def native_vs_own_steps(build, changes, n=5, cache_config=None, undo=lambda: None):
    """manual_steps on a model from build() with its own forward, then on another with the
    native step: the same logits. undo() after each run. Returns the native run's status."""
    runs = []
    for native in (False, True):
        m = build()
        if native:
            hf_decode.enable_native_decode(m)
        try:
            runs.append(manual_steps(m, changes, n, cache_config))
        finally:
            undo()
    ref, got = runs
    for a, b in zip(ref, got):
        assert float((a - b).abs().max()) <= REL * float(a.abs().max())
    return hf_decode.status(m)


def test_hooks_and_forwards_added_between_steps_are_run():
    """A hook (on a module the step skips, however deep, or a global one) or a forward of
    its own given to a layer or an MLP between two steps of one generation: that step and
    the next run the model's own forward."""
    import functools

    from torch.nn.modules import module as torch_module

    def halved(mod, args, out):
        return out * 0.5

    def mlp_hook(lm, cache):
        lm.model.layers[1].mlp.register_forward_hook(halved)

    def projection_pre_hook(lm, cache):
        lm.model.layers[2].mlp.up_proj.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))

    def layer_forward(lm, cache):
        layer = lm.model.layers[0]

        def forward(layer, *args, **kwargs):
            out = type(layer).forward(layer, *args, **kwargs)
            return out * 0.5 if isinstance(out, torch.Tensor) else (out[0] * 0.5,) + tuple(out[1:])

        layer.forward = functools.partial(forward, layer)

    def mlp_forward(lm, cache):
        mlp = lm.model.layers[1].mlp
        mlp.forward = lambda x: type(mlp).forward(mlp, x) * 0.5

    handles = []

    def global_hook(lm, cache):
        handles.append(torch_module.register_module_forward_hook(
            lambda mod, args, out: out * 0.5 if type(mod).__name__ == "LlamaMLP" else None))

    def undo():
        while handles:
            handles.pop().remove()

    for change, why in ((mlp_hook, "layer 1.mlp has hooks"), (projection_pre_hook, "layer 2.mlp.up_proj has hooks"),
                        (layer_forward, "layer 0.(itself) has a forward of its own"),
                        (mlp_forward, "its forward is not down_proj"), (global_hook, "global module forward hooks")):
        st = native_vs_own_steps(tiny, {2: change}, undo=undo)
        assert st["steps"] == 2 and st["fallbacks"] == 3 and why in st["last_fallback"], (change.__name__, st)


def test_parameters_and_quant_states_replaced_between_steps_are_seen():
    """New objects, not edits: a LoRA weight, a 4-bit layer's weight and quant state, a
    norm loaded with assign=True, a dense weight. The old ones are unchanged, so only their
    owners tell."""
    from torch import nn

    from qlora_kernels.nn import Linear4bit

    def build():
        return random_lora(tiny(skip=("lm_head", "v_proj")), LLAMA, r=4, std=0.3)

    def lora_b(lm, cache):
        lin = lm.model.layers[1].self_attn.o_proj.lora_B["default"]
        lin.weight = nn.Parameter(lin.weight.detach() * -4.0)

    def four_bit(lm, cache):
        lin = lm.model.layers[1].mlp.up_proj.base_layer
        torch.manual_seed(5)
        new = Linear4bit.from_linear(nn.Linear(lin.in_features, lin.out_features))
        lin.weight, lin.quant_state = new.weight, new.quant_state

    def norm(lm, cache):
        n = lm.model.layers[0].post_attention_layernorm
        n.load_state_dict({"weight": n.weight.detach() * 2.0}, assign=True)

    def dense(lm, cache):
        lin = lm.model.layers[2].self_attn.v_proj.base_layer
        lin.weight = nn.Parameter(lin.weight.detach() * 1.5)

    st = native_vs_own_steps(build, {2: lora_b, 3: four_bit, 4: norm, 5: dense}, n=7)
    assert st["steps"] == 3 and st["fallbacks"] == 4, st


def test_cache_tensors_rebound_between_steps_are_seen():
    """reorder_cache (beam search's) gives the cache layers new key and value tensors: the
    steps after it write into those."""
    st = native_vs_own_steps(tiny, {2: lambda lm, cache: cache.reorder_cache(torch.tensor([0]))})
    assert st["steps"] == 4 and st["fallbacks"] == 1, st


def test_positions_past_a_sliding_window_fall_back_without_a_mask():
    """Phi-3 with a sliding window over a StaticCache of full layers, no attention mask: the
    model's own forward still attends to the window only; the native step, which attends
    to every position, runs below it."""
    import copy

    cfg = copy.deepcopy(tiny("phi3", window=10).config)
    cfg.sliding_window = None
    st = native_vs_own_steps(lambda: tiny("phi3", window=10), {}, n=6, cache_config=cfg)
    # positions 7, 8, 9 native, 10 on past the window
    assert st["steps"] == 3 and st["fallbacks"] == 3 and "sliding window of 10" in st["last_fallback"], st


def test_a_token_id_outside_the_vocabulary_raises_as_the_models_own_forward():
    from transformers import StaticCache

    m = tiny()
    hf_decode.enable_native_decode(m)
    cache = StaticCache(config=m.config, max_cache_len=32)
    with torch.no_grad():
        m(input_ids=PROMPT, cache=cache)
        for bad in (-1, 300):
            with pytest.raises(IndexError):
                m(input_ids=torch.tensor([[bad]]), cache=cache)
            assert f"token id {bad}" in hf_decode.status(m)["last_fallback"]
        m(input_ids=torch.tensor([[5]]), cache=cache)
    assert hf_decode.status(m)["steps"] == 1


def test_a_layer_list_that_is_not_the_configs_is_refused():
    m = tiny()
    del m.model.layers[2]
    with pytest.raises(hf_decode.NativeDecodeError, match="model.layers holds 2 layers, config.num_hidden_layers is 3"):
        hf_decode.enable_native_decode(m)


def test_steps_that_are_not_plain_fall_back_and_are_counted():
    m = tiny()
    hf_decode.enable_native_decode(m)
    with torch.no_grad():
        m.generate(input_ids=PROMPT.repeat(2, 1), max_new_tokens=3, do_sample=False)  # a batch of two
        st = hf_decode.status(m)
        assert st["steps"] == 0 and st["fallbacks"] == 2 and "shape (2, 1)" in st["last_fallback"]
        m.generate(input_ids=PROMPT, max_new_tokens=3, do_sample=False, cache_implementation="dynamic")
        st = hf_decode.status(m)
        assert st["steps"] == 0 and st["fallbacks"] == 4 and "DynamicCache" in st["last_fallback"], st
    out = m(input_ids=PROMPT[:, :1])  # autograd on: the model's own forward
    assert out.logits.requires_grad
    m.generate(input_ids=PROMPT, max_new_tokens=3, do_sample=False)
    assert hf_decode.status(m)["steps"] == 2


def test_unsupported_models_are_refused_with_the_reason():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(hf_decode.NativeDecodeError, match="supported: llama, phi3"):
        hf_decode.enable_native_decode(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)))
    dora = random_lora(tiny(), LLAMA, r=2, dora=True)
    with pytest.raises(hf_decode.NativeDecodeError, match=r"model.layers.0.self_attn.q_proj: .*DoRA"):
        hf_decode.enable_native_decode(dora)
    m = tiny()
    m.model.layers[2].mlp.up_proj.compute = "int8"
    with pytest.raises(hf_decode.NativeDecodeError, match=r"layers.2.mlp.up_proj: compute='int8'"):
        hf_decode.enable_native_decode(m)
    m = tiny()
    m.model.layers[1].input_layernorm.register_forward_hook(lambda *a: None)
    with pytest.raises(hf_decode.NativeDecodeError, match="layer 1.input_layernorm has hooks"):
        hf_decode.enable_native_decode(m)
    assert not hf_decode.status(m)["enabled"]


def test_a_hook_added_after_enabling_runs_the_models_own_forward():
    m = tiny()
    hf_decode.enable_native_decode(m)
    ref_tokens, _ = generate(m, PROMPT, 6)
    assert hf_decode.status(m)["steps"] == 5
    m.model.layers[0].mlp.register_forward_hook(lambda mod, args, out: out * 0.5)
    tokens, scores = generate(m, PROMPT, 6)
    st = hf_decode.status(m)
    assert st["steps"] == 5 and st["fallbacks"] == 5 and "layer 0.mlp has hooks" in st["last_fallback"], st
    hf_decode.disable_native_decode(m)
    hooked_tokens, hooked_scores = generate(m, PROMPT, 6)
    assert tokens == hooked_tokens
    assert_close_scores(hooked_scores, scores)


def test_the_plan_checks_every_size():
    a = dict(layers=1, hidden=8, heads=2, kv_heads=1, head_size=4, intermediate=6, eps=1e-6)
    cos = torch.ones(10, 2)
    fn = torch.ones(8)
    with pytest.raises(ValueError, match="not a multiple of kv_heads"):
        _C.DecodePlan(**{**a, "heads": 3, "kv_heads": 2}, cos_ptr=cos.data_ptr(), sin_ptr=cos.data_ptr(),
                      table_numel=20, positions=10, final_norm_ptr=fn.data_ptr(), final_norm_numel=8)
    with pytest.raises(ValueError, match="rotary table has 19 elements, expected 20"):
        _C.DecodePlan(**a, cos_ptr=cos.data_ptr(), sin_ptr=cos.data_ptr(), table_numel=19, positions=10,
                      final_norm_ptr=fn.data_ptr(), final_norm_numel=8)
    p = _C.DecodePlan(**a, cos_ptr=cos.data_ptr(), sin_ptr=cos.data_ptr(), table_numel=20, positions=10,
                      final_norm_ptr=fn.data_ptr(), final_norm_numel=8)
    W = torch.ones(8, 8)
    h = torch.ones(8)
    with pytest.raises(ValueError, match="not finished"):
        p.step(h.data_ptr(), 8, 0, 1)
    with pytest.raises(ValueError, match="layer 0 o_proj: in_features 6, expected 8"):
        p.set_proj(0, 3, 8, 6, 0, 0, 0, 0, 0, 0, 0, W.data_ptr(), 48, 0, 0, 0, 0, 0, 0, 0, 0.0, 0)
    with pytest.raises(ValueError, match="layer 0 o_proj's dense weight has 64 elements, expected 72"):
        p.set_proj(0, 3, 9, 8, 0, 0, 0, 0, 0, 0, 0, W.data_ptr(), 64, 0, 0, 0, 0, 0, 0, 0, 0.0, 0)
    with pytest.raises(ValueError, match="packed bytes has 5 elements, expected 32"):
        p.set_proj(0, 3, 8, 8, W.data_ptr(), 5, W.data_ptr(), 1, W.data_ptr(), 16, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                   0.0, 0)
    with pytest.raises(ValueError, match="layer 0 attention input 2: outputs \\[14, 18\\) exceed its buffer of 16"):
        p.set_proj(0, 2, 4, 8, 0, 0, 0, 0, 0, 0, 0, W.data_ptr(), 32, 0, 0, 0, 0, 0, 0, 0, 0.0, 14)
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        p.set_norms(3, fn.data_ptr(), 8, fn.data_ptr(), 8)
    with pytest.raises(ValueError, match="norms or cache not set"):
        p.finish(3, 2, 0.5)
    # sizes whose products wrap around int64 are refused before any element count is compared
    with pytest.raises(ValueError, match="the cache is too large"):
        p.set_cache(0, W.data_ptr(), 0, W.data_ptr(), 0, 2**62)
    with pytest.raises(ValueError, match="layer 0 attention input 0 is too large"):
        p.set_proj(0, 0, 2**40, 2**40, 0, 0, 0, 0, 0, 0, 0, W.data_ptr(), 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0)
    with pytest.raises(ValueError, match="sizes must be <= 2\\^31"):
        _C.DecodePlan(**{**a, "heads": 2**40, "kv_heads": 1}, cos_ptr=cos.data_ptr(), sin_ptr=cos.data_ptr(),
                      table_numel=20, positions=10, final_norm_ptr=fn.data_ptr(), final_norm_numel=8)


def test_the_head_runs_the_streaming_kernel_at_one_row():
    m = tiny(tie=False)
    hf_decode.enable_native_decode(m)
    x = torch.randn(1, 1, 72)
    with torch.no_grad():
        y = m.lm_head(x)
    ref = x.double() @ m.lm_head.weight.double().t()
    bound = float((x.abs().double() @ m.lm_head.weight.abs().double().t()).max())
    assert float((y.double() - ref).abs().max()) <= 74 * 2.0 ** -24 * bound
    hf_decode.disable_native_decode(m)
    assert "forward" not in m.lm_head.__dict__ and "forward" not in m.model.__dict__


def test_smollm2_with_switchable_adapters_generates_as_its_own_forward(smollm2):
    """The real model: SmolLM2-135M-Instruct in NF4 with two LoRA adapters (conftest.py),
    each active in turn (the plan is made again at each prompt, so a switch between
    generations counts), on a chat prompt."""
    pm, ids = smollm2
    prompt = torch.tensor([ids])
    answers = []
    try:
        for adapter in ("default", "second"):
            pm.set_adapter(adapter)
            ref_tokens, ref_scores = generate(pm, prompt, 12)
            hf_decode.enable_native_decode(pm)
            tokens, scores = generate(pm, prompt, 12)
            st = hf_decode.status(pm)
            hf_decode.disable_native_decode(pm)
            assert tokens == ref_tokens and st["steps"] == 11 and st["fallbacks"] == 0, st
            assert_close_scores(ref_scores, scores)
            answers.append(tokens)
    finally:
        pm.set_adapter("default")
        hf_decode.disable_native_decode(pm)
    assert answers[0] != answers[1]


def test_finetune_samples_take_the_native_step(monkeypatch):
    """finetune's greedy samples run with the native step and answer what the model's own
    forward answers."""
    from types import SimpleNamespace

    from qlora_kernels.finetune import train

    m = random_lora(tiny(), LLAMA, r=4, std=0.1)
    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0, decode=lambda ids, **kw: " ".join(map(str, ids.tolist())))
    examples = [SimpleNamespace(prompt_ids=PROMPT[0, :n].tolist(), prompt="p", reference="r") for n in (3, 7)]
    seen = []
    disable = hf_decode.disable_native_decode
    monkeypatch.setattr(hf_decode, "disable_native_decode", lambda model: (seen.append(hf_decode.status(model)),
                                                                           disable(model))[1])
    native = train.samples(m, tok, examples, 10)
    assert seen and seen[0]["steps"] > 0 and seen[0]["fallbacks"] == 0, seen
    assert not hf_decode.status(m)["enabled"]
    monkeypatch.setattr(train, "_native_decode", lambda model: contextlib.nullcontext())
    assert train.samples(m, tok, examples, 10) == native


def test_positions_beyond_the_rotary_table_fall_back():
    """A StaticCache longer than max_position_embeddings (96 here): the model's own forward
    computes those positions' rotary embedding; the native step has no table for them and
    falls back instead of raising."""
    st, _ = native_vs_own(tiny(), PROMPT, 100)
    # positions 7..95 native, 96..105 the model's own forward
    assert st["steps"] == 89 and st["fallbacks"] == 10 and "rotary table" in st["last_fallback"], st


def test_module_and_adapter_changes_are_seen_at_the_next_step():
    """Not only tensors: an adapter disabled or switched, an activation or a norm's epsilon
    changed, between generations (a reused StaticCache and a one-token prompt: no prompt
    to plan at) or between two steps of one generation."""
    from torch import nn
    from transformers import StaticCache

    pm = random_lora(tiny(), LLAMA, r=4, std=0.3)
    lm = lm_of(pm)
    one = torch.tensor([[5]])
    cache = StaticCache(config=lm.config, max_cache_len=40)

    def gen(prompt, new=8):
        cache.reset()
        with torch.no_grad():
            out = pm.generate(input_ids=prompt, cache=cache, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False)
        return out[0].tolist()

    with pm.disable_adapter():
        ref_disabled = gen(one)
    ref = gen(one)
    hf_decode.enable_native_decode(pm)
    try:
        assert gen(PROMPT) and gen(one) == ref
        with pm.disable_adapter():
            assert gen(one) == ref_disabled
        assert gen(one) == ref
        assert hf_decode.status(pm)["steps"] >= 20
        # between two steps of one generation: the step after the change is the model's own
        calls = []

        def switch(module, args, kwargs):
            calls.append(1)
            if len(calls) == 4:
                pm.base_model.disable_adapter_layers()

        h = lm.register_forward_pre_hook(switch, with_kwargs=True)
        try:
            mixed = gen(PROMPT)
        finally:
            h.remove()
            pm.base_model.enable_adapter_layers()
        calls.clear()
        hf_decode.disable_native_decode(pm)
        h = lm.register_forward_pre_hook(switch, with_kwargs=True)
        try:
            assert gen(PROMPT) == mixed
        finally:
            h.remove()
            pm.base_model.enable_adapter_layers()
        with pm.disable_adapter():
            assert mixed not in (gen(PROMPT), [])
        assert mixed != gen(PROMPT)  # the switch did change the generation midway
    finally:
        hf_decode.disable_native_decode(pm)

    m = tiny()
    hf_decode.enable_native_decode(m)
    generate(m, PROMPT, 4)
    m.model.layers[1].mlp.act_fn = nn.GELU()
    m.model.layers[0].input_layernorm.variance_epsilon = 0.5
    tokens, scores = generate(m, PROMPT, 12)
    st = hf_decode.status(m)
    assert st["fallbacks"] == 11 and "eps 0.5" in st["last_fallback"], st
    own_forward_agrees(m, tokens, scores)


def test_inference_mode_and_a_norm_or_embedding_in_another_dtype():
    m = tiny(tie=False)
    with torch.inference_mode():  # the model's first use, in inference mode
        ref = m.generate(input_ids=PROMPT, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    hf_decode.enable_native_decode(m)
    with torch.inference_mode():
        got = m.generate(input_ids=PROMPT, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert got.tolist() == ref.tolist() and hf_decode.status(m)["steps"] == 7
    # a bf16 embedding (the model still computes in fp32 after it): the plan must not read
    # it as fp32
    m.model.embed_tokens.to(torch.bfloat16)
    tokens, scores = generate(m, PROMPT, 8)
    st = hf_decode.status(m)
    assert st["fallbacks"] == 7 and "embed_tokens" in st["last_fallback"], st
    own_forward_agrees(m, tokens, scores)


def test_hidden_states_asked_for_once_do_not_disable_the_native_step():
    """transformers installs inert output-capturing hooks for good at the first call that
    asks for hidden states or attentions; asking (by argument or config) falls back."""
    from transformers import StaticCache

    m = tiny()
    with torch.no_grad():
        m(input_ids=PROMPT, output_hidden_states=True)
    hf_decode.enable_native_decode(m)
    generate(m, PROMPT, 6)
    assert hf_decode.status(m)["steps"] == 5
    m.config.output_hidden_states = True
    try:
        cache = StaticCache(config=m.config, max_cache_len=16)
        with torch.no_grad():
            out = m(input_ids=PROMPT, cache=cache)
            out = m(input_ids=out.logits[:, -1:].argmax(-1), cache=cache)
    finally:
        m.config.output_hidden_states = False
    assert out.hidden_states is not None and len(out.hidden_states) == 4
    assert hf_decode.status(m)["last_fallback"] == "attentions or hidden states asked for"


def test_concurrent_generations_with_their_own_caches():
    """Two threads, one StaticCache each: every generation as alone (the step uses the plan
    it checked, not whichever plan the other thread made meanwhile)."""
    import sys
    import threading

    from transformers import StaticCache

    m = tiny()
    prompts = [PROMPT, torch.tensor([[9, 8, 7, 6, 5]])]

    def run(prompt):
        with torch.no_grad():
            out = m.generate(input_ids=prompt, cache=StaticCache(config=m.config, max_cache_len=48),
                             max_new_tokens=24, min_new_tokens=24, do_sample=False)
        return out[0].tolist()

    ref = [run(p) for p in prompts]
    hf_decode.enable_native_decode(m)
    interval, threads = sys.getswitchinterval(), torch.get_num_threads()
    sys.setswitchinterval(1e-6)
    torch.set_num_threads(1)
    try:
        for _ in range(6):
            res = [None, None]

            def work(i):
                try:
                    res[i] = run(prompts[i])
                except Exception as e:  # noqa: BLE001 - reported by the assertion
                    res[i] = repr(e)

            ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert res == ref
    finally:
        sys.setswitchinterval(interval)
        torch.set_num_threads(threads)


def test_a_swapped_rotary_module_gives_new_tables():
    import copy

    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    m = tiny()
    hf_decode.enable_native_decode(m)
    generate(m, PROMPT, 4)
    cfg = copy.deepcopy(m.config)
    cfg.rope_parameters = dict(rope_type="default", rope_theta=500.0)
    m.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    tokens, scores = generate(m, PROMPT, 12)
    assert hf_decode.status(m)["steps"] == 14
    hf_decode.disable_native_decode(m)
    ref_tokens, ref_scores = generate(m, PROMPT, 12)
    assert tokens == ref_tokens
    assert_close_scores(ref_scores, scores)


def test_generate_leaves_assisted_decoding_its_cache_and_a_passed_config_unwarned(monkeypatch):
    """Prompt lookup sizes its candidates past a StaticCache's max_length: generate keeps its
    own cache for it. A caller's generation config gets the static cache on a copy (a
    cache_implementation argument next to it is deprecated by transformers)."""
    import copy

    from transformers.generation import utils

    m = tiny()
    prompt = torch.tensor([[5, 17, 42, 7, 5, 17, 42, 7, 99, 5, 17]])  # "5, 17" recurs: candidates to look up
    with torch.no_grad():
        ref = [m.generate(input_ids=prompt, max_new_tokens=n, do_sample=False, prompt_lookup_num_tokens=3)
               for n in (3, 8)]
        hf_decode.enable_native_decode(m)
        for n, r in zip((3, 8), ref):  # 3: candidates past max_length
            assert torch.equal(m.generate(input_ids=prompt, max_new_tokens=n, do_sample=False,
                                          prompt_lookup_num_tokens=3), r)
        warned = []
        monkeypatch.setattr(utils.logger, "warning_once", lambda msg, *a, **k: warned.append(msg))
        gc = copy.deepcopy(m.generation_config)
        gc.max_new_tokens, gc.min_new_tokens, gc.do_sample = 6, 6, False
        steps = hf_decode.status(m)["steps"]
        m.generate(input_ids=PROMPT, generation_config=gc)
    assert hf_decode.status(m)["steps"] == steps + 5
    assert gc.cache_implementation is None and not [w for w in warned if "generation_config" in w], warned


def test_generate_gets_a_static_cache_without_editing_the_generation_config(tmp_path):
    """A plain generate() takes native steps; a caller's own cache or cache_implementation
    is kept; the saved generation config is the model's."""
    from transformers import StaticCache

    m = tiny()
    before = m.generation_config.to_dict()
    hf_decode.enable_native_decode(m)
    with torch.no_grad():
        plain = m.generate(input_ids=PROMPT, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert hf_decode.status(m)["steps"] == 5
        own = m.generate(input_ids=PROMPT, cache=StaticCache(config=m.config, max_cache_len=30), max_new_tokens=6,
                         min_new_tokens=6, do_sample=False)
        assert hf_decode.status(m)["steps"] == 10 and torch.equal(own, plain)
        m.generate(input_ids=PROMPT, max_new_tokens=3, do_sample=False, cache_implementation="dynamic")
        assert hf_decode.status(m)["steps"] == 10
    assert m.generation_config.to_dict() == before
    m.save_pretrained(tmp_path)
    assert "cache_implementation" not in (tmp_path / "generation_config.json").read_text() or \
        '"cache_implementation": null' in (tmp_path / "generation_config.json").read_text()
    hf_decode.disable_native_decode(m)
    assert "generate" not in m.__dict__


def test_a_cache_handed_back_can_be_extended_by_the_next_turn():
    """generate(return_dict_in_generate=True) handed back the StaticCache it had been given
    for this call only: passing it to the next turn with a longer prompt raised IndexError
    (index_copy_ past the cache). Such calls keep transformers' own cache choice."""
    m = tiny()
    prompt = PROMPT[:, :5]

    def two_turns(model):
        with torch.no_grad():
            o1 = model.generate(input_ids=prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                return_dict_in_generate=True)
            nxt = torch.cat([o1.sequences, PROMPT[:, :3]], 1)
            o2 = model.generate(input_ids=nxt, past_key_values=o1.past_key_values, max_new_tokens=5,
                                min_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        return type(o1.past_key_values).__name__, o2.sequences

    kind, own = two_turns(m)
    hf_decode.enable_native_decode(m)
    kind_native, native = two_turns(m)
    assert kind_native == kind and torch.equal(native, own)
    with torch.no_grad():  # a plain call still takes the native step
        m.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
    assert hf_decode.status(m)["steps"] >= 2
