"""`lmn demo`: the paper's Experiment A in miniature on the shipped toy pair (`run`): its grid (`grid`), run
in per-row passes (`passes`), its checks (`checks`), report (`report`) and figures (`figures`), and the
probe that measures norm ratios and effective ensemble weights while merging (`probe`).

    from latent_merge_nnsight.demo import run_demo
    result = run_demo("runs/demo", quick=True)      # result.results (tidy table), result.paths (files)
"""

from latent_merge_nnsight.demo.grid import DEFAULT_GRID as DEFAULT_GRID
from latent_merge_nnsight.demo.grid import QUICK_GRID as QUICK_GRID
from latent_merge_nnsight.demo.grid import DemoGrid as DemoGrid
from latent_merge_nnsight.demo.grid import Schedule as Schedule
from latent_merge_nnsight.demo.report import write_report as write_report
from latent_merge_nnsight.demo.run import DemoResult as DemoResult
from latent_merge_nnsight.demo.run import export_docs as export_docs
from latent_merge_nnsight.demo.run import run_demo as run_demo

__all__ = [
    "DEFAULT_GRID",
    "QUICK_GRID",
    "DemoGrid",
    "DemoResult",
    "Schedule",
    "export_docs",
    "run_demo",
    "write_report",
]
