"""`backend: vllm` in a system YAML: the same answers, finish reasons, token counts and logprobs as backend
hf, served in the same OpenAI shapes, while the system itself holds only light shells of its models."""

import pytest
from vllm_helpers import run_driver

ATOL = 1e-4  # float32 logprobs of two implementations of the same forward


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_driver("driver_backend.py", out_dir=tmp_path_factory.mktemp("backend"))


def test_backend_vllm_system_answers_like_the_hf_one(result):
    assert len(result["vllm"]) == len(result["hf"]) >= 4
    assert result["vllm"] == result["hf"]
    assert any(c["text"] for c in result["hf"])
    assert result["context_length"][0] == result["context_length"][1] == 256  # the toy's config


def test_backend_vllm_system_holds_one_block_per_model_on_the_cpu(result):
    held = zip(result["shells"], result["hf_held"], result["hf_block_params"], strict=True)
    for shell, full, block in held:
        assert shell["disk_blocks"] >= 4 and full["blocks"] >= 4, "the check needs deep models"
        assert shell["blocks"] <= 1, shell
        assert shell["devices"] == ["cpu"]
        # at most the hf copy less all its blocks but one
        assert shell["params"] <= full["params"] - (full["blocks"] - 1) * block, (shell, full)
    for entry, shell in zip(result["provenance"], result["shells"], strict=True):
        assert entry["ref"] == shell["ref"] and entry["full_n_layers"] == shell["disk_blocks"]
        assert entry["n_layers"] == shell["blocks"] and "vLLM" in entry["weights"]


def same_logprobs(mine: list[dict], theirs: list[dict]) -> None:
    """One row's token logprobs agree: tokens, values, and the alternatives (values in order; tokens
    where a value is not tied, within ATOL, with its neighbours in the list)."""
    assert [t["token"] for t in mine] == [t["token"] for t in theirs]
    for a, b in zip(mine, theirs, strict=True):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=ATOL)
        values = [v for _, v in b["top"]]
        assert [v for _, v in a["top"]] == pytest.approx(values, abs=ATOL)
        for i, ((tok_a, _), (tok_b, v)) in enumerate(zip(a["top"], b["top"], strict=True)):
            near = [values[j] for j in (i - 1, i + 1) if 0 <= j < len(values)]
            if all(abs(v - n) > ATOL for n in near):
                assert tok_a == tok_b, (i, a, b)


@pytest.mark.parametrize("which", ["logprobs", "logprobs0"])
def test_backend_vllm_logprobs_equal_the_hf_ones(result, which):
    vl, hf = result[f"vllm_{which}"], result[f"hf_{which}"]
    assert [{**c, "logprobs": None} for c in vl] == [{**c, "logprobs": None} for c in hf]
    top = 3 if which == "logprobs" else 0
    for a, b in zip(vl, hf, strict=True):
        assert len(b["logprobs"]) == b["completion_tokens"] > 0
        assert all(len(t["top"]) == top for t in a["logprobs"])
        same_logprobs(a["logprobs"], b["logprobs"])


def test_sampled_vllm_logprobs_are_the_temperature_one_scores_of_its_tokens(result):
    """At temperature 1.5, vLLM reports its raw logprobs: those the hf system scores for the same tokens."""
    rows = result["sampled"]
    assert sum(len(r) for r in rows["vllm"]) > 0
    for mine, theirs in zip(rows["vllm"], rows["hf"], strict=True):
        same_logprobs(mine, theirs)


def shape(value):
    """A JSON value's shape: its keys and item shapes, with scalars as their type names."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


def test_served_backend_vllm_completion_logprobs_have_the_hf_shape_and_values(result):
    vl, hf = result["served"]["vllm"], result["served"]["hf"]
    assert vl["status"] == hf["status"] == 200, (vl, hf)
    assert shape(vl["body"]) == shape(hf["body"])
    a, b = vl["body"]["choices"][0], hf["body"]["choices"][0]
    assert (a["text"], a["finish_reason"]) == (b["text"], b["finish_reason"])
    assert vl["body"]["usage"] == hf["body"]["usage"]
    la, lb = a["logprobs"], b["logprobs"]
    assert la["tokens"] == lb["tokens"] and la["text_offset"] == lb["text_offset"] and lb["tokens"]
    assert la["token_logprobs"] == pytest.approx(lb["token_logprobs"], abs=ATOL)
    for alts_a, alts_b in zip(la["top_logprobs"], lb["top_logprobs"], strict=True):
        assert len(alts_a) == len(alts_b) == 2
        assert sorted(alts_a.values()) == pytest.approx(sorted(alts_b.values()), abs=ATOL)
