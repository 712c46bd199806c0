"""``qlora-kernels finetune``: its options, and the run from the output-folder checks to
the written report. Bad input fails fast, before the slow model load, in one line."""
from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .._errors import one_line_errors
from . import FinetuneError
from .config import RunConfig

RUNS_DIR = "finetune-runs"
OUR_FILES = ("adapter_model.safetensors", "adapter_config.json", "metrics.json", "loss.png", "checkpoint")


def add_parser(sub) -> argparse.ArgumentParser:
    f = sub.add_parser(
        "finetune", help="fine-tune a model with QLoRA/LoRA/DoRA on our kernels (default: SmolLM2 on chatterbot-corpus)",
        description="Fine-tunes a Hugging Face causal LM with adapters on the qlora-kernels ops. With no "
                    "arguments: SmolLM2-135M-Instruct, QLoRA r=16 on every projection, chatterbot-corpus's "
                    "English question/answer pairs.")
    RunConfig.add_arguments(f)
    a = f.add_argument
    a("--output", help=f"output folder (default {RUNS_DIR}/<method>-<time>)")
    a("--resume", action="store_true", help="continue the interrupted run in --output (default: the latest in "
                                            f"{RUNS_DIR}/) with its own options")
    a("--distributed", help="data-parallel engine under torchrun/the deepspeed launcher: none, ddp, fsdp2, zero2, "
                            "zero3 (default: ddp when launched with several processes, else none); --batch-size "
                            "is the global micro-batch and must divide by the number of processes")
    a("--debug", action="store_true", help="show tracebacks and library warnings")

    def error(message):  # argparse's own errors, in one line like ours
        print(f"qlora-kernels finetune: error: {message} (see qlora-kernels finetune --help)", file=sys.stderr)
        sys.exit(2)

    f.error = error
    f.set_defaults(func=main)
    return f


