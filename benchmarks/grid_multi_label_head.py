"""The grid behind the multi-label head's defaults (benchmarks/RESULTS.md, "The multi-label head's defaults").

slimtune.run on Banking77 intent sets (bench_multi_label.write_splits), MiniLM, train.lr / train.head_lr per
variant; `prior: False` replaces tasks.multi_label.prior_bias with a no-op (the zero-centred bias of before).
Settings are `intents:epochs:draw`. Results are merged into OUT (a JSON file), one key per setting / variant.

    flock /tmp/slimtune-bench.lock python benchmarks/grid_multi_label_head.py OUT A,D,B,G,C,F,H 12:2:0,12:2:1,40:3:0
"""
from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DATASETS = ROOT.parent / "shared" / "datasets"
HEAD_10X = {"A": 5e-3, "C": 2e-2, "H": 2e-2}  # the old default head rate at that lr (10x, at most 2e-2)
VARIANTS = {"A": {"lr": 5e-4, "prior": False}, "D": {"lr": 5e-4, "head_lr": 5e-3},
            "B": {"lr": 5e-4, "head_lr": 2e-2, "prior": False}, "G": {"lr": 5e-4},
            "C": {"lr": 2e-3, "prior": False}, "F": {"lr": 2e-3}, "H": {"lr": 4e-3, "prior": False}}


def main(out: Path, variants: list[str], settings: list[str]) -> None:
    import slimtune
    from slimtune.tasks import multi_label

    spec = importlib.util.spec_from_file_location("bench_multi_label", ROOT / "benchmarks" / "bench_multi_label.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    prior_bias = multi_label.prior_bias
    res = json.loads(out.read_text()) if out.exists() else {}
    for setting in settings:
        n_intents, epochs, draw = map(int, setting.split(":"))
        tmp = Path(tempfile.mkdtemp())
        files = bench.write_splits(DATASETS / "banking77", tmp, n_intents=n_intents, seed=draw)
        for v in variants:
            train = dict(VARIANTS[v])
            multi_label.prior_bias = prior_bias if train.pop("prior", True) else (lambda *a: False)
            train.setdefault("head_lr", HEAD_10X.get(v, 2e-2))
            r = slimtune.run({"task": "multi-label-classification", "model": {"name": bench.MINILM, "max_length": 64},
                              "data": {"train": files["train"], "eval": files["eval"], "test": files["test"]},
                              "train": {"epochs": epochs, **train}, "track": {"energy": False, "index": False},
                              "output": {"dir": str(tmp / "runs"), "name": v, "save_checkpoints": False}})
            res[f"{setting}/{v}"] = {k: round(x, 4) for k, x in r.test_metrics.items() if "f1" in k}
            print(setting, v, res[f"{setting}/{v}"], flush=True)
            out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(","))
