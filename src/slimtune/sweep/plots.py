"""Sweep plots (PNG, matplotlib through optuna.visualization.matplotlib).

    history.png        objective per trial and the best so far
    importances.png    parameter importances (fANOVA; needs a few completed trials that differ)
    parallel.png       parallel coordinates: every trial's parameters and objective
    intermediate.png   each trial's evaluations: where the pruned ones stopped

A plot that cannot be drawn (too few trials, one distinct value) is skipped and plots.txt says why.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure


def _save(fig: Figure, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_plots(study: optuna.Study, sweep_dir: Path, metric: str,
                intermediate_label: str | None = None) -> dict[str, str]:
    """{plot name: file name or the reason it was skipped}; the reasons also go to plots.txt."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
    except ImportError as e:
        note = f"no plots: {e} (pip install matplotlib)"
        (Path(sweep_dir) / "plots.txt").write_text(note + "\n", encoding="utf-8")
        return {"all": note}
    drawn, notes = _draw(_drawings(study, ovm, metric, intermediate_label), Path(sweep_dir), plt)
    notes_path = Path(sweep_dir) / "plots.txt"
    if notes:
        notes_path.write_text("\n".join(notes) + "\n", encoding="utf-8")
    else:
        notes_path.unlink(missing_ok=True)
    return drawn


def _drawings(study: optuna.Study, ovm: ModuleType, metric: str,
              intermediate_label: str | None) -> dict[str, Callable[[], Any]]:
    """Plot name -> a function drawing it (its axes), or raising ValueError saying why it cannot be drawn."""
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    with_steps = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    varied = [k for k in {k for t in complete for k in t.params} if len({repr(t.params.get(k)) for t in complete}) > 1]

    def importances() -> Any:
        if len(complete) < 2 or not varied:
            raise ValueError(f"needs at least 2 completed trials whose parameters differ ({len(complete)} completed)")
        try:
            return ovm.plot_param_importances(study, target_name=metric)
        except ImportError:  # fANOVA's forest needs scikit-learn; PED-ANOVA does not
            from optuna.importance import PedAnovaImportanceEvaluator

            return ovm.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), target_name=metric)

    def needs_complete(draw: Callable[[], Any], n: int = 1) -> Callable[[], Any]:
        def checked() -> Any:
            if len(complete) < n:
                trials = "trials" if n > 1 else "trial"
                raise ValueError(f"needs at least {n} completed {trials} ({len(complete)} completed)")
            return draw()
        return checked

    def intermediate() -> Any:
        if not with_steps:
            raise ValueError("no trial reported an evaluation")
        ax = ovm.plot_intermediate_values(study)
        ax.set_xlabel("evaluation")
        ax.set_ylabel(intermediate_label or metric)
        return ax

    return {
        "history": needs_complete(lambda: ovm.plot_optimization_history(study, target_name=metric)),
        "importances": importances,
        "parallel": needs_complete(lambda: ovm.plot_parallel_coordinate(study, target_name=metric), 2),
        "intermediate": intermediate,
    }


def _draw(drawings: dict[str, Callable[[], Any]], sweep_dir: Path,
          plt: ModuleType) -> tuple[dict[str, str], list[str]]:
    """Each plot saved as <name>.png: ({name: file name or why it was skipped}, the notes for plots.txt)."""
    out, notes = {}, []
    for name, draw in drawings.items():
        path = sweep_dir / f"{name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = getattr(ax, "figure", None) or ax.flat[0].figure
            _save(fig, path)
            plt.close(fig)
            out[name] = path.name
        except Exception as e:  # a plot never fails the sweep
            plt.close("all")
            path.unlink(missing_ok=True)  # a stale plot from an earlier run of the sweep would mislead
            out[name] = f"skipped: {e}"
            notes.append(f"{name}.png skipped: {e}")
    return out, notes
