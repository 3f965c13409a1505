"""Tiny random models and a character tokenizer, built locally (no downloads)."""

import contextlib
from collections.abc import Iterator

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import latent_merge_nnsight as lmn

VOCAB = 128
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def generate_raw(*args, **kwargs):
    """`lmn.generate` with string prompts sent as raw text (`chat=False`; by default a tokenizer's chat
    template wraps them), for tests whose references tokenize the strings raw."""
    return lmn.generate(*args, **{"chat": False, **kwargs})


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Printable ASCII, one token per character, plus pad/eos/bos/unk and a chat template."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    for role in ("user", "assistant", "system"):
        vocab[f"<|{role}|>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    fast.add_special_tokens(
        {"additional_special_tokens": [f"<|{r}|>" for r in ("user", "assistant", "system")]}
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


ROTARY_ARCHS = {
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "mixtral": transformers.MixtralConfig,
    "gemma": transformers.GemmaConfig,
    "gemma2": transformers.Gemma2Config,
    "gemma3_text": transformers.Gemma3TextConfig,
    "phi3": transformers.Phi3Config,
    "olmo": transformers.OlmoConfig,
    "olmo2": transformers.Olmo2Config,
}
ARCHS = (*ROTARY_ARCHS, "gpt2", "gpt_neox")


def config(
    arch: str = "qwen2", n_layers: int = 4, hidden: int = 32, vocab: int = VOCAB, window: int | None = None
):
    """A tiny config of `arch`. `window` gives it sliding-window attention the way its family does: on
    every layer (Mistral, Mixtral, Phi-3), above layer 0 (Qwen2/3), or on every other layer (Gemma 2/3)."""
    common = dict(vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch in ROTARY_ARCHS:
        extra: dict = {}
        if arch in ("qwen3", "gemma", "gemma2", "gemma3_text"):
            extra["head_dim"] = hidden // 4
        if arch == "mixtral":  # the default grouped-mm experts take no float64
            extra.update(num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager")
        if arch in ("mistral", "mixtral", "phi3"):
            extra["sliding_window"] = window
        elif window is not None and arch in ("qwen2", "qwen3"):
            extra.update(use_sliding_window=True, sliding_window=window, max_window_layers=1)
        elif arch in ("gemma2", "gemma3_text"):
            extra["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(n_layers)]
            extra.update({} if window is None else {"sliding_window": window})
        elif window is not None:
            raise ValueError(f"{arch} has no sliding window")
        return ROTARY_ARCHS[arch](
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **extra,
            **common,
        )
    if window is not None:
        raise ValueError(f"{arch} has no sliding window")
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=hidden, n_layer=n_layers, n_head=4, n_positions=256, **common)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            **common,
        )
    raise ValueError(arch)


def hf_pair(
    arch: str = "qwen2",
    n_layers: int = 4,
    hidden: int = 32,
    seed: int = 0,
    dtype=torch.float64,
    noise: float = 0.5,
    window: int | None = None,
):
    """A random base and an 'FT' that is a perturbed copy of it (so their states are related)."""
    torch.manual_seed(seed)
    base, ft = (
        transformers.AutoModelForCausalLM.from_config(config(arch, n_layers, hidden, window=window))
        .to(dtype)
        .eval()
        for _ in range(2)
    )
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(noise * p.std() * torch.randn_like(p) if p.numel() > 1 else 0 * p)
    return base, ft


def pair(
    arch: str = "qwen2",
    n_layers: int = 4,
    hidden: int = 32,
    seed: int = 0,
    dtype=torch.float64,
    window: int | None = None,
):
    """(base, ft) wrapped by lmn."""
    hb, hs = hf_pair(arch, n_layers, hidden, seed, dtype, window=window)
    return lmn.wrap(hb, make_tokenizer(), name=f"tiny-{arch}-base"), lmn.wrap(
        hs, make_tokenizer(), name=f"tiny-{arch}-ft"
    )


@contextlib.contextmanager
def batch_sizes_seen(model) -> Iterator[list[int]]:
    """Record the batch size of every forward of the model's first decoder block while the block runs."""
    sizes: list[int] = []
    block = lmn.models.hf_module(model).model.layers[0]
    handle = block.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        yield sizes
    finally:
        handle.remove()
