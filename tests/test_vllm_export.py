"""`lmn export vllm`: the files it writes, what it refuses (with nothing written), per-request recipe checks,
and `engine="vllm"` / `backend: vllm` without vLLM installed. Runs in the main venv (no vLLM needed);
vLLM itself is exercised by tests/with_vllm/ in a venv of its own."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

import latent_merge_nnsight as lmn
from latent_merge_nnsight.cli import main
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.systems.loaded import load_system
from latent_merge_nnsight.systems.logprobs import token_logprobs
from latent_merge_nnsight.systems.spec import System
from latent_merge_nnsight.vllm_engine import ARCHITECTURE, requests
from latent_merge_nnsight.vllm_engine.export import PLACEHOLDER, check_export, read_export
from latent_merge_nnsight.vllm_engine.requests import cache_salt, check_front, parse_request
from latent_merge_nnsight.zoo import zoo_path

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def system_file(tmp_path: Path, **fields) -> Path:
    data = {"name": "toy-merge", "kind": "latent", "base": "toy-base", "sources": ["toy-reasoner"],
            "recipe": {"op": "slerp", "layers": {3: 0.5}}, "dtype": "float32", **fields}  # fmt: skip
    path = tmp_path / "system.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def fake_model(tmp_path: Path, name: str, **config) -> Path:
    """A folder with only a config.json (the export reads no weights while checking)."""
    folder = tmp_path / name
    folder.mkdir()
    base = json.loads((zoo_path("toy-base") / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(base | config))
    return folder


def export_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["export", "vllm", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_export_writes_config_tokenizer_and_recipe(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = export_cli(capsys, str(system_file(tmp_path)), str(out))
    assert code == 0 and str(out) in stdout
    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((zoo_path("toy-base") / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE]
    assert config["hidden_size"] == base_config["hidden_size"] and config["model_type"] == "qwen2"
    block = config["latent_merge"]
    assert Path(block["base"]) == zoo_path("toy-base").resolve()
    assert [Path(s) for s in block["sources"]] == [zoo_path("toy-reasoner").resolve()]
    assert block["layers"] == [3] and block["source_blocks"] == 3  # a pre merge at 3 needs blocks 0..2
    assert block["recipe"] == lmn.Recipe(op="slerp", layers={3: 0.5}).to_dict()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (zoo_path("toy-base") / name).read_bytes()
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    assert weights == [PLACEHOLDER]  # the weights stay where they are
    assert read_export(out).layers == [3]


def test_post_site_and_gradient_need_one_more_source_block(tmp_path):
    post = check_export("toy-base", ["toy-reasoner"], lmn.Recipe(op="lerp", layers={4: 0.5}, site="post"))
    assert post.source_blocks == 5
    grad = check_export("toy-base", ["toy-reasoner"], lmn.Recipe(op="lerp", layers="all", alpha=[0, 1]))
    assert grad.layers == list(range(6)) and grad.source_blocks == 5


@pytest.mark.parametrize(
    "case, words",
    [
        ("family", ["model_type='gpt2'", "qwen2", "llama", "mistral"]),
        ("mixed attention", ["sources[0]", "'full_attention', 'sliding_attention'", "every layer"]),
        ("layer", ["layers", "[9]", "6 layers"]),
        ("op", ["op", "'nope'", "lerp", "slerp"]),
        ("hidden", ["hidden_size=64", "128"]),
        ("kind", ["kind='weight'", "latent"]),
        ("positions", ["positions", "'last' or 'all'"]),
        ("two sources", ["'slerp' takes one source", "sources=", "toy-reasoner", "regmean"]),
        ("weights", ["weights has 3 entries for 2 sources", "expected 2"]),
    ],
)
def test_bad_input_is_refused_naming_the_parameter_and_nothing_written(tmp_path, capsys, case, words):
    fields: dict = {}
    if case == "family":
        fields["base"] = str(fake_model(tmp_path, "gpt", model_type="gpt2"))
    elif case == "mixed attention":  # Qwen's sliding window above max_window_layers
        types = ["full_attention"] * 2 + ["sliding_attention"] * 4
        fields["sources"] = [str(fake_model(tmp_path, "windowed", layer_types=types, sliding_window=8))]
    elif case == "layer":
        fields["recipe"] = {"op": "slerp", "layers": {9: 0.5}}
    elif case == "op":
        fields["recipe"] = {"op": "nope", "layers": {3: 0.5}}
    elif case == "hidden":
        fields["sources"] = [str(fake_model(tmp_path, "narrow", hidden_size=64))]
    elif case == "kind":
        fields.update(kind="weight", recipe=None, weight_merge={"method": "slerp", "alpha": 0.5})
    elif case == "positions":
        fields["recipe"] = {"op": "slerp", "layers": {3: 0.5}, "positions": [0, -1]}
    elif case == "two sources":
        fields["sources"] = ["toy-reasoner", "toy-reasoner"]
    elif case == "weights":
        fields["sources"] = ["toy-reasoner", "toy-reasoner"]
        fields["recipe"] = {"op": "regmean", "layers": {3: 0.5}, "weights": [1.0, 1.0, 1.0]}
    fields = {k: v for k, v in fields.items() if v is not None}
    path = system_file(tmp_path, **fields)
    if case == "kind":
        data = yaml.safe_load(path.read_text())
        data.pop("recipe")
        path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    code, _, err = export_cli(capsys, str(path), str(out))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmn export: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists()
    assert not list(tmp_path.glob(".lmn-export-*"))  # no scratch folder left behind


def test_a_non_empty_folder_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = export_cli(capsys, str(system_file(tmp_path)), str(out))
    assert code == 2 and "OUT_DIR" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_delta_export_carries_the_deltas(tmp_path, capsys):
    base = lmn.load("toy-base", dtype="float32")
    ft = lmn.load("toy-reasoner", dtype="float32")
    deltas = lmn.compute_deltas(base, ft, ["2+2=", "the capital of"], layers=[2])
    deltas.save(tmp_path / "d.safetensors")
    path = system_file(
        tmp_path, sources=[], recipe={"op": "delta", "layers": {2: 1.0}, "deltas": "d.safetensors"}
    )
    out = tmp_path / "out"
    assert export_cli(capsys, str(path), str(out))[0] == 0
    export = read_export(out)
    assert export.sources == [] and export.source_blocks == 0
    copied = lmn.Deltas.load(export.recipe["deltas"])
    assert (copied.vectors[2] == deltas.vectors[2]).all()


def test_per_request_recipes_are_checked_against_the_export():
    export = check_export("toy-base", ["toy-reasoner"], lmn.Recipe(op="lerp", layers=[2, 3], alpha=0.5))
    one = parse_request({"alpha": 0.25}, export)
    assert one.op == "lerp" and one.alphas == ((2, 0.25), (3, 0.25))
    some = parse_request('{"layers": {"3": 0.7}, "op": "slerp"}', export)  # JSON text, as vllm_xargs sends
    assert some.op == "slerp" and some.alphas == ((2, 0.0), (3, 0.7))
    assert cache_salt(one) != cache_salt(some) and cache_salt(None) is None
    with pytest.raises(LatentMergeError, match=r"layers \[4\] are not exported.*\[2, 3\]"):
        parse_request({"layers": {4: 0.5}}, export)
    with pytest.raises(LatentMergeError, match=r"outside \[0, 1\]"):
        parse_request({"alpha": 1.5}, export)
    with pytest.raises(LatentMergeError, match="unknown op 'nope'"):
        parse_request({"alpha": 0.5, "op": "nope"}, export)
    with pytest.raises(LatentMergeError, match="'delta' cannot run on this live-source export"):
        parse_request({"alpha": 0.5, "op": "delta"}, export)
    with pytest.raises(LatentMergeError, match="unknown keys"):
        parse_request({"alpha": 0.5, "site": "post"}, export)


class Params:
    """What `check_front` reads of vLLM's `SamplingParams`."""

    def __init__(self, extra_args=None, prompt_logprobs=None):
        self.extra_args = extra_args
        self.prompt_logprobs = prompt_logprobs


