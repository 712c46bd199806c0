"""The training loop, the held-out loss and greedy samples.

Reproducibility across an interruption rests on three rules: the batches of step s come
from the position s * batch * accum of a seed-only order (data.Order); torch's generator
is re-seeded from (seed, step, micro-batch) before every forward, so dropout masks depend
on nothing else; and the optimizer/scheduler states come back from the checkpoint. A
resumed run therefore computes the very same floating-point operations as an
uninterrupted one and ends with bit-identical adapter weights and losses."""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import FinetuneError, checkpoint
from ..integrations.hf_loss import is_fused
from .data import IGNORE, Order, collate

log = logging.getLogger(__name__)

# Tests set this to a few hundredths of a second so that a signal reliably lands mid-run.
STEP_DELAY_ENV = "QLORA_KERNELS_FINETUNE_STEP_DELAY"


class Interrupted(Exception):
    def __init__(self, signum: int, step: int, path):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")  # "SIGINT at step 12"
        self.signum, self.step, self.path = signum, step, path


def step_seed(seed: int, step: int, micro: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + micro) % (2 ** 63)


def lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 10% (LambdaLR keeps only the step count in its
    state, so a resumed scheduler continues exactly)."""
    def f(i: int) -> float:
        if i < warmup:
            return (i + 1) / (warmup + 1)
        t = (i - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def make_optimizer(model, lr: float, steps: int, warmup: int):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, warmup))


def _keeps_logits(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def loss_sum(model, batch: dict, trim: bool) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over labelled tokens, their number). With ``trim`` the output
    head runs only from the first position any row has a label for (``logits_to_keep``):
    the prompt and template tokens need no 49k-wide logits. A model with the fused head +
    loss (integrations.hf_loss) computes the sum itself when it trains (no logits at all)."""
    labels = batch["labels"]
    L = labels.shape[1]
    valid = labels[:, 1:] != IGNORE
    n = int(valid.sum())
    first = 0
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    if trim:
        cols = valid.any(0).nonzero()
        first = int(cols[0]) if len(cols) else L - 2
        kw["logits_to_keep"] = L - first
    if is_fused(model) and model.training and torch.is_grad_enabled():
        # num_items_in_batch=1: transformers' loss is then the sum
        return model(**kw, labels=labels, num_items_in_batch=1).loss, n
    out = model(**kw)
    logits = out.logits[:, :-1]
    target = labels[:, first + 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=IGNORE, reduction="sum"), n


def heldout_loss(model, examples: list, batch_size: int, pad_id: int) -> dict:
    """Mean cross-entropy per reply token over the held-out set (token-weighted)."""
    was_training = model.training
    model.eval()
    total, n, trim = 0.0, 0, _keeps_logits(model)
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            s, k = loss_sum(model, collate(examples[i:i + batch_size], pad_id), trim)
            total += float(s)
            n += k
    model.train(was_training)
    return {"loss": total / max(1, n), "tokens": n, "examples": len(examples)}


@contextlib.contextmanager
def _native_decode(model):
    """The native decode step (integrations.hf_decode) while the samples are generated,
    where the model allows it: the same greedy tokens, ~3x fewer seconds per token."""
    from ..integrations import hf_decode

    try:
        hf_decode.enable_native_decode(model)
    except hf_decode.NativeDecodeError as e:
        log.info("samples: the model's own decode step (%s)", e)
        yield
        return
    try:
        yield
    finally:
        hf_decode.disable_native_decode(model)


