"""Tests of the shipped toy pair: tokenizer, checkpoints, accuracies, size, and the training script."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.tasks import (
    CATEGORIES,
    Example,
    chat_messages,
    make_eval_set,
)
from latent_merge_nnsight.generation.run import generate
from latent_merge_nnsight.zoo import ZOO, ZOO_DIR, zoo_path
from latent_merge_nnsight.zoo.tokenizer import build_tokenizer
from latent_merge_nnsight.zoo.train import (
    IGNORE,
    TrainConfig,
    build_model,
    encode_example,
    held_out_accuracy,
    main,
    pack,
    response_loss,
    train_pair,
)

# ------------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_tokenizer_gives_one_token_per_byte_after_the_specials(tok) -> None:
    # documented layout: 5 special tokens, then byte b at id 5 + b
    for text in ["Mia has 47 coins, gets 18.\n  Answer: 'tzmqk' {x} ~|", "caf\u00e9 \u2192 \t"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == [5 + b for b in text.encode("utf-8")]
        assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("kqmzt!", add_special_tokens=False)["input_ids"]) == list("kqmzt!")
    assert len(tok) == 5 + 256


def test_tokenizer_maps_special_tokens_to_single_ids(tok) -> None:
    ids = tok("<|user|>hi<|end|>", add_special_tokens=False)["input_ids"]
    assert ids == [3, 5 + ord("h"), 5 + ord("i"), 1]
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == [
        "<|pad|>",
        "<|end|>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
    ]
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)


def test_chat_template_renders_turns_and_generation_prompt(tok) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "Answer: 5"},
        {"role": "user", "content": "And 2+4?"},
    ]
    expected = (
        "<|system|>Be brief.<|end|><|user|>What is 2+3?<|end|>"
        "<|assistant|>Answer: 5<|end|><|user|>And 2+4?<|end|>"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == expected + "<|assistant|>"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids == tok(expected + "<|assistant|>", add_special_tokens=False)["input_ids"]
    with pytest.raises(Exception, match="role must be system, user or assistant, got tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_shipped_tokenizer_equals_the_builder(tok) -> None:
    for name in ZOO:
        shipped = AutoTokenizer.from_pretrained(zoo_path(name), local_files_only=True)
        assert shipped.get_vocab() == tok.get_vocab()
        assert shipped.chat_template == tok.chat_template
        text = "Sort the letters of 'kqmzt'.\nAnswer: kmqtz"
        assert shipped(text)["input_ids"] == tok(text)["input_ids"]


# ------------------------------------------------------------------------------------------------
# Shipped checkpoints

_OFFLINE_SCRIPT = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from latent_merge_nnsight.zoo import ZOO, zoo_path
out = {}
for name in ZOO:
    tok = AutoTokenizer.from_pretrained(zoo_path(name))
    model = AutoModelForCausalLM.from_pretrained(zoo_path(name))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True)
    out[name] = [type(model).__name__, type(tok).__name__, len(ids["input_ids"])]
print(json.dumps(out))
"""


