"""The character-level chat tokenizer of the toy model pair, built as a plain `transformers` tokenizer.

One token per character of printable ASCII plus newline (anything else becomes ``<|unk|>``), and six
special tokens: ``<|pad|>``, ``<|end|>`` (end of turn and EOS), ``<|unk|>`` and the role markers
``<|system|>``, ``<|user|>``, ``<|assistant|>``. A chat renders as
``<|user|>What is 2+3?<|end|><|assistant|>Answer: 5<|end|>``.

It is a `tokenizers` BPE model with an empty merge list (so every character is its own token) and a
`Fuse` decoder, wrapped in `PreTrainedTokenizerFast`. `save_pretrained` writes a tokenizer.json, so
`AutoTokenizer.from_pretrained(folder)` loads it back with no custom code.
"""

from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, END, UNK = "<|pad|>", "<|end|>", "<|unk|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{r}|>" for r in ROLES)
SPECIAL_TOKENS = (PAD, END, UNK, *ROLE_TOKENS)
CHARACTERS = ("\n", *(chr(c) for c in range(32, 127)))

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


def build_tokenizer(model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """Build the character-level chat tokenizer (ids: specials 0-5, then newline and ASCII 32-126)."""
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=END,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
