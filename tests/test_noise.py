"""What loading and generating print: no transformers report for an intended truncation, no loading bars,
and a too-long prompt named against the model's own context."""

import logging

import pytest

import latent_merge_nnsight as lmn
from latent_merge_nnsight.models import _TruncationReportFilter


def test_truncated_load_prints_no_report_and_no_bar(capfd):
    ft = lmn.load("toy-reasoner", up_to_layer=2)
    err = capfd.readouterr().err
    assert lmn.models.model_info(ft).n_layers == 3
    assert "LOAD REPORT" not in err and "UNEXPECTED" not in err and "Loading weights" not in err, err


def report(*rows: str) -> logging.LogRecord:
    text = "Qwen2ForCausalLM LOAD REPORT from: x\nKey | Status | |\n---+---\n" + "\n".join(rows)
    return logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0, text, None, None)


def test_only_the_left_out_blocks_are_silenced():
    keep_layers_below_3 = _TruncationReportFilter(3)
    dropped = report(
        "model.layers.{3, 4, 5}.mlp.up_proj.weight | UNEXPECTED |  |",
        "model.layers.4.input_layernorm.weight | UNEXPECTED |",
    )
    assert not keep_layers_below_3.filter(dropped)
    assert keep_layers_below_3.filter(report("model.layers.{2, 3}.mlp.up_proj.weight | UNEXPECTED |  |"))
    assert keep_layers_below_3.filter(report("model.layers.4.mlp.up_proj.weight | MISSING |  |"))
    assert keep_layers_below_3.filter(report("lm_head.weight | UNEXPECTED |  |"))


def test_a_prompt_past_the_context_is_named_against_the_models_context(capfd):
    base = lmn.load("toy-base")
    with pytest.warns(
        UserWarning, match=r"> toy-base's context of 256 tokens \(config.max_position_embeddings\)"
    ):
        lmn.generate(base, None, "What is 75+48? " * 20, None, max_new_tokens=1)
    assert "Token indices sequence length" not in capfd.readouterr().err
