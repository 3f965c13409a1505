"""lmn.analysis.sweep: the grid, the tidy table, resuming after a kill, and the Perplexity evaluator."""

import json
import math

import pytest
import torch
from reference import merged_logits, position_ids
from tiny import hf_pair, make_tokenizer, pair

import latent_merge_nnsight as lmn
from latent_merge_nnsight import LatentMergeError
from latent_merge_nnsight.analysis import Perplexity, TaskAccuracy, best_cells, sweep
from latent_merge_nnsight.inputs import encode

TEXTS = ["The cat sat on the mat.", "Hi there!", "Merging in latent space", "abc xyz"]
N_LAYERS = 4


@pytest.fixture(scope="module")
def models():
    return pair("qwen2", n_layers=N_LAYERS)


class Recorder:
    """An evaluate callable whose result is a known function of the cell, that logs and can fail on call k."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[tuple] = []
        self.fail_on_call = fail_on_call

    def __call__(self, model, sources, recipe, prompts):
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise RuntimeError("killed")
        if recipe is None:
            key = (model._module.config.name_or_path or id(model), None, None, None)
            self.calls.append(("alone", id(model), len(sources)))
            return {"knowledge": {"acc": 0.25}, "math": {"acc": 0.75}}
        ((layer, alpha),) = recipe.layer_alphas(N_LAYERS).items()
        key = (recipe.op, layer, alpha)
        self.calls.append(key)
        return {"knowledge": {"acc": layer / 10 + alpha}, "math": {"acc": alpha / 2}}


def cell_keys(calls):
    return [c for c in calls if c[0] != "alone"]


GRID = dict(ops=["lerp", "slerp"], layers=[1, 3], alphas=[0.25, 0.5, 1.0])


def test_table_is_tidy_and_holds_what_evaluate_returned(models, tmp_path):
    base, ft = models
    rec = Recorder()
    df = sweep(base, ft, **GRID, evaluate=rec, prompts=TEXTS, baselines=("base", "source"), progress=False)
    assert list(df.columns) == ["system", "op", "layer", "alpha", "category", "metric", "value"]
    # 2 baselines + 2 ops x 2 layers x 3 alphas cells, each 2 categories x 1 metric
    assert len(df) == (2 + 12) * 2
    # cells are visited layer-major: all ops and alphas of layer 1 before layer 3
    assert cell_keys(rec.calls) == [
        (op, layer, a) for layer in (1, 3) for op in ("lerp", "slerp") for a in (0.25, 0.5, 1.0)
    ]
    # the baselines: the base with its sources, then the first source alone
    assert rec.calls[:2] == [("alone", id(base), 1), ("alone", id(ft), 0)]
    latent = df[df["system"] == "latent"]
    for row in latent.itertuples():
        want = row.layer / 10 + row.alpha if row.category == "knowledge" else row.alpha / 2
        assert row.value == pytest.approx(want)
    base_rows = df[df["system"] == "base"]
    assert base_rows["op"].isna().all() and base_rows["layer"].isna().all()
    assert sorted(base_rows["value"]) == [0.25, 0.75]


def test_recipes_carry_site_positions_and_op_params(models):
    base, ft = models
    seen = []

    def evaluate(model, sources, recipe, prompts):
        seen.append(recipe)
        return {"x": 1.0}

    sweep(
        base,
        [ft, ft],
        ops=["regmean"],
        layers=[2],
        alphas=[0.5],
        evaluate=evaluate,
        prompts=TEXTS,
        site="post",
        positions="all",
        op_params={"weights": [3.0, 1.0]},
        baselines=(),
        progress=False,
    )
    (recipe,) = seen
    assert (recipe.op, recipe.layers, recipe.site, recipe.positions, recipe.weights) == (
        "regmean",
        {2: 0.5},
        "post",
        "all",
        [3.0, 1.0],
    )


def test_a_killed_sweep_resumes_without_recomputing_or_losing_cells(models, tmp_path):
    base, ft = models
    out = tmp_path / "sweep.jsonl"
    first = Recorder(fail_on_call=6)
    with pytest.raises(RuntimeError, match="killed"):
        sweep(base, ft, **GRID, evaluate=first, prompts=TEXTS, out=out, progress=False)
    lines = out.read_text().splitlines()
    assert len(lines) == 5  # base + 4 latent cells finished before the failure, each flushed
    second = Recorder()
    df = sweep(base, ft, **GRID, evaluate=second, prompts=TEXTS, out=out, progress=False)
    everything = [(op, layer, a) for layer in (1, 3) for op in ("lerp", "slerp") for a in (0.25, 0.5, 1.0)]
    done_first, done_second = cell_keys(first.calls), cell_keys(second.calls)
    assert not set(done_first) & set(done_second)  # no cell computed twice
    assert sorted(done_first + done_second) == sorted(everything)  # none lost
    assert ("alone", id(base), 1) not in second.calls  # the base baseline was done in the first run
    assert len(out.read_text().splitlines()) == 13
    # the resumed table equals an uninterrupted run's
    fresh = sweep(base, ft, **GRID, evaluate=Recorder(), prompts=TEXTS, progress=False)
    assert df.equals(fresh)
    # a third run computes nothing
    third = Recorder()
    sweep(base, ft, **GRID, evaluate=third, prompts=TEXTS, out=out, progress=False)
    assert third.calls == []


def test_a_torn_last_line_is_dropped_and_its_cell_recomputed(models, tmp_path):
    base, ft = models
    out = tmp_path / "sweep.jsonl"
    grid = dict(ops=["lerp"], layers=[1], alphas=[0.25, 0.5])
    sweep(base, ft, **grid, evaluate=Recorder(), prompts=TEXTS, out=out, progress=False)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])  # a kill in the middle of the last write
    again = Recorder()
    with pytest.warns(UserWarning, match="incomplete last line"):
        df = sweep(base, ft, **grid, evaluate=again, prompts=TEXTS, out=out, progress=False)
    assert cell_keys(again.calls) == [("lerp", 1, 0.5)]
    assert [json.loads(x)["cell"]["alpha"] for x in out.read_text().splitlines()] == [None, 0.25, 0.5]
    assert len(df) == 3 * 2


def test_results_of_another_sweep_are_refused_and_resume_false_starts_afresh(models, tmp_path):
    base, ft = models
    out = tmp_path / "sweep.jsonl"
    grid = dict(ops=["lerp"], layers=[1], alphas=[0.5])
    sweep(base, ft, **grid, evaluate=Recorder(), prompts=TEXTS, out=out, progress=False)
    with pytest.raises(LatentMergeError, match=r"holds results of a different sweep.*resume=False"):
        sweep(base, ft, **grid, evaluate=Recorder(), prompts=TEXTS[:2], out=out, progress=False)
    rec = Recorder()
    sweep(base, ft, **grid, evaluate=rec, prompts=TEXTS[:2], out=out, resume=False, progress=False)
    assert len(rec.calls) == 2 and len(out.read_text().splitlines()) == 2


def test_best_cells_picks_the_highest_mean_over_categories(models):
    base, ft = models
    df = sweep(base, ft, **GRID, evaluate=Recorder(), prompts=TEXTS, progress=False)
    best = best_cells(df, "acc")
    # mean over categories = (layer/10 + alpha + alpha/2) / 2: highest at layer 3, alpha 1 for each op
    assert sorted(set(zip(best["op"], best["layer"], best["alpha"], strict=True))) == [
        ("lerp", 3, 1.0),
        ("slerp", 3, 1.0),
    ]
    assert set(best["label"]) == {"latent lerp L3 a=1", "latent slerp L3 a=1"}
    worst = best_cells(df, "acc", higher_is_better=False)
    assert set(zip(worst["layer"], worst["alpha"], strict=True)) == {(1, 0.25)}


# --------------------------------------------------------------------------------------------- perplexity


def reference_nll(base, ft, texts, op, layer, alpha, site="pre"):
    """Mean next-token NLL over real tokens with the merge applied by plain hooks at every position."""
    from reference import hidden_states

    batch = encode(base.tokenizer, texts, padding_side="right")
    ids, mask = batch.input_ids, batch.attention_mask
    src = hidden_states(ft._module, ids, mask, layer, site)
    logits = merged_logits(
        base._module, ids, mask, {layer: (op, [src], alpha, {})}, site=site, positions="all"
    )
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    real = mask[:, 1:].bool()
    return float(-logp[real].mean()), int(real.sum())


@pytest.mark.parametrize("op, layer, alpha, site", [("slerp", 2, 0.6, "pre"), ("lerp", 1, 0.3, "post")])
def test_perplexity_equals_a_hand_computed_nll_with_hook_merges(models, op, layer, alpha, site):
    base, ft = models
    recipe = lmn.Recipe(op=op, layers={layer: alpha}, site=site)
    want, n = reference_nll(base, ft, TEXTS, op, layer, alpha, site)
    for reuse in (True, False):
        got = Perplexity(batch_size=3, reuse_prefix=reuse)(base, [ft], recipe, TEXTS)
        assert got["nll"] == pytest.approx(want, abs=1e-9)
        assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-9)
        assert got["n_tokens"] == n


def test_perplexity_of_the_model_alone_matches_its_plain_forward(models):
    base, _ = models
    batch = encode(base.tokenizer, TEXTS, padding_side="right")
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        logits = base._module(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    want = float(-logp[mask[:, 1:].bool()].mean())
    assert Perplexity()(base, [], None, TEXTS)["nll"] == pytest.approx(want, abs=1e-9)


def test_perplexity_takes_the_models_own_soft_capped_logits():
    """Gemma 2 soft-caps its logits in the forward, after the LM head: perplexity must see the cap."""
    hb, hs = hf_pair("gemma2", n_layers=3, seed=2)
    hb.config.final_logit_softcapping = 0.05  # small, so the cap changes the loss
    base, ft = lmn.wrap(hb, make_tokenizer(), name="capped"), lmn.wrap(hs, make_tokenizer(), name="capped-ft")
    batch = encode(base.tokenizer, TEXTS, padding_side="right")
    ids, mask = batch.input_ids, batch.attention_mask
    real = mask[:, 1:].bool()

    def nll():
        with torch.no_grad():
            logits = hb(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return float(-logp[real].mean())

    want = nll()
    hb.config.final_logit_softcapping = None
    assert abs(want - nll()) > 1e-3  # what the LM head's output alone would give
    hb.config.final_logit_softcapping = 0.05
    assert Perplexity()(base, [], None, TEXTS)["nll"] == pytest.approx(want, abs=1e-9)
    merged = Perplexity()(base, [ft], lmn.Recipe(op="lerp", layers={1: 0.0}), TEXTS)  # the traced merge path
    assert merged["nll"] == pytest.approx(want, abs=1e-9)


def test_perplexity_sweep_runs_lower_blocks_once_per_layer(models):
    """Prefix reuse: the base's blocks below the merge layer run once per layer, not once per cell."""
    base, ft = models
    calls = {i: 0 for i in range(N_LAYERS)}
    # count each block's MLP: a skipped block still fires its own hooks, but runs none of its children
    hooks = [
        blk.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, blk in enumerate(base._module.model.layers)
    ]
    ev = Perplexity()
    try:
        df = sweep(
            base, ft, ops=["lerp", "slerp"], layers=[2, 3], alphas=[0.0, 0.5, 1.0], evaluate=ev,
            prompts=TEXTS, baselines=(), progress=False,
        )  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    assert ev.prefix_runs == 2
    # blocks 0-1 run once for the layer-2 prefix and once for the layer-3 prefix; block 2 runs in the
    # layer-3 prefix and in each of the 6 layer-2 cells; block 3 runs in all 12 cells
    assert calls == {0: 2, 1: 2, 2: 7, 3: 12}
    nll = df[df["metric"] == "nll"]
    at_zero = nll[nll["alpha"] == 0.0]["value"]
    assert at_zero.max() - at_zero.min() < 1e-12  # alpha 0 is the base at every layer and op
    want, _ = reference_nll(base, ft, TEXTS, "slerp", 3, 0.5)
    got = nll[(nll["op"] == "slerp") & (nll["layer"] == 3) & (nll["alpha"] == 0.5)]["value"].item()
    assert got == pytest.approx(want, abs=1e-9)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ops=[]), r"ops=\[\] is empty"),
        (dict(layers=[]), r"layers=\[\] is empty"),
        (dict(alphas=[]), r"alphas=\[\] is empty"),
        (dict(ops=["lerp", "slrep"]), r"ops\[1\]: unknown op 'slrep'; expected one of: delta, lerp"),
        (dict(layers=[1, 4]), r"layers\[1\]=4 is out of range for tiny-qwen2-base \(4 layers\)"),
        (dict(alphas=[0.5, 1.5]), r"alphas\[1\]=1.5 is outside \[0, 1\] for op 'lerp'"),
        (dict(alphas=[0.5, 0.5]), r"alphas=\[0.5, 0.5\] repeats a value"),
        (dict(evaluate="nll"), r"evaluate='nll' is not callable"),
        (
            dict(evaluate=lambda *a: 0.5),
            r"evaluate returned float 0.5 for cell base; expected a non-empty dict",
        ),
        (dict(evaluate=lambda *a: {"acc": "high"}), r"evaluate returned acc='high' \(category 'all'\)"),
        (dict(baselines=("base", "ft")), r"baselines\[1\]='ft'; expected any of: base, source"),
        (dict(prompts=[]), r"prompts=\[\] is empty"),
        (dict(site="mid"), r"site=.mid.; expected one of"),
        (dict(positions=slice(0, 2)), r"positions=slice\(0, 2, None\): a sweep writes its cells as Recipes"),
        (dict(op_params={"lam": 1.0}), r"op_params has 'lam', which none of ops \['lerp'\] takes"),
    ],
)
def test_bad_input_names_the_parameter(models, kwargs, message):
    base, ft = models
    args = dict(ops=["lerp"], layers=[1], alphas=[0.5], evaluate=Recorder(), prompts=TEXTS, progress=False)
    with pytest.raises(LatentMergeError, match=message):
        sweep(base, ft, **(args | kwargs))


