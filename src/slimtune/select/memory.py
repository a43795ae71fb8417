"""Which candidates fit in select.memory: `slimtune inspect`'s estimate of the training memory (built on the meta
device from the model's config: no weights are loaded), at the config's train.batch_size x the largest input a
training example gives the model (model.max_length tokens; for images the side training resizes to, the largest
of progressive resizing included), with train.gradient_checkpointing's checkpointed figure when it is on. The
estimate is at the method's default options (inspect's table), so a config's own larger rank costs a little more
than it says."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import RunConfig
from ..config.sections import is_factory_spec
from ..errors import SlimtuneError
from .plan import Candidate

Log = Callable[[str], Any]


def _mb(value: int) -> str:
    return f"{value / 2**20:,.1f} MB"


def estimates(cfg: RunConfig, candidates: list[Candidate], num_labels: int) -> dict[str, dict[str, Any]]:
    """Per candidate label: {"bytes": estimated training memory or None, "note": why there is none}."""
    from ..inspect import inspect_model
    from ..models import resolve
    from ..tasks import get_task

    task = get_task(cfg.task)
    out: dict[str, dict[str, Any]] = {}
    for model in dict.fromkeys(c.model for c in candidates):
        methods = [c.method for c in candidates if c.model == model]
        if is_factory_spec(model):  # user code: inspect builds models from configs on the meta device
            out.update({Candidate(model, m).label: {"bytes": None, "note": "no estimate: a model.factory model is "
                        "built by its own code, which inspect does not run"} for m in methods})
            continue
        try:
            size = task.largest_input(cfg, resolve(model))  # tokens, or an image task's side (inspect reads which)
            report = inspect_model(model, task=cfg.task, batch_size=cfg.train.batch_size, seq_len=size,
                                   image_size=size, num_labels=max(2, num_labels), methods=methods,
                                   trust_remote_code=cfg.model.trust_remote_code)
            rows = {row["method"]: row for row in report["methods"]}
        except Exception as e:  # a model inspect cannot build on meta (an image task, custom code): the estimate is
            # advice, so the candidate races without one and the summary says why
            kind = "" if isinstance(e, SlimtuneError) else f"{type(e).__name__}: "
            rows = {m: {"method": m, "error": kind + (str(e).splitlines() or [""])[0][:200]} for m in methods}
        for method in methods:
            out[Candidate(model, method).label] = _estimate(rows[method], cfg.train.gradient_checkpointing)
    return out


def _estimate(row: dict[str, Any], checkpointing: object) -> dict[str, Any]:
    if "error" in row:
        return {"bytes": None, "note": f"no estimate: {row['error']}"}
    if checkpointing and row.get("checkpointed_train_memory_bytes") is not None:
        return {"bytes": row["checkpointed_train_memory_bytes"], "note": "with gradient checkpointing"}
    return {"bytes": row["train_memory_bytes"], "note": row.get("note")}


def too_big(estimate: dict[str, Any], limit: int | None, memory: str | None) -> str | None:
    """The reason a candidate is dropped, or None when it fits (or has no estimate to judge by)."""
    if limit is None or estimate.get("bytes") is None or estimate["bytes"] <= limit:
        return None
    return (f"estimated training memory {_mb(estimate['bytes'])} exceeds --memory {memory} ({_mb(limit)}) "
            f"(slimtune inspect's estimate)")
