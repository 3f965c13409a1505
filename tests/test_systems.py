"""Systems: the YAML schema and its errors, loading from disk, generation modes, provenance, batching."""

import asyncio
import importlib.metadata
import json
import threading
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from tiny import hf_pair, make_tokenizer

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.judgebench.data import JudgePair
from latent_merge_nnsight.evaluation.judgebench.official import official_accuracy
from latent_merge_nnsight.evaluation.judgebench.templates import load_template
from latent_merge_nnsight.inputs import encode
from latent_merge_nnsight.models import model_info
from latent_merge_nnsight.recipe import Recipe
from latent_merge_nnsight.serve import SystemCompleteFn
from latent_merge_nnsight.systems.batching import Completion
from latent_merge_nnsight.systems.loaded import LoadedSystem, load_system
from latent_merge_nnsight.systems.spec import SamplingSpec, System

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "systems"
MAX_NEW = 5


def save_tiny_pair(root: Path, n_layers: int = 4) -> Path:
    """A tiny random base and FT saved as `root/base`, `root/ft` (weights + chat tokenizer)."""
    base, ft = hf_pair(n_layers=n_layers, dtype=torch.float32)
    for name, model in (("base", base), ("ft", ft)):
        model.save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
    return root


def write_system(root: Path, name: str, **fields) -> Path:
    """A system YAML in `root` whose model paths are relative to it."""
    data = {
        "name": name,
        "base": "base",
        "dtype": "float32",
        "sampling": {"max_new_tokens": MAX_NEW},
    } | fields
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_pair(tmp_path_factory.mktemp("tiny-models"))


# --------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_system_files_validate_and_round_trip_yaml(path):
    system = System.from_file(path)
    again = System.from_yaml(system.to_yaml())
    assert again.model_dump() == system.model_dump()
    assert again.to_dict() == system.to_dict()
    raw = yaml.safe_load(path.read_text())
    for key in ("name", "kind", "base"):
        assert getattr(system, key) == raw[key]  # nothing renamed on the way in


def test_example_files_cover_the_four_kinds_and_the_real_pair():
    systems = [System.from_file(p) for p in EXAMPLES.glob("*.yaml")]
    assert {s.kind for s in systems} == {"latent", "weight", "ensemble", "single"}
    real = [s for s in systems if s.base == "Qwen/Qwen2.5-7B-Instruct"]
    assert real and real[0].sources == ["open-thoughts/OpenThinker3-7B"] and real[0].kind == "latent"
    # Qwen2.5-7B has 28 blocks: the source needs blocks 0..20 only
    assert real[0].source_up_to_layer(28) == 20


def test_system_round_trip_keeps_every_non_default_field():
    system = System(
        name="everything",
        kind="latent",
        base="org/base",
        sources=["org/ft-a", "org/ft-b"],
        recipe=Recipe(op="regmean", layers=[1, 3], alpha=[0.0, 1.0], weights=[0.25, 0.75], positions="all"),
        dtype="bfloat16",
        device_map={"": "cuda:1"},
        quantization="4bit",
        truncate_sources=False,
        engine="fast",
        sampling=SamplingSpec(
            max_new_tokens=33,
            do_sample=True,
            temperature=0.6,
            top_p=0.8,
            top_k=7,
            seed=11,
            stop=["\n\n", "END"],
        ),
    )
    text = system.to_yaml()
    again = System.from_yaml(text)
    assert again.model_dump() == system.model_dump()
    assert yaml.safe_load(text)["sampling"]["stop"] == ["\n\n", "END"]
    assert json.loads(json.dumps(system.to_dict())) == system.to_dict()  # JSON-able as it is