def test_task_accuracy_refuses_prompts_that_are_not_task_examples(models):
    base, ft = models
    with pytest.raises(LatentMergeError, match=r"prompts\[0\] has type str; TaskAccuracy expects"):
        TaskAccuracy()(base, [ft], None, ["What is 2+3?"])
    with pytest.raises(LatentMergeError, match=r"max_new_tokens=0; expected an int >= 1 or None"):
        TaskAccuracy(max_new_tokens=0)


def test_incompatible_source_is_refused(models):
    base, _ = models
    wide, _ = hf_pair("qwen2", N_LAYERS, hidden=48)
    other = lmn.wrap(wide, make_tokenizer(), name="wide")
    with pytest.raises(LatentMergeError, match=r"hidden_size differs"):
        sweep(base, other, ops=["lerp"], layers=[1], alphas=[0.5], evaluate=Recorder(), prompts=TEXTS)


def test_task_accuracy_keeps_one_engine_across_cells_and_the_sweep_lets_it_go(monkeypatch):
    """On the fixed-shape engine (what CUDA graphs capture; forced here on CPU) TaskAccuracy keeps the engine
    between calls: cells that differ only in alpha, and a smaller last batch, reuse it. The texts equal
    those of a fresh engine per call, and nothing stays kept once the sweep ends."""
    import functools
    import importlib

    from latent_merge_nnsight.evaluation.tasks import make_eval_set
    from latent_merge_nnsight.generation.fast import PairedEngine
    from latent_merge_nnsight.models import hf_module

    evaluators = importlib.import_module("latent_merge_nnsight.analysis.evaluators")
    generate_module = importlib.import_module("latent_merge_nnsight.generation.fast")
    base, ft = lmn.load("toy-base"), lmn.load("toy-reasoner")
    examples = make_eval_set("math", 3, seed=5) + make_eval_set("reasoning", 3, seed=5)
    grid = dict(ops=["slerp"], layers=[3], alphas=[0.3, 0.8], baselines=(), prompts=examples, progress=False)

    def run() -> list[tuple]:
        calls: list[tuple] = []

        def recording(*args, **kwargs):
            out = lmn.generate(*args, **kwargs)
            calls.append((out.texts, out.info.get("engine_reused")))
            return out

        monkeypatch.setattr(evaluators, "generate", recording)
        sweep(base, ft, **grid, evaluate=TaskAccuracy(batch_size=2, max_new_tokens=12))
        return calls

    fresh = run()
    assert not any(reused for _, reused in fresh)  # on CPU the engine is eager and never kept
    monkeypatch.setattr(generate_module, "PairedEngine", functools.partial(PairedEngine, static_step=True))
    kept = run()
    assert [texts for texts, _ in kept] == [texts for texts, _ in fresh]
    # 2 cells x 2 categories x (a batch of 2, then one of 1). The first call builds an engine; the longer
    # reasoning prompts need more slots, so their first batch builds one sized for both; then all reuse it
    reused = [r for _, r in kept]
    assert reused[:4] == [False, True, False, True] and all(reused[4:])
    assert generate_module._KEPT not in hf_module(base).__dict__