def test_the_front_end_refuses_what_its_export_cannot_run_and_everything_without_one(monkeypatch):
    export = check_export("toy-base", ["toy-reasoner"], lmn.Recipe(op="lerp", layers=[2, 3], alpha=0.5))
    monkeypatch.setattr(requests, "FRONT", {})
    check_front(Params())  # no latent_merge value: nothing to check, with or without an export
    check_front(Params({"other": 1}))
    with pytest.raises(ValueError, match="knows no latent-merge export"):
        check_front(Params({"latent_merge": {"alpha": 0.3}}))  # a good value, but nothing to run it against
    requests.FRONT["export"] = export
    check_front(Params({"latent_merge": '{"alpha": 0.3}'}))
    with pytest.raises(ValueError, match=r"layers \[5\] are not exported"):
        check_front(Params({"latent_merge": {"layers": {"5": 0.5}}}))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        check_front(Params({"latent_merge": {"alpha": 1.5}}))


def test_merge_from_moves_where_a_request_merges_and_prompt_logprobs_need_it(monkeypatch):
    export = check_export("toy-base", ["toy-reasoner"], lmn.Recipe(op="lerp", layers=[2, 3], alpha=0.5))
    alone = parse_request({"merge_from": 7}, export)  # the export's alphas and op, from position 7 on
    assert (alone.op, alone.alphas, alone.merge_from) == ("lerp", (), 7)
    both = parse_request('{"alpha": 0.2, "merge_from": 3}', export)
    assert both.alphas == ((2, 0.2), (3, 0.2)) and both.merge_from == 3
    assert len({cache_salt(both), cache_salt(parse_request({"alpha": 0.2}, export)), cache_salt(alone)}) == 3
    for bad in (-1, "3", True, 2.0):
        with pytest.raises(LatentMergeError, match="merge_from"):
            parse_request({"merge_from": bad}, export)
    with pytest.raises(LatentMergeError, match="give alpha"):
        parse_request({"op": "slerp", "merge_from": 2}, export)  # an op needs its alphas
    monkeypatch.setattr(requests, "FRONT", {"export": export})
    check_front(Params(prompt_logprobs=None))  # generation: nothing to say
    for extra in (None, {"latent_merge": {"alpha": 1.0}}):  # echo scores: positions last would score the base
        with pytest.raises(ValueError, match=r"prompt_logprobs \(echo\).*'last'.*base.*merge_from"):
            check_front(Params(extra, prompt_logprobs=1))
    check_front(Params({"latent_merge": '{"merge_from": 4}'}, prompt_logprobs=1))
    check_front(Params({"latent_merge": {"merge_from": 4, "alpha": 0.0}}, prompt_logprobs=0))
    every = lmn.Recipe(op="lerp", layers=[2, 3], alpha=0.5, positions="all")
    requests.FRONT["export"] = check_export("toy-base", ["toy-reasoner"], every)
    check_front(Params(prompt_logprobs=1))  # positions all: the prompt is scored as generation merges it


