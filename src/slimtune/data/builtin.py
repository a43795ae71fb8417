"""Real datasets that pip packages ship, so a fresh machine can fine-tune offline.

`chatterbot-topics`: the English ChatterBot corpus (BSD, `pip install
chatterbot-corpus`): each conversation's opening line labelled with its topic
file (ai, coding, emotion, ...); topics with fewer than 10 conversations are
dropped so every class can be split. `chatterbot-chat`: the same conversations as
chat records (`messages` with user / assistant turns) for causal-LM fine-tuning.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from datasets import Dataset

from ..errors import DataError

MIN_TOPIC = 10


def _chatterbot_files() -> list[Path]:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise DataError("builtin:chatterbot-*: the package is not installed; run `pip install chatterbot-corpus`")
    return sorted((Path(spec.origin).parent / "data" / "english").glob("*.yml"))


def _conversations():
    import yaml

    for f in _chatterbot_files():
        doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                yield f.stem.replace("_", " "), turns


def chatterbot_topics() -> Dataset:
    seen: dict[str, set] = {}
    for topic, turns in _conversations():  # the corpus repeats openers; keep each (text, topic) once
        seen.setdefault(turns[0], set()).add(topic)
    rows = [(text, next(iter(t))) for text, t in seen.items() if len(t) == 1]  # drop texts with conflicting topics
    counts: dict[str, int] = {}
    for _, t in rows:
        counts[t] = counts.get(t, 0) + 1
    rows = [r for r in rows if counts[r[1]] >= MIN_TOPIC]
    return Dataset.from_dict({"text": [r[0] for r in rows], "label": [r[1] for r in rows]})


def chatterbot_chat() -> Dataset:
    records = []
    for _, turns in _conversations():
        roles = ["user", "assistant"] * len(turns)
        if len(turns) % 2:  # end on an assistant turn
            turns = turns[:-1]
        records.append([{"role": r, "content": t} for r, t in zip(roles, turns)])
    return Dataset.from_dict({"messages": records})


BUILTINS = {"chatterbot-topics": chatterbot_topics, "chatterbot-chat": chatterbot_chat}


def load_builtin(name: str) -> Dataset:
    if name not in BUILTINS:
        raise DataError(f"builtin:{name}: unknown builtin dataset; accepted: "
                        f"{', '.join('builtin:' + n for n in BUILTINS)}")
    return BUILTINS[name]()