# ----------------------------------------------------------------------------------------------------
# many cells per pass (per-row recipes)


class BatchRecorder(Recorder):
    """A Recorder with a `batch` method: the sweep hands it several latent cells at once."""

    def __init__(self, fail_on_batch: int | None = None):
        super().__init__()
        self.batches: list[int] = []
        self.fail_on_batch = fail_on_batch

    def batch(self, model, sources, recipes, prompts):
        if self.fail_on_batch is not None and len(self.batches) + 1 == self.fail_on_batch:
            raise RuntimeError("killed")
        self.batches.append(len(recipes))
        return [self(model, sources, r, prompts) for r in recipes]


def test_a_batched_sweep_runs_max_batch_rows_a_pass_and_resumes_after_a_kill(models, tmp_path):
    base, ft = models
    out = tmp_path / "sweep.jsonl"
    # 4 prompts, at most 20 rows a pass: 5 cells a pass, the 12 cells in passes of 5, 5, 2
    first = BatchRecorder(fail_on_batch=2)
    with pytest.raises(RuntimeError, match="killed"):
        sweep(base, ft, **GRID, evaluate=first, prompts=TEXTS, out=out, progress=False, max_batch=20)
    assert first.batches == [5] and len(out.read_text().splitlines()) == 1 + 5
    second = BatchRecorder()
    df = sweep(base, ft, **GRID, evaluate=second, prompts=TEXTS, out=out, progress=False, max_batch=20)
    assert second.batches == [5, 2]
    assert not set(cell_keys(first.calls)) & set(cell_keys(second.calls))
    assert df.equals(sweep(base, ft, **GRID, evaluate=Recorder(), prompts=TEXTS, progress=False))
    with pytest.raises(LatentMergeError, match=r"max_batch=0; expected an int >= 1"):
        sweep(base, ft, **GRID, evaluate=second, prompts=TEXTS, progress=False, max_batch=0)


