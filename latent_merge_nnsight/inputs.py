"""Turn what users pass as prompts into `input_ids` + a full-width `attention_mask`.

Accepted forms: a string, a list of strings, one chat (a list of `{"role", "content"}` dicts), a list of
chats (the tokenizer's chat template is applied with a generation prompt), a tensor of ids, a mapping
with `input_ids` (and optionally `attention_mask`), or a list whose items may also be token-id lists
(each row is then those ids as they are, padded like the rest).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch
from jaxtyping import Int
from torch import Tensor

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.nouns import Chat, Prompts, Tokenizer

__all__ = ["Batch", "TokenIds", "check_context", "encode", "is_chat", "is_token_ids"]

TokenIds: TypeAlias = Tensor | Sequence[int] | Sequence[Sequence[int]]
"""Prompts given as token ids: a tensor `[batch, pos]` or `[pos]`, one row of ids, or rows of ids (an
attention mask takes the same forms)."""


@dataclass(frozen=True)
class Batch:
    """Token ids and the mask that says which are real (1) and which are padding (0)."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    def to(self, device: str | torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device))


def is_token_ids(obj: object) -> bool:
    """True for one prompt given as token ids: a non-empty list of ints."""
    return (
        isinstance(obj, Sequence)
        and not isinstance(obj, str)
        and len(obj) > 0
        and all(isinstance(t, int) and not isinstance(t, bool) for t in obj)
    )


def is_chat(obj: object) -> bool:
    """True for one chat: a non-empty list of dicts with a `role` key."""
    return (
        isinstance(obj, Sequence)
        and not isinstance(obj, str)
        and len(obj) > 0
        and all(isinstance(m, Mapping) and "role" in m for m in obj)
    )


def _from_tensors(input_ids: TokenIds, attention_mask: TokenIds | None) -> Batch:
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise LatentMergeError(
            f"input_ids has shape {tuple(ids.shape)} and dtype {ids.dtype}; expected integer ids [batch, pos]"
        )
    if ids.shape[1] == 0:
        raise LatentMergeError("input_ids is empty (0 positions); expected at least one token per row")
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = torch.as_tensor(attention_mask, device=ids.device)
        if mask.ndim == 1:
            mask = mask[None, :]
        if mask.shape != ids.shape:
            raise LatentMergeError(
                f"attention_mask has shape {tuple(mask.shape)}; expected {tuple(ids.shape)} like input_ids"
            )
        mask = mask.long()
    if bool((mask.sum(dim=-1) == 0).any()):
        raise LatentMergeError(
            "attention_mask has a row with no real tokens; every prompt needs at least one"
        )
    return Batch(ids.long(), mask)


def encode(
    tokenizer: Tokenizer,
    prompts: Prompts | None = None,
    *,
    input_ids: TokenIds | None = None,
    attention_mask: TokenIds | None = None,
    padding_side: Literal["left", "right"] | None = None,
    chat: bool | None = None,
) -> Batch:
    """Tokenize `prompts` (or take `input_ids`) into a padded `Batch`.

    Arguments:
        tokenizer: a Hugging Face tokenizer (needed unless ids are given).
        prompts: a string, list of strings, one chat, a list of chats, a tensor of ids, or a mapping.
        padding_side: defaults to the tokenizer's own side (nnsight sets it to "left").
        chat: force (True) or skip (False) the chat template for strings; chats always use it.
    """
    if padding_side not in (None, "left", "right"):
        raise LatentMergeError(
            f"padding_side={padding_side!r}; expected 'left' or 'right'",
            param="padding_side",
            value=padding_side,
        )
    if input_ids is not None or isinstance(prompts, Tensor):
        if prompts is not None and input_ids is not None:
            raise LatentMergeError("give either prompts or input_ids, not both")
        return _from_tensors(input_ids if input_ids is not None else prompts, attention_mask)
    if isinstance(prompts, Mapping):
        if "input_ids" not in prompts:
            raise LatentMergeError(f"prompts mapping has keys {sorted(prompts)}; expected 'input_ids'")
        return _from_tensors(prompts["input_ids"], prompts.get("attention_mask"))
    if prompts is None:
        raise LatentMergeError(
            "no prompts given; pass a string, a list of strings, chat messages or input_ids"
        )

    if isinstance(prompts, str) or is_chat(prompts):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise LatentMergeError(
            f"prompts={prompts!r}; expected a string, a list of strings, chat messages or input_ids"
        )
    if tokenizer is None:
        raise LatentMergeError(
            "this model has no tokenizer; pass input_ids (and attention_mask) instead of text"
        )

    if any(is_token_ids(p) for p in prompts):
        return _id_rows(tokenizer, prompts, chat, padding_side)
    texts, templated = _texts(tokenizer, prompts, chat)

    return _tokenize(tokenizer, texts, templated, padding_side)