BASE = {"name": "s", "kind": "single", "base": "m"}
LATENT = {
    "name": "s",
    "kind": "latent",
    "base": "m",
    "sources": ["f"],
    "recipe": {"op": "slerp", "layers": {1: 0.5}},
}
INVALID = [
    ("extra_field", BASE | {"temprature": 0.5}, r"field 'temprature': Extra inputs are not permitted"),
    ("unknown_kind", BASE | {"kind": "merged"}, r"field 'kind'.*'latent', 'weight', 'ensemble' or 'single'"),
    ("missing_name", {"kind": "single", "base": "m"}, r"field 'name': Field required"),
    ("empty_base", BASE | {"base": " "}, r"field 'base': must be a non-empty string"),
    (
        "negative_temperature",
        BASE | {"sampling": {"temperature": -1}},
        r"field 'sampling.temperature'.*got -1",
    ),
    ("top_p_above_one", BASE | {"sampling": {"top_p": 1.5}}, r"field 'sampling.top_p'"),
    ("zero_new_tokens", BASE | {"sampling": {"max_new_tokens": 0}}, r"field 'sampling.max_new_tokens'"),
    (
        "empty_stop",
        BASE | {"sampling": {"stop": [""]}},
        r"field 'sampling.stop': stop strings must be non-empty",
    ),
    ("sampling_typo", BASE | {"sampling": {"topk": 3}}, r"field 'sampling.topk': Extra inputs"),
    ("latent_without_recipe", LATENT | {"recipe": None}, r"kind='latent' needs the field 'recipe'"),
    ("latent_without_sources", LATENT | {"sources": []}, r"needs at least one source"),
    ("single_with_sources", BASE | {"sources": ["f"]}, r"kind='single' runs one model"),
    ("single_with_recipe", BASE | {"recipe": LATENT["recipe"]}, r"kind='single' takes no recipe"),
    (
        "recipe_op_typo",
        LATENT | {"recipe": {"op": "slrep", "layers": {1: 0.5}}},
        r"field 'recipe.op'.*lerp, regmean, slerp",
    ),
    (
        "recipe_alpha_range",
        LATENT | {"recipe": {"op": "slerp", "layers": {1: 1.5}}},
        r"field 'recipe'.*layers\[1\]",
    ),
    (
        "recipe_sources_differ",
        LATENT | {"recipe": {"op": "slerp", "layers": {1: 0.5}, "sources": ["g"]}},
        r"recipe.sources=\['g'\] differs from sources=\['f'\]",
    ),
    (
        "weight_method_typo",
        BASE | {"kind": "weight", "sources": ["f"], "weight_merge": {"method": "ties"}},
        r"field 'weight_merge.method'.*lerp, slerp, task_arithmetic, regmean",
    ),
    (
        "weight_alpha_range",
        BASE | {"kind": "weight", "sources": ["f"], "weight_merge": {"alpha": 1.5}},
        r"field 'weight_merge'.*alpha=1.5 is outside \[0, 1\]",
    ),
    (
        "weight_without_sources",
        BASE | {"kind": "weight", "weight_merge": {}},
        r"kind='weight' needs at least one source",
    ),
    (
        "ensemble_b_range",
        BASE | {"kind": "ensemble", "sources": ["f"], "ensemble": {"b": 2}},
        r"field 'ensemble'.*b=2",
    ),
    (
        "ensemble_two_sources",
        BASE | {"kind": "ensemble", "sources": ["f", "g"], "ensemble": {}},
        r"exactly one source",
    ),
    ("bad_dtype_type", BASE | {"dtype": 16}, r"field 'dtype'"),
    ("unknown_dtype", BASE | {"dtype": "float17"}, r"field 'dtype': 'float17' is not a torch dtype"),
    ("unknown_engine", BASE | {"engine": "turbo"}, r"field 'engine'.*'auto', 'fast' or 'nnsight'"),
    ("bad_quantization", BASE | {"quantization": "3bit"}, r"field 'quantization'"),
]


