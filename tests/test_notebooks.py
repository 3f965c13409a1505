"""The notebooks run top to bottom on the toy pair (nbclient, this venv's kernel) and are stored stripped."""

import re
import sys
import time
from pathlib import Path

import nbclient  # noqa: E402  (declared in the `notebooks` extra: missing, it must fail, not skip)
import nbformat  # noqa: E402
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart", "02_layer_sweep", "03_representation_geometry", "04_search"]
BUDGET_S = 120  # each notebook must run on a CPU in under two minutes


def _read(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _outputs(nb, kind: str) -> list:
    return [
        o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if kind in o.get("data", {})
    ]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs_and_has_one_config_cell(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    config = [c for c in code if c.source.startswith("# ---- configuration: edit this cell only")]
    assert len(config) == 1
    assert 'BASE = "toy-base"' in config[0].source and 'FT = "toy-reasoner"' in config[0].source
    # every other cell takes the model names from the config cell
    assert not any("toy-" in c.source for c in code if c is not config[0])


def test_python3_kernel_resolves_to_this_interpreter():
    """nbclient's "python3" kernel must start this venv's python (jupyter_client maps "python" to it)."""
    from jupyter_client.manager import KernelManager

    assert KernelManager(kernel_name="python3").format_kernel_cmd()[0] == sys.executable


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom_on_the_toy_pair(name, tmp_path):
    nb = _read(name)
    client = nbclient.NotebookClient(
        nb, timeout=BUDGET_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any failing cell
    seconds = time.perf_counter() - start
    assert seconds < BUDGET_S, f"{name} took {seconds:.0f} s; the budget is {BUDGET_S} s"
    if name == "01_quickstart":
        texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        assert "compatible: hidden_size=" in texts and "keep_norm" in texts
    if name == "02_layer_sweep":
        assert len(_outputs(nb, "image/png")) == 4  # two heatmaps, the bars, the perplexity heatmap
        run = tmp_path / "runs" / "notebook_02"
        assert {p.name for p in run.iterdir()} >= {"accuracy.jsonl", "perplexity.jsonl", "nll.png"}
    if name == "03_representation_geometry":
        assert len(_outputs(nb, "image/png")) == 1
        assert (tmp_path / "runs" / "notebook_03" / "geometry.png").stat().st_size > 10_000
    if name == "04_search":
        assert len(_outputs(nb, "image/png")) == 1  # the grid's and the search's Pareto fronts
        texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        assert re.search(r"the search (reached|did not reach) the grid's best feasible", texts)  # and says
        run = tmp_path / "runs" / "notebook_04"
        assert {p.name for p in run.iterdir()} >= {"study.db", "winner.yaml", "system.yaml", "fronts.png"}
