"""Training data: records from chatterbot-corpus (the default) or a JSONL file, tokenized
with the model's chat template so that only the reply tokens carry labels, a fixed
held-out split, and a batch order that depends on the seed and the position alone (so a
resumed run sees exactly the batches an uninterrupted one would)."""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import FinetuneError

IGNORE = -100  # the label value torch's cross_entropy skips
SPLIT_SEED = 20240611  # the held-out split never moves with --seed: runs stay comparable
DEFAULT_DATA = "chatterbot-corpus (English)"

# For tokenizers without a chat template (base models): a plain one, the reply closed by
# the EOS token so that the model learns to stop.
FALLBACK_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}"
                     "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n\n{% endfor %}"
                     "{% if add_generation_prompt %}### assistant:\n{% endif %}")


@dataclass
class Record:
    """One training example before tokenization: a conversation or a plain text."""
    messages: Optional[list] = None
    text: Optional[str] = None

    def key(self) -> str:
        return json.dumps(self.messages if self.messages is not None else self.text, sort_keys=True)


@dataclass
class Example:
    input_ids: list
    labels: list
    prompt_ids: list = field(default_factory=list)  # what greedy samples continue from
    prompt: str = ""
    reference: str = ""


# -- reading ----------------------------------------------------------------------------------
def chatterbot_records() -> list[Record]:
    """Consecutive (prompt, reply) pairs of every English conversation, as chatterbot's own
    ListTrainer reads them (each line answers the one before)."""
    try:
        import chatterbot_corpus
        import yaml
    except ImportError as e:
        raise FinetuneError(f"the default data needs chatterbot-corpus and PyYAML: "
                            f"pip install chatterbot-corpus==1.3.3 pyyaml ({e})") from None
    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise FinetuneError(f"chatterbot-corpus has no English files in {folder}")
    out = []
    for f in files:
        convs = (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("conversations") or []
        for conv in convs:
            lines = [str(x).strip() for x in conv]
            out += [Record(messages=[{"role": "user", "content": a}, {"role": "assistant", "content": b}])
                    for a, b in zip(lines, lines[1:]) if a and b]
    return out


def _record_from_json(obj, where: str) -> Record:
    if not isinstance(obj, dict):
        raise FinetuneError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if (not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            raise FinetuneError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} strings')
        if not any(m["role"] == "assistant" for m in msgs):
            raise FinetuneError(f'{where}: "messages" has no "assistant" turn to learn from')
        if msgs[0]["role"] == "assistant":
            # a reply needs a prompt before it: the chat template refuses an empty conversation
            raise FinetuneError(f'{where}: "messages" starts with an "assistant" turn; a reply must follow a '
                                f'"user" (or "system") message')
        return Record(messages=[{"role": m["role"], "content": m["content"]} for m in msgs])
    if "prompt" in obj or "response" in obj:
        p, r = obj.get("prompt"), obj.get("response")
        if not isinstance(p, str) or not isinstance(r, str) or not r:
            raise FinetuneError(f'{where}: "prompt" and "response" must both be strings (response non-empty)')
        return Record(messages=[{"role": "user", "content": p}, {"role": "assistant", "content": r}])
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise FinetuneError(f'{where}: "text" must be a non-empty string')
        return Record(text=obj["text"])
    raise FinetuneError(f'{where}: expected "prompt"+"response", "messages" or "text", '
                        f"got keys {sorted(obj)[:6]}")


def jsonl_records(path: str) -> list[Record]:
    p = Path(path)
    if not p.exists():
        raise FinetuneError(f"--data {path}: no such file")
    if not p.is_file():
        raise FinetuneError(f"--data {path}: not a file")
    out = []
    try:
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FinetuneError(f"--data {path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
                out.append(_record_from_json(obj, f"--data {path} line {n}"))
    except UnicodeDecodeError as e:
        raise FinetuneError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise FinetuneError(f"--data {path}: cannot read ({e.strerror})") from None
    if not out:
        raise FinetuneError(f"--data {path}: the file is empty (no JSON lines)")
    return out


def load_records(data: Optional[str]) -> tuple[list[Record], str, int]:
    """(unique records in file order, a description, how many duplicates were dropped).
    Duplicates go: chatterbot's tech_support file repeats most pairs, and a copy of a
    training pair in the held-out set would flatter the held-out loss."""
    records = chatterbot_records() if data is None else jsonl_records(data)
    seen, unique = set(), []
    for r in records:
        k = r.key()
        if k not in seen:
            seen.add(k)
            unique.append(r)
    return unique, DEFAULT_DATA if data is None else os.fspath(data), len(records) - len(unique)


def fingerprint(records: list) -> str:
    """What the run trains and evaluates on, as one hash (a resumed run must see the same)."""
    h = hashlib.sha256()
    for r in records:
        h.update(r.key().encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def split(records: list, eval_size: Optional[int], data_name: str = "the data") -> tuple[list, list]:
    """(train, held-out): a permutation with a fixed seed; by default 5% held out (1 to 64)."""
    n = len(records)
    k = eval_size if eval_size is not None else min(64, max(1, round(0.05 * n)))
    if n < 2 or k < 1 or k >= n:
        raise FinetuneError(f"{data_name} has {n} unique example(s): need at least 2, and fewer held out ({k}) "
                            f"than that")
    order = list(range(n))
    random.Random(SPLIT_SEED).shuffle(order)
    return [records[i] for i in order[k:]], [records[i] for i in order[:k]]


# -- tokenization -----------------------------------------------------------------------------
def ensure_chat_template(tok) -> bool:
    """Give a tokenizer without a chat template the plain fallback; True when it had one."""
    if getattr(tok, "chat_template", None):
        return True
    tok.chat_template = FALLBACK_TEMPLATE
    return False


def _render(tok, messages, gen: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _ids(tok, text: str) -> list:
    # The template already holds every special token as text; adding BOS again would double it.
    return tok(text, add_special_tokens=False)["input_ids"]


def template_overhead(tok) -> int:
    """Tokens of the template around an empty prompt and an empty reply."""
    return len(_ids(tok, _render(tok, [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], False)))


def encode(tok, rec: Record, seq_len: int) -> Optional[Example]:
    """Token ids and labels (-100 except on assistant turns); None when the first reply
    would not start within seq_len tokens. Each turn is rendered as the template renders
    the conversation up to it, so the masked part is exactly what the model is given."""
    if rec.text is not None:
        ids = (_ids(tok, rec.text) + ([tok.eos_token_id] if tok.eos_token_id is not None else []))[:seq_len]
        half = max(1, len(ids) // 2)
        return Example(ids, list(ids), ids[:half], tok.decode(ids[:half]), tok.decode(ids[half:]))
    ids, labels, done, first_prompt = [], [], "", None
    for i, m in enumerate(rec.messages):
        if m["role"] != "assistant":
            continue
        prefix, full = _render(tok, rec.messages[:i], True), _render(tok, rec.messages[:i + 1], False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise FinetuneError("the tokenizer's chat template does not render a conversation turn by turn "
                                "(a prefix changes later): cannot tell prompt tokens from reply tokens")
        p = _ids(tok, prefix[len(done):])
        ids += p
        labels += [IGNORE] * len(p)
        if first_prompt is None:
            first_prompt = list(ids)
            reference = m["content"]
        r = _ids(tok, full[len(prefix):])
        ids += r
        labels += r
        done = full
    if first_prompt is None or len(first_prompt) >= seq_len:
        return None
    user = [m["content"] for m in rec.messages if m["role"] == "user"]
    return Example(ids[:seq_len], labels[:seq_len], first_prompt, user[0] if user else "", reference)


def encode_all(tok, records: list, seq_len: int, what: str) -> list:
    out = [e for e in (encode(tok, r, seq_len) for r in records) if e is not None]
    if not out:
        raise FinetuneError(f"--seq-len {seq_len}: no {what} example fits (every prompt is longer); raise --seq-len")
    return out


# -- batches ----------------------------------------------------------------------------------
def collate(examples: list, pad_id: int) -> dict:
    """Right-padded to the longest example of the batch (not to --seq-len: short chat pairs
    would otherwise spend most of the compute on padding); padding is masked and unlabelled."""
    L = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Order:
    """Example at a global position: epoch e reads a permutation drawn from (seed, e). No
    state but the position, so resuming needs nothing more than the step number."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._cache = n, seed, {}

    def __getitem__(self, pos: int) -> int:
        epoch, i = divmod(pos, self.n)
        if epoch not in self._cache:
            self._cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._cache[epoch][i])

    def batch(self, start: int, size: int) -> list:
        return [self[p] for p in range(start, start + size)]
