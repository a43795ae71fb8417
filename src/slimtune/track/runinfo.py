"""Reading a run folder back: what the index, `slimtune runs` and the reports need.

A run folder may come from another machine, be half-written by a crash or be edited by
hand: every problem is a `RunFolderError` whose message names the folder and the file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import RunFolderError


def config_hash(config: dict) -> str:
    """sha256 of the resolved config without `output` and `track` (where a run is written and
    what watches it do not change what it computes): equal hashes, same experiment."""
    keep = {k: v for k, v in config.items() if k not in ("output", "track")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def flat(d: dict | None, prefix: str = "") -> dict:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; lists stay values."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def flat_metrics(summary: dict) -> dict:
    """best / final / test metric dicts -> best_accuracy, final_loss, test_macro_f1, ..."""
    out = {}
    for part in ("best", "final", "test"):
        for k, v in (summary.get(part) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{part}_{k}"] = v
    return out


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); the file is damaged") from None
    except UnicodeDecodeError:
        raise RunFolderError(f"{path}: not UTF-8 text; the file is damaged") from None
    except OSError as e:  # permissions, a vanished mount: the folder is named, not a traceback
        raise RunFolderError(f"{path}: cannot be read ({e.strerror or e})") from None


@dataclass
class RunInfo:
    path: Path
    config: dict
    summary: dict
    metrics: list[dict] = field(default_factory=list)   # metrics.jsonl records
    confusion: dict | None = None                        # confusion_matrix.json
    figures: dict | None = None                          # eval_figures.json (the task's tables / scatter plots)
    generations: list[dict] = field(default_factory=list)  # generations.jsonl (eval.generate's samples)
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        return self.summary.get("status", "unknown")

    @property
    def monitor(self) -> str | None:
        return self.summary.get("monitor") or (self.config.get("eval") or {}).get("monitor")

    @property
    def cost(self) -> dict:
        return self.summary.get("cost") or {}


def is_run_folder(path: Path) -> bool:
    return (Path(path) / "config.yaml").is_file()


def _yaml_mapping(path: Path):
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return None
    return doc if isinstance(doc, dict) else None


def not_deletable(path: str | Path, kind: str) -> str | None:
    """Why `path` is not verifiably a folder slimtune wrote, or None when it is: a sweep's (sweep.yaml
    with a sweep section, and its study.db or a storage named there) or a run's (config.yaml with a
    task and a model, and summary.json or meta.json). An index row can name any folder (a copied
    run's track.sweep, `runs add`), so `slimtune runs rm` deletes only what passes this check."""
    path = Path(path)
    if path.is_symlink():
        return "it is a symbolic link (delete the link, or the folder it points to, by hand)"
    if not path.is_dir():
        return "not a folder"
    if kind == "sweep":
        if not (path / "sweep.yaml").is_file():
            return "no sweep.yaml in it: not a sweep folder"
        sw = (_yaml_mapping(path / "sweep.yaml") or {}).get("sweep")
        if not isinstance(sw, dict):
            return "its sweep.yaml is not a sweep config (no sweep section)"
        if not (path / "study.db").is_file() and not sw.get("storage"):
            return "no study.db in it, and its sweep.yaml names no other study storage"
        return None
    if not (path / "config.yaml").is_file():
        return "no config.yaml in it: not a run folder"
    cfg = _yaml_mapping(path / "config.yaml")
    if cfg is None or "task" not in cfg or "model" not in cfg:
        return "its config.yaml is not a slimtune run config (no task / model)"
    if not (path / "summary.json").is_file() and not (path / "meta.json").is_file():
        return "no summary.json or meta.json in it: not a run folder slimtune wrote"
    return None


def run_folders_in(folder: str | Path) -> list[Path]:
    """The run folders inside a folder of runs (an output.dir, a sweep): its subfolders that are
    runs, and those one level further down (a sweep's trials/trial-0007)."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if is_run_folder(p):
            out.append(p)
        else:
            out += sorted(q for q in p.iterdir() if q.is_dir() and is_run_folder(q))
    return out


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file, in order; [] when there is none. A line a crash cut short (or that a
    hand edit broke) is left out rather than failing the run folder."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_run(path: str | Path, records: bool = False) -> RunInfo:
    """The run folder's config and summary (and, with `records`, metrics / confusion matrix / meta)."""
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"{path}: folder not found (deleted or moved?)")
    if not path.is_dir():
        raise RunFolderError(f"{path}: not a folder")
    cfg_path = path / "config.yaml"
    if not cfg_path.is_file():
        raise RunFolderError(f"{path}: not a run folder (no config.yaml)")
    try:
        config = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{cfg_path}: not valid YAML ({str(e).splitlines()[0]}); the file is damaged") from None
    except OSError as e:
        raise RunFolderError(f"{cfg_path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(config, dict) or "task" not in config or "model" not in config:
        raise RunFolderError(f"{cfg_path}: not a slimtune run config (no task / model)")
    summary_path = path / "summary.json"
    if summary_path.is_file():
        summary = _read_json(summary_path)
        if not isinstance(summary, dict):
            raise RunFolderError(f"{summary_path}: expected a JSON object")
    else:  # the run stopped before training began (or is about to begin)
        summary = {"status": "not started"}
    info = RunInfo(path, config, summary)
    if records:
        info.metrics = read_metrics(path / "metrics.jsonl")
        if (path / "confusion_matrix.json").is_file():
            info.confusion = _read_json(path / "confusion_matrix.json")
        if (path / "eval_figures.json").is_file():
            info.figures = _read_json(path / "eval_figures.json")
        info.generations = [r for r in read_metrics(path / "generations.jsonl") if isinstance(r.get("step"), int)]
        if (path / "meta.json").is_file():
            info.meta = _read_json(path / "meta.json")
    return info