def samples(model, tok, examples: list, max_new_tokens: int) -> list:
    """Greedy answers to held-out prompts (what the model says, not what the loss says)."""
    was_training = model.training
    model.eval()
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    out = []
    native = _native_decode(model)
    with torch.no_grad(), native:
        for e in examples:
            ids = torch.tensor([e.prompt_ids])
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id,
                                 eos_token_id=sorted(eos) or None, temperature=None, top_p=None, top_k=None)
            answer = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
            out.append({"prompt": e.prompt, "reference": e.reference, "answer": answer})
    model.train(was_training)
    return out


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step and checkpoint; a second
    Ctrl-C aborts at once (the last periodic checkpoint stays)."""

    def __init__(self, write: Callable[[str], None]):
        self.signum: Optional[int] = None
        self._write, self._old = write, {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self._write(f"{signal.Signals(signum).name}: stopping after this step to write a checkpoint "
                    f"(Ctrl-C again aborts at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _peak_rss_kb() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def train(model, train_examples: list, pad_id: int, opt, sched, state: dict, cfg, out, *, progress: bool = True,
          session=None, save_model=None) -> dict:
    """Runs steps state["step"] .. cfg.steps (cfg: a RunConfig), appending to state["losses"];
    checkpoints every cfg.save_every steps, at the end, and when SIGINT/SIGTERM arrives (then raises
    Interrupted). Returns the state. Under ``session`` (finetune/distributed.py) ``model`` is
    the wrapped module, ``save_model`` the PEFT model; each rank trains on its slice of
    every global micro-batch, a signal to any rank stops every rank after the same step,
    and the ranks write each checkpoint together (checkpoint.save)."""
    from tqdm.auto import tqdm

    from .distributed import Session

    session = session or Session("none")
    save_model = save_model if save_model is not None else model

    steps, B, accum, seed, save_every = cfg.steps, cfg.batch_size, cfg.grad_accum, cfg.seed, cfg.save_every
    order = Order(len(train_examples), seed)
    params = [p for p in model.parameters() if p.requires_grad]
    trim, delay = _keeps_logits(save_model), float(os.environ.get(STEP_DELAY_ENV) or 0)
    bar = tqdm(total=steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True,
               disable=not (progress and session.main), file=sys.stderr, mininterval=0.5)
    session_tokens, session_t0 = 0, time.perf_counter()
    model.train()

    saved = [state["step"]]  # a resumed run starts from a checkpoint

    def save():
        saved[0] = state["step"]
        state["peak_rss_kb"] = max(state.get("peak_rss_kb", 0), _peak_rss_kb())
        return checkpoint.save(out, save_model, opt, sched, state, session if session.on else None)

    with _StopFlag(bar.write) as stop:
        while state["step"] < steps:
            step, t0 = state["step"], time.perf_counter()
            batches = [collate([train_examples[i] for i in order.batch((step * accum + m) * B, B)], pad_id)
                       for m in range(accum)]
            n_total = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
            tokens, total = sum(int(b["attention_mask"].sum()) for b in batches), 0.0
            for m, b in enumerate(batches):
                torch.manual_seed(step_seed(seed, step, m))  # dropout masks: a function of (seed, step)
                s, _ = loss_sum(model, session.shard(b), trim)
                session.backward(s, n_total, accum)  # per-token mean over the whole accumulated step
                total += float(s)
                if m < accum - 1:
                    session.micro_done()
            total = session.sum(total)
            lr = opt.param_groups[0]["lr"]
            if not math.isfinite(total):
                # every rank holds the same sum, so every rank stops here, before the step would
                # write NaN into the adapter and the next checkpoint
                bar.close()
                # The steps before this one had finite losses but may already have blown the
                # weights up (--lr 1e30: |w| ~ 5e29 after step 1), and --resume keeps the --lr:
                # the kept checkpoint is for inspection, a new run is the way on.
                kept = (f"the checkpoint of step {saved[0]} is kept, but it may hold diverged weights"
                        if saved[0] else "no checkpoint was written")
                raise FinetuneError(f"step {step + 1}: the training loss is {total} at --lr {lr:g}: the run diverged "
                                    f"and this step was not applied ({kept}); start a new run with a lower --lr")
            session.step(opt, params)
            sched.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            state["step"] = step + 1
            state["losses"].append({"step": step + 1, "loss": total / n_total, "lr": lr, "tokens": tokens,
                                    "seconds": round(dt, 4)})
            state["tokens_trained"] += tokens
            state["train_seconds"] += dt
            session_tokens += tokens
            rate = session_tokens / max(1e-9, time.perf_counter() - session_t0)
            bar.set_postfix_str(f"loss {total / n_total:.3f}, {rate:.0f} tok/s", refresh=False)
            bar.update(1)
            if delay:
                time.sleep(delay)
            signum = session.agree(stop.signum or 0)
            if signum:
                bar.close()
                raise Interrupted(signum, state["step"], save())
            if state["step"] % save_every == 0 or state["step"] == steps:
                save()
    bar.close()
    state["peak_rss_kb"] = max(state.get("peak_rss_kb", 0), _peak_rss_kb())
    return state