def _id_rows(
    tokenizer: Tokenizer,
    prompts: Sequence[str | Chat | Sequence[int]],
    chat: bool | None,
    padding_side: str | None,
) -> Batch:
    """A batch some of whose prompts are token ids: those rows as given, the others tokenized as `encode`
    tokenizes them alone (a chat without added special tokens, a raw string with them), padded."""
    rows: list[list[int]] = []
    for i, p in enumerate(prompts):
        if is_token_ids(p):
            rows.append([int(t) for t in p])
            continue
        (text,), templated = _texts(tokenizer, [p], chat)
        rows.append(list(tokenizer(text, add_special_tokens=not templated)["input_ids"]))
        if not rows[-1]:
            raise LatentMergeError(f"prompts[{i}] encodes to no tokens; every prompt needs at least one")
    side = padding_side or getattr(tokenizer, "padding_side", "left") or "left"
    pad = tokenizer.pad_token_id
    if pad is None:
        raise LatentMergeError(
            "the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the eos token) before batching"
        )
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        at = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, at], mask[i, at] = torch.tensor(r), 1
    return _from_tensors(ids, mask)


def _texts(
    tokenizer: Tokenizer, prompts: Sequence[str | Chat | Sequence[int]], chat: bool | None
) -> tuple[list[str], bool]:
    """Each prompt as the text to tokenize (chats through the chat template), and whether any was
    templated (the template already holds the special tokens)."""
    texts: list[str] = []
    templated = False
    for i, p in enumerate(prompts):
        if p == "":
            raise LatentMergeError(f"prompts[{i}] is empty; every prompt needs at least one token")
        if is_chat(p) or (chat and isinstance(p, str)):
            messages = p if is_chat(p) else [{"role": "user", "content": p}]
            if getattr(tokenizer, "chat_template", None) is None:
                raise LatentMergeError(
                    f"prompts[{i}] is a chat but the tokenizer has no chat_template; pass plain strings"
                )
            texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            templated = True
        elif isinstance(p, str):
            texts.append(p)
        else:
            raise LatentMergeError(f"prompts[{i}] has type {type(p).__name__}; expected a string or a chat")
        if texts[-1] == "":
            raise LatentMergeError(f"prompts[{i}] is empty; every prompt needs at least one token")
    return texts, templated


def _tokenize(tokenizer: Tokenizer, texts: list[str], templated: bool, padding_side: str | None) -> Batch:
    """The texts tokenized and padded on `padding_side` (default: the tokenizer's own side)."""
    side = padding_side or getattr(tokenizer, "padding_side", "left") or "left"
    if tokenizer.pad_token_id is None:
        raise LatentMergeError(
            "the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the eos token) before batching"
        )
    old_side = tokenizer.padding_side
    tokenizer.padding_side = side
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(flags, dict):  # the length check that names the model's context is `check_context`
        flags["sequence-length-is-longer-than-the-specified-maximum"] = True
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    finally:
        tokenizer.padding_side = old_side
    return _from_tensors(enc["input_ids"], enc["attention_mask"])


def check_context(batch: Batch, max_new_tokens: int, context: int | None, name: str) -> None:
    """Warn when a prompt (plus the new tokens) does not fit the model's context of `context` tokens."""
    if not context:
        return
    longest = int(batch.attention_mask.sum(dim=-1).max())
    if longest + max_new_tokens > context:
        import warnings

        warnings.warn(
            f"the longest prompt has {longest} tokens; with max_new_tokens={max_new_tokens} that is "
            f"{longest + max_new_tokens} > {name}'s context of {context} tokens "
            "(config.max_position_embeddings): tokens past it are unreliable; shorten the prompt",
            stacklevel=3,
        )