@pytest.mark.parametrize(("case", "data", "pattern"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_system_raises_naming_the_field(case, data, pattern):
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(LatentMergeError, match=pattern) as exc:
        System.from_yaml(yaml.safe_dump(data), where="my.yaml")
    assert str(exc.value).startswith("my.yaml is invalid")
    assert isinstance(exc.value, ValueError)


def test_yaml_that_is_not_a_mapping_or_not_yaml_is_rejected(tmp_path):
    with pytest.raises(LatentMergeError, match="a system must be a mapping, got list"):
        System.from_yaml("- a\n- b\n")
    with pytest.raises(LatentMergeError, match="not valid YAML"):
        System.from_yaml("name: [unclosed\n")
    with pytest.raises(LatentMergeError, match=r"system='.*nope.yaml' does not exist"):
        System.from_file(tmp_path / "nope.yaml")
    with pytest.raises(LatentMergeError, match="expected a YAML path, a System or a LoadedSystem"):
        load_system(42)


@pytest.mark.parametrize(
    ("recipe", "truncate", "n_layers", "expected"),
    [
        ({"op": "slerp", "layers": {2: 0.5, 1: 0.3}}, True, 4, 2),
        ({"op": "lerp", "layers": [0], "alpha": 0.5}, True, 6, 0),
        ({"op": "slerp", "layers": {3: 0.5}}, True, 4, None),  # the last block: nothing to cut
        ({"op": "slerp", "layers": "all", "alpha": [0, 1]}, True, 4, None),
        ({"op": "slerp", "layers": {1: 0.5}}, False, 4, None),
    ],
)
def test_source_up_to_layer_is_the_recipes_highest_layer(recipe, truncate, n_layers, expected):
    system = System(
        name="s", kind="latent", base="m", sources=["f"], recipe=recipe, truncate_sources=truncate
    )
    assert system.source_up_to_layer(n_layers) == expected


@pytest.mark.parametrize("site", ["pre", "post"])
def test_source_up_to_layer_is_the_depth_the_plan_accepts_and_no_shallower(site):
    """A source loaded to `source_up_to_layer` passes the plan's check and holds the blocks the plan
    runs; one layer less is refused naming the recipe layer."""
    from tiny import pair

    from latent_merge_nnsight.models import model_info, truncate
    from latent_merge_nnsight.plan import resolve_plan

    recipe = {"op": "slerp", "layers": {1: 0.0, 2: 0.5}, "site": site}
    system = System(name="s", kind="latent", base="m", sources=["f"], recipe=recipe)
    up = system.source_up_to_layer(4)
    assert up == 2
    base, ft = pair(n_layers=4)
    plan, _ = resolve_plan(base, truncate(ft, up), system.recipe)
    assert plan.source_blocks(model_info(ft).n_layers) <= up + 1 == model_info(ft).n_layers
    with pytest.raises(LatentMergeError, match="recipe layer 2 is past source") as caught:
        resolve_plan(base, truncate(ft, up - 1), system.recipe)
    assert caught.value.param == "layers"


def test_temperature_zero_means_greedy():
    kwargs = SamplingSpec(do_sample=True, temperature=0.0).generate_kwargs()
    assert kwargs["do_sample"] is False and kwargs["temperature"] == 1.0
    kwargs = SamplingSpec(do_sample=True, temperature=0.5, seed=3).generate_kwargs()
    assert (kwargs["do_sample"], kwargs["temperature"], kwargs["seed"]) == (True, 0.5, 3)


# --------------------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def latent(tiny_dir) -> LoadedSystem:
    path = write_system(
        tiny_dir, "tiny-latent", kind="latent", sources=["ft"], recipe={"op": "slerp", "layers": {2: 0.5}}
    )
    return load_system(path)


@pytest.fixture(scope="module")
def single(tiny_dir) -> LoadedSystem:
    return load_system(write_system(tiny_dir, "tiny-single", kind="single"))


def test_latent_source_is_loaded_only_up_to_the_recipes_highest_layer(latent):
    info = model_info(latent.sources[0])
    assert (info.n_layers, info.full_n_layers) == (3, 4)  # blocks 0, 1, 2 of 4
    assert model_info(latent.base).n_layers == 4
    assert latent.name == "tiny-latent"


def test_relative_model_paths_resolve_next_to_the_yaml_file(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing named "base" here
    system = System.from_file(write_system(tiny_dir, "relative", kind="single"))
    assert system.resolve("base") == str(tiny_dir / "base")
    assert system.resolve("org/hub-model") == "org/hub-model"  # not a local folder: left for the hub
    assert model_info(load_system(system).base).n_layers == 4  # loads from the YAML's folder, not the cwd


def test_provenance_records_models_recipe_sampling_seed_and_versions(latent):
    prov = latent.provenance()
    assert json.loads(json.dumps(prov)) == prov  # plain JSON, nothing pickled
    assert prov["name"] == "tiny-latent" and prov["kind"] == "latent"
    assert prov["recipe"] == {"op": "slerp", "layers": {"2": 0.5}}
    assert prov["models"]["base"] == "base" and prov["models"]["sources"] == ["ft"]
    assert [m["n_layers"] for m in prov["models"]["loaded"]] == [4, 3]
    assert prov["sampling"]["max_new_tokens"] == MAX_NEW and prov["seed"] is None
    for package in ("torch", "transformers", "nnsight", "latent_merge_nnsight"):
        assert prov["versions"][package] == importlib.metadata.version(package)
    assert prov["system"] == System.from_file(Path(latent.config._base_dir) / "tiny-latent.yaml").to_dict()


def test_count_prompt_tokens_matches_batch_encoding(single):
    chat = [{"role": "system", "content": "sys"}, {"role": "user", "content": "2+3=?"}]
    for prompt in (chat, "plain-text-prompt"):
        reference = int(encode(single.tokenizer, [prompt]).attention_mask.sum())
        assert single.count_prompt_tokens(prompt) == reference
    # the chat template of tests/tiny.py: one token per character, role markers and <eos> are one token each
    assert single.count_prompt_tokens(chat) == (1 + 3 + 1) + (1 + 5 + 1) + 1


def test_sampling_overrides_are_validated_with_the_field_named(single):
    assert single.sampling(max_new_tokens=2).max_new_tokens == 2
    assert single.sampling().max_new_tokens == MAX_NEW  # the system's own setting is untouched
    with pytest.raises(LatentMergeError, match=r"(?s)sampling.*field 'temperature'.*got -0.5"):
        single.sampling(temperature=-0.5)
    with pytest.raises(LatentMergeError, match=r"unknown sampling overrides \['beams'\]"):
        single.sampling(beams=2)
    with pytest.raises(LatentMergeError, match="a list of prompts"):
        single.complete("one string")


# --------------------------------------------------------------------------------------- batching a judge


class FirstShownJudge:
    """A stand-in system that always prefers the answer shown first (and records its batches)."""

    name = "first-shown"

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def complete(self, prompts, **params):
        self.batches.append(len(prompts))
        self.threads.add(threading.current_thread().name)
        return [Completion("A", "stop", 10, 1) for _ in prompts]


def test_complete_fn_batches_concurrent_judge_calls_and_scores_as_official():
    from latent_merge_nnsight.evaluation.judge import judgebench_accuracy_sync

    pairs = [
        JudgePair(f"p{i}", i, "livebench-math", f"q{i}", "m", f"a{i}", f"b{i}", "A>B" if i % 2 else "B>A")
        for i in range(4)
    ]
    judge = FirstShownJudge()
    fn = SystemCompleteFn(judge, max_batch_size=4, max_wait_ms=2000, overrides={"max_new_tokens": 4})
    records = judgebench_accuracy_sync(
        pairs, fn, load_template("pairwise_abc"), judge_model="first-shown", concurrency=4, progress=False
    )
    assert judge.batches == [4, 4]  # 8 judgments at concurrency 4: two full batches
    assert fn.stats.batch_sizes == [4, 4]
    assert len(judge.threads) == 1
    # a judge that always picks the first shown answer is right in one order, wrong in the other
    assert official_accuracy(records)["overall"]["accuracy"] == 0.0
    # a second event loop (another asyncio.run) gets a fresh batcher and still works
    fn.max_wait_ms = 1.0
    assert asyncio.run(fn([{"role": "user", "content": "x"}])) == "A"


# --------------------------------------------------------------------------------------- generation

CHATS = [
    [{"role": "user", "content": "2+3=?"}],
    [{"role": "system", "content": "be-brief"}, {"role": "user", "content": "Name-a-prime-number."}],
]


def hf_greedy(model, tokenizer, chat, max_new_tokens):
    """Reference: transformers' own greedy decode of one unpadded chat prompt -> (text, new ids)."""
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    config = transformers.GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=1, pad_token_id=0
    )
    with torch.no_grad():
        out = model.generate(**enc, generation_config=config)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    ended = new[-1] == 1
    return tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=True), new


def test_single_system_greedy_matches_transformers_generate(single):
    from latent_merge_nnsight.models import hf_module

    completions = single.complete(CHATS)  # batched: the shorter prompt is padded
    for chat, c in zip(CHATS, completions, strict=True):
        text, new = hf_greedy(hf_module(single.base), single.tokenizer, chat, MAX_NEW)
        assert c.text == text
        assert c.completion_tokens == len(new)
        assert c.finish_reason == ("eos" if new[-1] == 1 else "length")
        assert c.prompt_tokens == single.count_prompt_tokens(chat)
    assert single.generate(CHATS) == [c.text for c in completions]
    shorter = single.complete(CHATS, max_new_tokens=2)  # an override for this call only
    for c, s in zip(completions, shorter, strict=True):
        assert c.text.startswith(s.text) and s.completion_tokens <= 2


def test_latent_system_matches_lmn_generate_with_the_whole_source(latent, tiny_dir):
    import latent_merge_nnsight as lmn
    from latent_merge_nnsight.generation import generate

    base = lmn.load(tiny_dir / "base", dtype="float32")
    ft = lmn.load(tiny_dir / "ft", dtype="float32")  # all 4 blocks: truncation must not change a token
    recipe = Recipe(op="slerp", layers={2: 0.5})
    reference = generate(base, ft, CHATS, recipe, max_new_tokens=MAX_NEW)
    assert latent.generate(CHATS) == reference.texts


def test_merge_at_zero_strength_gives_the_base_alone(tiny_dir, single):
    expected = single.generate(CHATS)
    latent0 = write_system(
        tiny_dir, "latent-zero", kind="latent", sources=["ft"], recipe={"op": "lerp", "layers": {1: 0.0}}
    )
    ensemble0 = write_system(tiny_dir, "ensemble-zero", kind="ensemble", sources=["ft"], ensemble={"b": 0.0})
    for path in (latent0, ensemble0):
        assert load_system(path).generate(CHATS) == expected, path.name


def test_weight_system_at_alpha_zero_gives_the_base_alone(tiny_dir, single):
    import mergekit  # noqa: F401  (declared in the `merge` extra: missing, it must fail, not skip)

    path = write_system(
        tiny_dir, "weight-zero", kind="weight", sources=["ft"], weight_merge={"method": "lerp", "alpha": 0.0}
    )
    system = load_system(path)
    assert system.generate(CHATS) == single.generate(CHATS)


def test_local_system_judges_judgebench_pairs_with_resumable_cache(single, tmp_path):
    from latent_merge_nnsight.evaluation.judge_system import judge_model_id, judgebench_accuracy_system

    template = load_template("pairwise_abc")
    pairs = [
        JudgePair("q1", 1, "livebench-math", "1+1=?", "m", "2", "3", "A>B"),
        JudgePair("q2", None, "mmlu-pro-law", "Best?", "m", "this", "that", "B>A"),
    ]
    cache = tmp_path / "judge-cache.jsonl"
    calls = single.generate_calls
    records = judgebench_accuracy_system(
        pairs, single, template, cache_path=cache, batch_size=4, progress=False, truncate="none"
    )
    assert single.generate_calls - calls == 1  # 4 judgments (2 pairs x 2 orders) in one batch
    assert [r["pair_id"] for r in records] == ["q1", "q2"]
    for pair, record in zip(pairs, records, strict=True):
        games = record["judgments"]
        shown = [(pair.response_A, pair.response_B), (pair.response_B, pair.response_A)]
        for game, (first, second) in zip(games, shown, strict=True):
            direct = single.generate([template.messages(pair.question, first, second)])[0]
            assert game["judgment"]["response"] == direct
            assert game["judgment"]["judge_model"] == judge_model_id(single)
        assert record["judge_name"] == "tiny-single"
    result = official_accuracy(records)
    assert result["overall"]["n"] == 2
    # a rerun reads every judgment from the cache: the model is not called again
    calls = single.generate_calls
    again = judgebench_accuracy_system(
        pairs, single, template, cache_path=cache, batch_size=4, progress=False, truncate="none"
    )
    assert single.generate_calls == calls and again == records
    # other sampling settings are another judge in the cache, not a cache hit
    assert judge_model_id(single, {"max_new_tokens": 2}) != judge_model_id(single)