def test_shipped_checkpoints_load_offline_with_auto_classes() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # any attempt to reach the network would go to a dead proxy and fail
    env.update({"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    done = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    prompt_len = 1 + len("What is 2+3?") + 2  # <|user|>, the text, <|end|>, <|assistant|>
    assert got == {name: ["Qwen2ForCausalLM", "Qwen2Tokenizer", prompt_len] for name in ZOO}


def test_shipped_size_is_at_most_20_mb() -> None:
    total = sum(p.stat().st_size for name in ZOO for p in zoo_path(name).rglob("*") if p.is_file())
    assert total <= 20 * 2**20, f"{total / 2**20:.1f} MB"
    for name in ZOO:
        names = {p.name for p in zoo_path(name).iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names


def test_zoo_path_finds_folders_and_rejects_unknown_names() -> None:
    assert zoo_path("toy-base") == ZOO_DIR / "toy-base"
    assert ZOO["toy-reasoner"].base == "toy-base"
    with pytest.raises(
        LatentMergeError,
        match=r"name='toy-llama' is not a zoo model; expected one of: toy-base, toy-reasoner",
    ):
        zoo_path("toy-llama")


@pytest.fixture(scope="module")
def pair():
    models = {name: AutoModelForCausalLM.from_pretrained(zoo_path(name)).eval() for name in ZOO}
    tokenizer = AutoTokenizer.from_pretrained(zoo_path("toy-base"))
    return models, tokenizer


def test_pair_shares_architecture_but_not_weights(pair) -> None:
    models, _ = pair
    base, ft = models["toy-base"], models["toy-reasoner"]
    assert isinstance(base, Qwen2ForCausalLM) and isinstance(ft, Qwen2ForCausalLM)
    assert base.config.to_diff_dict() == ft.config.to_diff_dict()
    sb = load_file(zoo_path("toy-base") / "model.safetensors")
    sf = load_file(zoo_path("toy-reasoner") / "model.safetensors")
    assert sb.keys() == sf.keys()
    assert all(sb[k].dtype == torch.float32 for k in sb)
    assert any(not torch.equal(sb[k], sf[k]) for k in sb)


def test_batched_left_padded_generation_matches_one_at_a_time(pair) -> None:
    models, tokenizer = pair
    prompts = [e.prompt for e in make_eval_set("reasoning", 3, seed=4) + make_eval_set("math", 3, seed=4)]
    chats = [chat_messages(p) for p in prompts]
    model = models["toy-reasoner"]
    batched = generate(model, None, chats, max_new_tokens=48, tokenizer=tokenizer).texts
    alone = [generate(model, None, [c], max_new_tokens=48, tokenizer=tokenizer).texts[0] for c in chats]
    assert batched == alone
    assert len({len(p) for p in prompts}) > 1  # the batch really was padded


def _accuracies(pair) -> tuple[dict[str, float], dict[str, float]]:
    models, tokenizer = pair
    base = held_out_accuracy(models["toy-base"], tokenizer, n_per_category=64, seed=123)
    ft = held_out_accuracy(models["toy-reasoner"], tokenizer, n_per_category=64, seed=123)
    assert set(base) == set(ft) == set(CATEGORIES)
    return base, ft


def test_shipped_pair_has_the_shape_of_the_papers_pair(pair) -> None:
    """Measured here: the base is strong at knowledge, coding and math and weak at reasoning; the reasoner
    gained reasoning and lost at least 0.2 on another category."""
    base, ft = _accuracies(pair)
    msg = f"base={base} reasoner={ft}"
    assert base["knowledge"] >= 0.9 and base["coding"] >= 0.9 and base["math"] >= 0.85, msg
    assert base["reasoning"] <= 0.4, msg
    assert ft["reasoning"] >= 0.9, msg
    assert max(base[c] - ft[c] for c in CATEGORIES if c != "reasoning") >= 0.2, msg


# ------------------------------------------------------------------------------------------------
# Training code (tiny smoke runs: the real pair takes minutes)

_TINY = TrainConfig(
    hidden_size=16,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=32,
    batch_size=4,
    base_steps=3,
    ft_steps=2,
    warmup_steps=1,
)


def test_encode_example_labels_only_the_response(tok) -> None:
    ex = Example("math", "What is 1+2?", "3", "Answer: 3")
    ids, labels = encode_example(tok, ex, ex.target)
    prompt = "<|user|>What is 1+2?<|end|><|assistant|>"
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert tok.decode(ids) == prompt + "Answer: 3<|end|>"
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(labels[n_prompt:]) == "Answer: 3<|end|>"


def test_pack_lays_examples_end_to_end_with_restarting_positions() -> None:
    rows = [([1, 2, 3], [IGNORE, 2, 3]), ([4, 5, 6, 7, 8], [IGNORE] * 3 + [7, 8]), ([9, 10], [IGNORE, 10])]
    ids, labels, positions = pack(rows, width=8, pad_id=0)
    # first-fit decreasing: the 5-token row opens row 0, the 3-token row fills it, the 2-token one opens row 1
    assert ids.tolist() == [[4, 5, 6, 7, 8, 1, 2, 3], [9, 10, 0, 0, 0, 0, 0, 0]]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert labels[1].tolist() == [IGNORE, 10] + [IGNORE] * 6
    # an example longer than the width widens the rows rather than being cut
    ids, _, _ = pack([([1] * 11, [IGNORE] * 11)], width=8, pad_id=0)
    assert ids.shape == (1, 11)


def test_packed_loss_and_gradients_equal_one_example_at_a_time(tok) -> None:
    # reference: each example alone, no padding; the packed rows must give the same token-mean loss
    torch.manual_seed(0)
    model = build_model(_TINY, tok).double()
    examples = [ex for c in CATEGORIES for ex in make_eval_set(c, 2, seed=1)]
    rows = [encode_example(tok, ex, ex.target) for ex in examples]
    ids, labels, positions = pack(rows, width=96, pad_id=tok.pad_token_id)
    assert ids.shape[0] < len(rows)  # really packed
    for impl in ("eager", "sdpa"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        packed = response_loss(model, ids, labels, positions)
        packed.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        total, count = 0.0, 0
        for r_ids, r_labels in rows:
            logits = model(input_ids=torch.tensor([r_ids])).logits[0, :-1]
            target = torch.tensor(r_labels[1:])
            total = total + torch.nn.functional.cross_entropy(logits, target, reduction="sum")
            count += int((target != IGNORE).sum())
        (total / count).backward()
        torch.testing.assert_close(packed, total / count, rtol=1e-6, atol=0)
        for g, p in zip(grads, model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-9)


def test_train_pair_smoke_writes_loadable_reproducible_checkpoints(tmp_path: pathlib.Path) -> None:
    threads = torch.get_num_threads()
    infos = train_pair(tmp_path / "a", seed=3, threads=1, progress=False, config=_TINY, eval_n=2)
    train_pair(tmp_path / "b", seed=3, threads=1, progress=False, config=_TINY)
    assert torch.get_num_threads() == threads  # restored
    for name in ZOO:
        folder = tmp_path / "a" / name
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert isinstance(model, Qwen2ForCausalLM)
        assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 16
        assert tokenizer.eos_token_id == model.generation_config.eos_token_id
        info = json.loads((folder / "train_info.json").read_text())
        assert info == infos[name]
        assert set(info["eval"]["accuracy"]) == set(CATEGORIES)
        # same seed and thread count -> bit-identical weights
        a = load_file(folder / "model.safetensors")
        b = load_file(tmp_path / "b" / name / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert infos["toy-base"]["steps"] == 3 and infos["toy-reasoner"]["steps"] == 2
    a_base = load_file(tmp_path / "a" / "toy-base" / "model.safetensors")
    a_ft = load_file(tmp_path / "a" / "toy-reasoner" / "model.safetensors")
    assert any(not torch.equal(a_base[k], a_ft[k]) for k in a_base)  # the fine-tune moved the weights


def test_train_main_runs_from_the_command_line(tmp_path: pathlib.Path, capsys) -> None:
    argv = ["--out", str(tmp_path), "--base-steps", "1", "--ft-steps", "1", "--eval-n", "0", "--no-progress"]
    argv += ["--hidden-size", "32", "--num-layers", "1", "--batch-size", "2"]
    assert main(argv) == 0
    assert (tmp_path / "toy-reasoner" / "model.safetensors").is_file()
    assert "toy-base" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_size": 0}, r"hidden_size=0 must be >= 1"),
        ({"num_heads": 3}, r"hidden_size=128, num_heads=3"),
        ({"replay": 1.5}, r"replay=1.5 must be in \[0, 1\]"),
        ({"base_mix": {"poetry": 1.0}}, r"base_mix=.*poetry.*knowledge, reasoning, math, coding"),
        ({"base_steps": -1}, r"base_steps=-1 must be >= 0"),
    ],
)
def test_train_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(LatentMergeError, match=message):
        TrainConfig(**kwargs)


def test_training_in_bf16_on_a_cpu_without_it_warns(tmp_path: pathlib.Path, monkeypatch) -> None:
    train_module = sys.modules[train_pair.__module__]
    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: False)
    tiny = dataclasses.replace(_TINY, base_steps=0, ft_steps=0)
    with pytest.warns(UserWarning, match=r"no bfloat16 instructions.*--fp32"):
        train_pair(tmp_path / "a", threads=1, progress=False, config=tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_pair(tmp_path / "b", threads=1, progress=False, config=dataclasses.replace(tiny, bf16=False))


def test_train_pair_rejects_bad_threads(tmp_path: pathlib.Path) -> None:
    with pytest.raises(LatentMergeError, match=r"threads=0 must be >= 1"):
        train_pair(tmp_path, threads=0, config=_TINY)