def _passive_openmp() -> None:
    """OpenMP threads spin between parallel regions by default; on a shared 2-core machine
    the spinning steals the cores from the work (docs/design.md, "OpenMP wait policy"). libgomp reads OMP_WAIT_POLICY once, when it
    loads with torch; the command reaches here before torch is imported (the package
    imports lazily), so setting the variable is enough. An explicit OMP_WAIT_POLICY is
    respected; a process that imported torch before calling the command is left as it is."""
    if "torch" not in sys.modules and not os.environ.get("OMP_WAIT_POLICY"):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(args) -> int:
    _passive_openmp()  # first: everything below may load torch
    from .train import Interrupted

    try:
        return one_line_errors("finetune", run, args, (FinetuneError,))
    except Interrupted as e:
        print(f"qlora-kernels finetune: stopped by {e}: checkpoint in {e.path}; continue with: "
              f"qlora-kernels finetune --output {e.path.parent} --resume", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("qlora-kernels finetune: interrupted (the last periodic checkpoint, if any, can be resumed)",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the promise is one line, not a traceback
        if args.debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"qlora-kernels finetune: error: {type(e).__name__}: {first} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


# -- configuration ----------------------------------------------------------------------------
def _unfinished(run: Path) -> bool:
    import json

    try:
        state = json.loads((run / "checkpoint" / "state.json").read_text(encoding="utf-8"))
        return state["step"] < state["config"]["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _output_dir(args) -> Path:
    if args.output:
        return Path(args.output)
    if args.resume:
        runs = sorted((p for p in Path(RUNS_DIR).glob("*") if _unfinished(p)), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise FinetuneError(f"--resume: no unfinished run under {RUNS_DIR}/; pass --output")
        return runs[-1]
    base = Path(RUNS_DIR) / f"{args.method or RunConfig.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    # runs started in the same second: the next free name (a race between two is caught by _claim)
    return next(p for p in (base.with_name(f"{base.name}-{i}") if i else base for i in range(1000)) if not p.exists())


_CLAIMS: list = []  # the open lock files of the folders being written (held until the run ends)
_CREATED: list = []  # output folders this process made (removed again if the run fails before writing)


def _drop_if_empty(out: Path) -> None:
    """A run that fails after making its folder (a late check, the model failing to load)
    leaves no empty folder behind, as one that fails before it."""
    if out in _CREATED and out.is_dir() and all(p.name == ".lock" for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)


def _claim(out: Path) -> None:
    """An exclusive lock on the folder until the run ends (run() releases it): two runs started
    into one folder (the same --output, or default names made in the same second) would
    otherwise both pass the checks below and write into each other's files. The kernel drops
    the lock when the process ends, however it ends, so a killed run never blocks its --resume."""
    import fcntl

    f = open(out / ".lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise FinetuneError(f"--output {out}: another run is writing there right now; choose another --output or "
                            f"wait for it") from None
    _CLAIMS.append(f)


def _prepare_output(out: Path, resume: bool, claim: bool = True):
    """Creates and probes the folder; refuses to overwrite a previous run's files."""
    from . import checkpoint

    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--output {out}: exists and is not a folder")
    if resume and not out.is_dir():
        raise FinetuneError(f"--resume: no checkpoint in {out} (no such folder)")
    if not out.exists():
        _CREATED.append(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FinetuneError(f"--output {out}: cannot write there ({e.strerror or e})") from None
    if claim:
        _claim(out)
    checkpoint.clean_stale(out)
    found = checkpoint.find(out)
    if resume:
        if found is None:
            raise FinetuneError(f"--resume: no checkpoint in {out}")
        return found
    taken = [n for n in OUR_FILES if (out / n).exists()]
    if found is not None and found.name not in taken:
        taken.append(found.name)
    if taken:
        raise FinetuneError(f"--output {out} already holds a run ({', '.join(taken)}); pass --resume to continue "
                            f"it or choose another --output")
    return None


def _quiet_libraries(debug: bool) -> None:
    """transformers' weight-loading bars and deprecation notes drown the run's own output."""
    import logging
    import warnings

    if debug:
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


# -- the run ----------------------------------------------------------------------------------
def run(args) -> int:
    t_start = time.perf_counter()
    from .distributed import setup

    session = setup(args.distributed)
    held, made = len(_CLAIMS), len(_CREATED)
    try:
        return _run(args, session, t_start)
    except BaseException:
        for out in _CREATED[made:]:
            _drop_if_empty(out)
        raise
    finally:
        while len(_CLAIMS) > held:  # this run's folder is free again (a later run in this process, a --resume)
            _CLAIMS.pop().close()
        del _CREATED[made:]
        session.close()


class _Run:
    """What the phases of one run hand each other: the command's ``args``, the distributed
    ``session`` and the start time, then as the phases set them: ``out``, ``cfg`` (the
    RunConfig), ``ckpt`` and ``saved_state`` (a resumed run), the data (``records``,
    ``data_name``, ``dups``, ``train_recs``, ``eval_recs``, ``train_ex``, ``eval_ex``),
    the model (``model_dir``, ``tok``, ``had_template``, ``targets``, ``pm``,
    ``train_model``, ``load_seconds``), the optimizer (``opt``, ``sched``, ``warmup``) and
    the training ``state``."""

    def __init__(self, args: argparse.Namespace, session: Any, t_start: float):
        self.args, self.session, self.t_start = args, session, t_start
        self.ckpt: Optional[Path] = None
        self.saved_state: Optional[dict] = None


def _run(args, session, t_start) -> int:
    r = _Run(args, session, t_start)
    if not session.main:  # one rank speaks; errors still reach stderr from every rank
        sys.stdout = open(os.devnull, "w")
    _check_options_and_data(r)
    _quiet_libraries(args.debug)
    _select_backend(r.cfg)
    _load_model_and_data(r)
    _announce(r)
    _begin(r)
    from . import train as T

    r.state = T.train(r.train_model, r.train_ex, r.tok.pad_token_id, r.opt, r.sched, r.state, r.cfg, r.out,
                      session=session, save_model=r.pm)
    return _finish(r)


def _check_options_and_data(r: _Run) -> None:
    """Options and data are checked before the output folder is created (a typo leaves no
    empty folder behind); a resumed run reads its options from the checkpoint first."""
    from . import checkpoint, data, model as M

    args, session = r.args, r.session
    r.out = session.broadcast(_output_dir(args))
    if args.resume:
        # every rank reads the checkpoint; the main rank alone holds the folder's lock, and a
        # refusal reaches every rank (one rank raising alone would leave the others waiting)
        r.ckpt = _prepare_output(r.out, True, claim=False)
        _on_main_rank(session, lambda: _claim(r.out))
        r.saved_state = checkpoint.read_state(r.ckpt)
        checkpoint.check_engine(r.ckpt, r.saved_state, session)
        r.cfg = RunConfig.from_args(args, r.saved_state["config"])
        _check_dropout_masks(r.ckpt, r.saved_state, r.cfg)
    else:
        r.cfg = RunConfig.from_args(args)
    r.records, r.data_name, r.dups = data.load_records(r.cfg.data)  # bad data fails before the slow load
    r.data_sha256 = data.fingerprint(r.records)
    if args.resume:
        _same_as_checkpoint(r, "data_sha256", r.data_sha256, f"the data ({r.data_name})")
    r.train_recs, r.eval_recs = data.split(r.records, r.cfg.eval_size, r.data_name)
    # A resumed run may run under another world size than the one it was saved from.
    session.check_batch(r.cfg.batch_size)
    if not args.resume:
        if r.cfg.model is not None:
            M.check_model_dir(r.cfg.model)
        r.ckpt = _on_main_rank(session, lambda: _prepare_output(r.out, False))


def _on_main_rank(session, step: Callable[[], Any]) -> Any:
    """step() on the main rank (None elsewhere), its refusal (FinetuneError) raised on every
    rank: one rank raising alone would leave the others waiting for it forever."""
    result, refused = None, None
    if session.main:
        try:
            result = step()
        except FinetuneError as e:
            refused = str(e)
    refused = session.broadcast(refused)  # also the barrier after the main rank's step
    if refused:
        raise FinetuneError(refused)
    return result


def _same_as_checkpoint(r: _Run, key: str, now: str, what: str) -> None:
    """--resume continues the interrupted run only on the same data and model: the options are
    compared by RunConfig.from_args, these by their fingerprints (checkpoints from before the
    fingerprints have none, and are taken on trust as before)."""
    was = r.saved_state.get(key)
    if was is not None and was != now:
        raise FinetuneError(f"--resume: {what} differ from what the checkpoint {r.ckpt} trained on; resume with the "
                            f"same, or start a new run")


def _model_fingerprint(model_dir) -> str:
    """The model folder's config and the names and sizes of its files (hashing gigabytes of
    weights at every start is not worth it: a changed checkpoint changes its size or config)."""
    import hashlib

    root = Path(model_dir)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(root)}\0{p.stat().st_size}\n".encode())
    config = root / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    return h.hexdigest()


def _check_dropout_masks(ckpt, state: dict, cfg: RunConfig) -> None:
    """A resumed run must draw the dropout masks the way the interrupted one did, or it
    would not continue it bit for bit. Checkpoints from before the native masks (no entry)
    drew torch's."""
    from .. import _env

    was, now = state.get("dropout_rng", "torch"), _env.dropout_rng()
    if cfg.dropout > 0 and was != now:
        raise FinetuneError(f"--resume: the checkpoint {ckpt} drew its LoRA dropout masks with "
                            f"{_env.DROPOUT}={was} and this process would use {now}; set {_env.DROPOUT}={was} "
                            f"to continue it")


def _select_backend(cfg: RunConfig) -> None:
    import torch

    import qlora_kernels as qk

    try:
        qk.set_backend(cfg.backend)
    except (RuntimeError, ValueError) as e:
        raise FinetuneError(f"--backend {cfg.backend}: {str(e).split(': ', 1)[-1]}") from None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def _load_model_and_data(r: _Run) -> None:
    """The model (SmolLM2's one-time GGUF conversion included), the tokenized examples, the
    adapters, the optimizer and the data-parallel wrapping."""
    import numpy as np
    import torch

    from . import data, model as M, train as T

    cfg, t_load = r.cfg, time.perf_counter()
    r.model_dir = M.default_model_dir() if cfg.model is None else M.check_model_dir(cfg.model)
    r.model_sha256 = _model_fingerprint(r.model_dir)
    if r.saved_state is not None:
        _same_as_checkpoint(r, "model_sha256", r.model_sha256, f"the model's files ({r.model_dir})")
    base, r.tok = M.load(r.model_dir)
    r.had_template = data.ensure_chat_template(r.tok)
    overhead = data.template_overhead(r.tok)
    if cfg.seq_len <= overhead + 1:
        raise FinetuneError(f"--seq-len {cfg.seq_len} is shorter than the prompt template itself "
                            f"({overhead} tokens around an empty prompt and reply; use more than {overhead + 1})")
    r.train_ex = data.encode_all(r.tok, r.train_recs, cfg.seq_len, "training")
    r.eval_ex = data.encode_all(r.tok, r.eval_recs, cfg.seq_len, "held-out")
    if cfg.steps is None:
        cfg.steps = max(1, math.ceil(cfg.epochs * len(r.train_ex) / (cfg.batch_size * cfg.grad_accum)))
    r.warmup = cfg.warmup if cfg.warmup is not None else max(1, round(0.05 * cfg.steps))

    torch.manual_seed(cfg.seed)  # LoRA's A matrices are drawn in prepare()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    r.targets = M.find_targets(base)
    r.pm = M.prepare(base, cfg.method, cfg.rank, cfg.alpha, cfg.dropout, r.targets)
    r.load_seconds = time.perf_counter() - t_load
    r.opt, r.sched = T.make_optimizer(r.pm, cfg.lr, cfg.steps, r.warmup)
    r.train_model, wrapped_opt = r.session.wrap(r.pm, r.opt, cfg.batch_size, cfg.grad_accum)
    if wrapped_opt is not r.opt:  # FSDP2 replaced the parameters
        r.opt = wrapped_opt
        r.sched = torch.optim.lr_scheduler.LambdaLR(wrapped_opt, T.lr_lambda(cfg.steps, r.warmup))


def _model_name(cfg: RunConfig) -> str:
    return "SmolLM2-135M-Instruct" if cfg.model is None else Path(cfg.model).name


def _announce(r: _Run) -> None:
    import torch

    from . import model as M, report

    cfg, session = r.cfg, r.session
    trainable, total = M.count_params(r.pm)
    skipped = len(r.train_recs) + len(r.eval_recs) - len(r.train_ex) - len(r.eval_ex)
    info = report.backend_info(cfg.backend)
    print(f"model: {_model_name(cfg)} ({(total - trainable) / 1e6:.1f}M parameters) from {r.model_dir}")
    print(f"method: {cfg.method} ({'NF4 base' if cfg.method != 'lora' else 'fp32 base'}), r={cfg.rank} "
          f"alpha={cfg.alpha:g} dropout={cfg.dropout:g} on {','.join(r.targets)}: {trainable / 1e6:.2f}M trainable")
    print(f"backend: {cfg.backend}" + (f" ({info['cpu_path']})" if "cpu_path" in info else "") +
          f", {torch.get_num_threads()} threads")
    print(f"data: {r.data_name}: {len(r.records)} unique examples ({r.dups} duplicates dropped) -> "
          f"{len(r.train_ex)} train, {len(r.eval_ex)} held-out" +
          (f" ({skipped} skipped: prompt longer than --seq-len)" if skipped else "") +
          ("" if r.had_template else "; plain fallback template (the tokenizer has none)"))
    if session.on:
        print(f"distributed: {session.mode}, {session.world} processes (gloo), "
              f"{cfg.batch_size // session.world} examples per process per micro-batch")
    print(f"training: {cfg.steps} steps x {cfg.batch_size} x {cfg.grad_accum} examples, seq-len "
          f"{cfg.seq_len}, lr {cfg.lr:g} (warm-up {r.warmup}, cosine), seed {cfg.seed}; output {r.out}")


def _begin(r: _Run) -> None:
    """The resumed state, or a fresh one with the held-out loss and samples before training."""
    from .. import _env
    from . import checkpoint, report, train as T

    cfg, show = r.cfg, r.eval_ex[:r.cfg.samples]
    if r.saved_state is not None:
        checkpoint.restore(r.ckpt, r.pm, r.opt, r.sched, r.session)
        state = r.saved_state
        state["engine"] = checkpoint.engine_of(r.session)
        state["config"] = cfg.as_dict()
        state.setdefault("resumed_from", []).append(state["step"])
        print(f"resuming at step {state['step']}/{cfg.steps} from {r.ckpt}")
        print(f"held-out loss before: {state['eval_before']['loss']:.4f} (from the checkpoint)")
    else:
        state = {"format": 1, "step": 0, "losses": [], "tokens_trained": 0, "train_seconds": 0.0,
                 "config": cfg.as_dict(), "engine": checkpoint.engine_of(r.session), "dropout_rng": _env.dropout_rng(),
                 "data_sha256": r.data_sha256, "model_sha256": r.model_sha256}
        state["eval_before"] = T.heldout_loss(r.pm, r.eval_ex, cfg.batch_size, r.tok.pad_token_id)
        print(f"held-out loss before: {state['eval_before']['loss']:.4f} "
              f"({state['eval_before']['tokens']} reply tokens)")
        state["samples_before"] = T.samples(r.pm, r.tok, show, cfg.max_new_tokens) if show else []
        if show:
            print(report.format_samples("samples before:", state["samples_before"]))
    r.state = state


def _finish(r: _Run) -> int:
    """The held-out loss and samples after training, the adapter, metrics.json and the plot."""
    from . import checkpoint, model as M, report, train as T

    cfg, state, out = r.cfg, r.state, r.out
    show = r.eval_ex[:cfg.samples]
    after = T.heldout_loss(r.pm, r.eval_ex, cfg.batch_size, r.tok.pad_token_id)
    before = state["eval_before"]["loss"]
    print(f"held-out loss after: {after['loss']:.4f} (before {before:.4f}, {after['loss'] - before:+.4f})")
    samples_after = T.samples(r.pm, r.tok, show, cfg.max_new_tokens) if show else []
    if show:
        print(report.format_samples("samples after:", samples_after))

    if r.session.on:
        from ..integrations.distributed import adapter_state_dict

        adapters = adapter_state_dict(r.pm)  # collective: FSDP2 and ZeRO-3 gather the shards
        if not r.session.main:
            return 0
        written = checkpoint.save_adapter(r.pm, out, state_dict=adapters)
    else:
        written = checkpoint.save_adapter(r.pm, out)
    trainable, total = M.count_params(r.pm)
    rate = state["tokens_trained"] / max(1e-9, state["train_seconds"])
    extra = {"model_dir": str(r.model_dir), "data_name": r.data_name, "targets": r.targets, "warmup": r.warmup,
             "trainable_parameters": trainable, "parameters": total,
             "examples": {"unique": len(r.records), "duplicates_dropped": r.dups, "train": len(r.train_ex),
                          "heldout": len(r.eval_ex)},
             "seconds": {"model_load_and_prepare": round(r.load_seconds, 3),
                         "this_process": round(time.perf_counter() - r.t_start, 3)}}
    m = report.metrics(cfg.as_dict(), state, after, samples_after, extra)
    report.write_metrics(out, m)
    report.plot(out, state["losses"], before, after["loss"], f"{_model_name(cfg)}, {cfg.method}, {cfg.backend} backend")
    print(f"trained {state['tokens_trained']} tokens in {state['train_seconds']:.1f} s ({rate:.0f} tokens/s); "
          f"peak RSS {report.rss_mb(state.get('peak_rss_kb', 0))}; "
          f"{time.perf_counter() - r.t_start:.0f} s in all")
    print(f"wrote {out}/: {', '.join(written)}, {report.METRICS}, {report.PLOT}, checkpoint/")
    return 0