def test_task_accuracy_of_many_cells_in_one_pass_equals_one_cell_at_a_time(monkeypatch):
    """float64 toy pair: every (cell, question) gets the text it gets when the cell runs alone, and the
    whole grid runs as one pass per category."""
    import importlib

    from latent_merge_nnsight.evaluation.tasks import make_eval_set

    evaluators = importlib.import_module("latent_merge_nnsight.analysis.evaluators")
    base, ft = lmn.load("toy-base", dtype="float64"), lmn.load("toy-reasoner", dtype="float64")
    examples = make_eval_set("math", 3, seed=5) + make_eval_set("reasoning", 3, seed=5)
    grid = dict(ops=["lerp", "slerp"], layers=[2, 3], alphas=[0.3, 0.9], prompts=examples, progress=False)

    def run(max_batch: int) -> tuple[dict, int, object]:
        texts: dict = {}
        calls = []

        def recording(model, sources, chats, recipe, **kwargs):
            out = lmn.generate(model, sources, chats, recipe, **kwargs)
            calls.append(len(chats))
            rows = recipe if isinstance(recipe, list) else [recipe] * len(chats)
            for r, chat, text in zip(rows, chats, out.texts, strict=True):
                texts[(None if r is None else r.to_json(), json.dumps(chat))] = text
            return out

        monkeypatch.setattr(evaluators, "generate", recording)
        df = sweep(base, ft, **grid, evaluate=TaskAccuracy(max_new_tokens=10), max_batch=max_batch)
        return texts, len(calls), df

    alone, alone_calls, alone_df = run(max_batch=1)
    together, together_calls, together_df = run(max_batch=64)
    assert together == alone
    assert len(set(alone.values())) > 6  # the cells do answer differently
    assert alone_calls == 2 * (1 + 8) and together_calls == 2 * 2  # base alone, then one pass per category
    assert together_df.equals(alone_df)