def test_backend_vllm_is_refused_for_weight_merges_and_ensembles():
    with pytest.raises(LatentMergeError, match="backend='vllm' runs kind 'latent' or 'single'"):
        System.from_dict({"name": "e", "kind": "ensemble", "base": "toy-base", "sources": ["toy-reasoner"],
                          "ensemble": {"b": 0.5}, "backend": "vllm"})  # fmt: skip
    system = System.from_dict({"name": "s", "kind": "single", "base": "toy-base", "backend": "vllm"})
    assert system.backend == "vllm"
    assert System.from_dict({"name": "s", "kind": "single", "base": "toy-base"}).backend == "hf"


def test_backend_vllm_system_loads_light_cpu_shells_with_the_hf_systems_limits():
    spec = {"name": "m", "kind": "latent", "base": "toy-base", "sources": ["toy-reasoner"],
            "recipe": {"op": "slerp", "layers": {3: 0.5}}, "dtype": "float32"}  # fmt: skip
    hf, vl = (load_system(System.from_dict(spec | {"backend": b})) for b in ("hf", "vllm"))
    disk = [json.loads((zoo_path(r) / "config.json").read_text()) for r in ("toy-base", "toy-reasoner")]
    for shell, full, cfg in zip([vl.base, *vl.sources], [hf.base, *hf.sources], disk, strict=True):
        module, whole = lmn.models.hf_module(shell), lmn.models.hf_module(full)
        assert len(module.model.layers) == 1 and cfg["num_hidden_layers"] >= 4
        assert {p.device.type for p in module.parameters()} == {"cpu"}
        block = sum(p.numel() for p in whole.model.layers[1].parameters())
        held = sum(p.numel() for p in module.parameters())
        assert held <= sum(p.numel() for p in whole.parameters()) - (len(whole.model.layers) - 1) * block
        assert lmn.models.model_info(shell).full_n_layers == cfg["num_hidden_layers"]
        assert module.config.vocab_size == whole.config.vocab_size == cfg["vocab_size"]
        assert next(module.parameters()).dtype == next(whole.parameters()).dtype
    assert vl.context_length == hf.context_length == disk[0]["max_position_embeddings"]
    assert vl.tokenizer("2+2=")["input_ids"] == hf.tokenizer("2+2=")["input_ids"]
    loaded = vl.provenance()["models"]["loaded"]
    assert [m["ref"] for m in loaded] == ["toy-base", "toy-reasoner"]
    assert all(m["n_layers"] == 1 and "vLLM" in m["weights"] for m in loaded)
    result = lmn.generate(hf.base, hf.sources[0], ["2+2="], hf.config.recipe, max_new_tokens=2)
    with pytest.raises(LatentMergeError, match="backend vllm.*got no logprobs from vLLM"):
        token_logprobs(vl, result, 2)  # shells cannot score: the numbers must come from vLLM


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message shown when vLLM is missing")
def test_engine_vllm_without_vllm_names_the_extra():
    base = lmn.load("toy-base", dtype="float32")
    ft = lmn.load("toy-reasoner", dtype="float32")
    with pytest.raises(LatentMergeError, match=r"pip install 'latent_merge_nnsight\[vllm\]'"):
        lmn.generate(
            base, ft, ["2+2="], lmn.Recipe(op="slerp", layers={3: 0.5}), max_new_tokens=2, engine="vllm"
        )


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message shown when vLLM is missing")
def test_cli_engine_vllm_without_vllm_is_one_line_naming_the_flag_and_the_extra(capsys):
    argv = ["generate", "--base", "toy-base", "--source", "toy-reasoner", "--layer", "3", "--prompt", "2+2=",
            "--max-new-tokens", "2", "--engine", "vllm"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmn generate: error: --engine 'vllm' needs vLLM"), err
    assert "pip install 'latent_merge_nnsight[vllm]'" in err[0]
