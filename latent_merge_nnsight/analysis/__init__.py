"""Analysis of latent merges: representation geometry, layer x alpha sweeps, and their figures.

    import latent_merge_nnsight as lmn
    from latent_merge_nnsight import analysis

    rep = analysis.representations(base, ft, lmn.Recipe(op="slerp", layers={4: 0.5}), prompts,
                                   weight_merged=weight_avg)        # per-layer CKA / midness, tidy
    analysis.summarize(rep)                                           # the paper's latent-vs-weight table
    df = analysis.sweep(base, ft, ops=["lerp", "slerp"], layers=[2, 3, 4], alphas=[0.25, 0.5, 0.75],
                        evaluate=analysis.Perplexity(), prompts=texts, out="runs/sweep.jsonl")
    analysis.heatmaps(df, "nll", path="runs/nll.png")

- `representations`, `summarize`: Experiment B (how merged states relate to base and FT per layer).
- `sweep`, `best_cells`, evaluators `Perplexity`, `TaskAccuracy` and `LmEvalTasks` (lm-eval tasks, with
  `prompts=None`): Experiment C (quality over the grid), resumable from a JSONL file.
- `search`, `SearchSpace`: an Optuna search of merge schedules under constraints, resumable from SQLite;
  `pareto_front`, `pareto_figure`: the trade-off of two metrics as a table and one figure.
- `heatmaps`, `geometry_curves`, `category_bars`: matplotlib figures of both, optionally saved as PNG.
"""

from typing import TYPE_CHECKING, Any

from latent_merge_nnsight.analysis.evaluators import Perplexity as Perplexity
from latent_merge_nnsight.analysis.evaluators import TaskAccuracy as TaskAccuracy
from latent_merge_nnsight.analysis.pareto import pareto_figure as pareto_figure
from latent_merge_nnsight.analysis.pareto import pareto_front as pareto_front
from latent_merge_nnsight.analysis.representations import representations as representations
from latent_merge_nnsight.analysis.representations import summarize as summarize
from latent_merge_nnsight.analysis.search import SearchResult as SearchResult
from latent_merge_nnsight.analysis.search import SearchSpace as SearchSpace
from latent_merge_nnsight.analysis.search import search as search
from latent_merge_nnsight.analysis.sweep import best_cells as best_cells
from latent_merge_nnsight.analysis.sweep import sweep as sweep

if TYPE_CHECKING:
    from latent_merge_nnsight.analysis.lm_eval_tasks import LmEvalTasks as LmEvalTasks
    from latent_merge_nnsight.analysis.plots import category_bars as category_bars
    from latent_merge_nnsight.analysis.plots import geometry_curves as geometry_curves
    from latent_merge_nnsight.analysis.plots import heatmaps as heatmaps
    from latent_merge_nnsight.analysis.plots import system_labels as system_labels

_PLOTS = ("category_bars", "geometry_curves", "heatmaps", "system_labels")


def __getattr__(name: str) -> Any:
    """The plot functions load matplotlib on first use, and `LmEvalTasks` its module (which needs the
    `lmeval` extra only when an evaluator is made), so `import latent_merge_nnsight` stays light."""
    if name in _PLOTS:
        from latent_merge_nnsight.analysis import plots

        return getattr(plots, name)
    if name == "LmEvalTasks":
        from latent_merge_nnsight.analysis.lm_eval_tasks import LmEvalTasks

        return LmEvalTasks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LmEvalTasks",
    "Perplexity",
    "SearchResult",
    "SearchSpace",
    "TaskAccuracy",
    "best_cells",
    "category_bars",
    "geometry_curves",
    "heatmaps",
    "pareto_figure",
    "pareto_front",
    "representations",
    "search",
    "summarize",
    "sweep",
    "system_labels",
]
