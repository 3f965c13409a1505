"""Prompts against a system's context: refuse, cut their start, or feed them whole (`--truncate`).

One rule for every command that feeds a local system prompts it did not write (`lmn respond`'s questions,
`lmn judgebench-accuracy --judge-system`'s judge prompts): a prompt that leaves less than
``max_new_tokens`` of the context is an error by default, naming the numbers.
"""

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from latent_merge_nnsight.errors import LatentMergeError

if TYPE_CHECKING:
    from latent_merge_nnsight.systems.loaded import LoadedSystem

TRUNCATE: tuple[str, ...] = ("error", "left", "none")
"""What to do with a prompt over the context: refuse it, cut the start of its last message, feed it whole."""

Chat = list[dict[str, Any]]


def check_truncate(truncate: object) -> str:
    if truncate not in TRUNCATE:
        raise LatentMergeError(
            f"truncate={truncate!r}; expected one of {TRUNCATE}", param="truncate", value=truncate
        )
    return truncate


def fit_chats(
    loaded: "LoadedSystem",
    chats: Sequence[Sequence[Mapping[str, Any]]],
    budget: int,
    truncate: str,
    what: str,
) -> list[tuple[Chat, int]]:
    """Each chat as it is to be asked, with the tokens cut from the start of its last message (0: whole).

    `loaded` gives `context_length`, `count_prompt_tokens` and `tokenizer`; `budget` is the tokens to be
    generated after the prompt; `what` names the prompts in the error ("questions", "judge prompts").
    """
    out = [([dict(m) for m in chat], 0) for chat in chats]
    context = getattr(loaded, "context_length", None)
    if check_truncate(truncate) == "none" or context is None or not chats:
        return out
    room = context - budget
    lengths = [loaded.count_prompt_tokens(chat) for chat, _ in out]
    long = [i for i, n in enumerate(lengths) if n > room]
    if long and (truncate == "error" or room < 1):
        raise LatentMergeError(
            f"{len(long)} of {len(chats)} {what} do not fit the model's context of {context} tokens "
            f"with max_new_tokens={budget} after them (the longest prompt has {max(lengths)} tokens); "
            "pass truncate='left' (--truncate left) to cut their start, or truncate='none' "
            "(--truncate none) to feed them whole past the context"
        )
    for i in long:
        out[i] = _cut_left(loaded, out[i][0], lengths[i] - room, room)
    return out


def _cut_left(loaded: "LoadedSystem", chat: Chat, cut: int, room: int) -> tuple[Chat, int]:
    """`chat` with the first tokens of its last message cut until the prompt fits `room` tokens."""
    text = str(chat[-1]["content"])
    # verbose=False: the text is longer than the model takes, which is why it is being cut (no warning)
    ids = loaded.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def with_text(start: int) -> Chat:
        return [*chat[:-1], {**chat[-1], "content": loaded.tokenizer.decode(ids[start:])}]

    fitted = with_text(cut)
    while loaded.count_prompt_tokens(fitted) > room and cut < len(ids):
        cut += 1  # a re-encoded cut can merge into more tokens than it had
        fitted = with_text(cut)
    return fitted, cut
