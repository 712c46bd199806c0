"""``qlora-kernels generate --genai DIR --prompt TEXT``: a chat answer from an exported model
folder in ONNX Runtime GenAI, streamed token by token, with one of its adapters active."""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import GENAI_ADAPTER_SUFFIX as ADAPTER_SUFFIX
from ..errors import ExportError


@dataclass
class Generation:
    text: str
    tokens: list
    prompt_tokens: int
    prompt_seconds: float
    decode_seconds: float


def _adapter_file(folder: Path, adapter: str) -> Path:
    p = Path(adapter)
    if p.suffix == ADAPTER_SUFFIX and p.is_file():
        return p
    f = folder / "adapters" / f"{adapter}{ADAPTER_SUFFIX}"
    if not f.is_file():
        have = sorted(x.name[:-len(ADAPTER_SUFFIX)] for x in (folder / "adapters").glob(f"*{ADAPTER_SUFFIX}"))
        raise ExportError(f"adapter {adapter!r}: no {f} (this folder has: {', '.join(have) or 'no adapters'})")
    return f


def generate(folder, prompt: str, adapter: str | None = None, max_new_tokens: int = 128, chat: bool = True,
             on_text: Callable[[str], None] | None = None) -> Generation:
    """Greedy (or as genai_config.json's search says) generation in ONNX Runtime GenAI."""
    import onnxruntime_genai as og

    folder = Path(folder)
    if not (folder / "genai_config.json").is_file():
        raise ExportError(f"--genai {folder}: no genai_config.json (write one with qlora-kernels export --genai)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ExportError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    # checked before the model loads: GenAI's own failures here are bare RuntimeErrors
    missing = [f for f in ("tokenizer.json", "tokenizer_config.json") if not (folder / f).is_file()]
    if missing:
        raise ExportError(f"--genai {folder}: no tokenizer ({', '.join(missing)} missing); export again with a "
                          "tokenizer (export_genai(..., tokenizer=...), or from a model folder that has one)")
    adapter_file = _adapter_file(folder, adapter) if adapter else None
    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    if chat:
        try:
            text = tok.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]),
                                           add_generation_prompt=True)
        except RuntimeError as e:  # GenAI says only "Empty chat template." (a base model's tokenizer)
            raise ExportError(f"--genai {folder}: the tokenizer has no chat template ({e}); send the prompt as it "
                              "is with --raw (chat=False)") from None
    else:
        text = prompt
    ids = tok.encode(text)
    # GenAI refuses a max_length past the model's context (a bare RuntimeError): the answer
    # is cut at the context instead, and only a prompt that leaves no room is refused
    context = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]["context_length"]
    if len(ids) >= context:
        raise ExportError(f"--prompt is {len(ids)} tokens and the model's context_length is {context}: no room "
                          "for an answer")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=min(len(ids) + max_new_tokens, context))
    gen = og.Generator(model, params)
    adapters = None
    if adapter:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), adapter)
        gen.set_active_adapter(adapters, adapter)
    stream = tok.create_stream()
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    t1 = time.perf_counter()
    out, pieces = [], []
    while not gen.is_done():
        gen.generate_next_token()
        t = int(gen.get_next_tokens()[0])
        out.append(t)
        piece = stream.decode(t)
        pieces.append(piece)
        if on_text is not None and piece:
            on_text(piece)
    t2 = time.perf_counter()
    return Generation("".join(pieces), out, len(ids), t1 - t0, t2 - t1)


def add_parser(sub):
    g = sub.add_parser("generate", help="chat with a model folder written by export --genai (ONNX Runtime GenAI)",
                       description="Streams the answer to --prompt from an ONNX Runtime GenAI model folder, with one "
                                   "of its switchable adapters active.")
    a = g.add_argument
    a("--genai", required=True, metavar="DIR", help="the folder qlora-kernels export --genai wrote")
    a("--prompt", required=True, help="the user message")
    a("--adapter", metavar="NAME", help="activate DIR/adapters/NAME.onnx_adapter (or give a .onnx_adapter file)")
    a("--max-new-tokens", type=int, default=128, help="at most this many new tokens (default 128)")
    a("--raw", action="store_true", help="send the prompt as it is, without the chat template")
    a("--debug", action="store_true", help="show tracebacks")
    g.set_defaults(func=main)
    return g


def run(args) -> int:
    def show(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    r = generate(args.genai, args.prompt, adapter=args.adapter, max_new_tokens=args.max_new_tokens,
                 chat=not args.raw, on_text=show)
    sys.stdout.write("\n")
    rate = len(r.tokens) / r.decode_seconds if r.decode_seconds > 0 else float("inf")
    print(f"[{r.prompt_tokens} prompt tokens in {r.prompt_seconds:.2f} s, {len(r.tokens)} new tokens at "
          f"{rate:.1f} tokens/s]", file=sys.stderr)
    return 0


def main(args) -> int:
    from ...._errors import one_line_errors

    return one_line_errors("generate", run, args, (ExportError,))
