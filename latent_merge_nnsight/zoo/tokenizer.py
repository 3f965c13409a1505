"""The character-level chat tokenizer of the toy model pair: Qwen2's own tokenizer class with no merges.

Real Qwen models use a byte-level BPE (`Qwen2Tokenizer`). This one is the same class with an empty
merge list and a vocabulary of the 256 byte symbols, so every byte is one token: one token per ASCII
character, and any other text still round-trips (a non-ASCII character is a few byte tokens). Five
special tokens come first: ``<|pad|>``, ``<|end|>`` (end of turn and EOS) and the role markers
``<|system|>``, ``<|user|>``, ``<|assistant|>``. A chat renders as
``<|user|>What is 2+3?<|end|><|assistant|>Answer: 5<|end|>``.

Using the Qwen2 class matters: transformers' `AutoTokenizer` always loads a folder whose config.json
says ``model_type: qwen2`` as `Qwen2Tokenizer`, rebuilding its byte-level pipeline from the saved vocab
and merges. Building the tokenizer with that class makes the in-memory tokenizer and the one loaded
back from `save_pretrained` identical, with no custom code at load time.
"""

from transformers import Qwen2Tokenizer

PAD, END = "<|pad|>", "<|end|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{r}|>" for r in ROLES)
SPECIAL_TOKENS = (PAD, END, *ROLE_TOKENS)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
"""Jinja chat template: each turn is ``<|role|>content<|end|>``; the generation prompt ``<|assistant|>``."""


def byte_symbols() -> list[str]:
    """The printable stand-in for each byte 0..255 used by byte-level BPE (GPT-2's convention).

    Bytes that are printable Latin-1 characters stand for themselves; the others (controls, space,
    0x7f-0xa0, 0xad) are mapped in order onto code points 256, 257, ... so that no symbol is blank.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    symbols, extra = [], 0
    for b in range(256):
        if b in kept:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def build_tokenizer(model_max_length: int = 256) -> Qwen2Tokenizer:
    """Build the chat tokenizer (ids: the 5 special tokens, then bytes 0..255 at ids 5..260)."""
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *byte_symbols()))}
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token=END,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
