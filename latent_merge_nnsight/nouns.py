"""The package's nouns as type aliases, so signatures say what they take instead of `Any`.

- `Model`: what `lmn.load` / `lmn.wrap` return (an nnsight `LanguageModel`), or the Hugging Face module
  it wraps (the engines and `unwrap` take either);
- `Chat`, `Prompts`: one chat (OpenAI-style messages), and what `lmn.generate` takes as prompts: a string,
  strings, a chat or chats;
- `Tokenizer`: a Hugging Face tokenizer.

`Sources` and `RecipeLike` (which name the package's own `Deltas`, `Recipe` and `Ensemble`) live in
`latent_merge_nnsight.plan`, beside the code that resolves them. This module imports nothing of the
package, so any module may use it (the aliases are strings: no torch or nnsight import at run time).
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from nnsight import LanguageModel
    from torch import nn
    from transformers import PreTrainedTokenizerBase

__all__ = ["Chat", "Model", "Prompts", "Tokenizer"]

Model: TypeAlias = "LanguageModel | nn.Module"
Chat: TypeAlias = list[dict[str, str]]
Prompts: TypeAlias = str | Sequence[str] | Chat | Sequence[Chat]
Tokenizer: TypeAlias = "PreTrainedTokenizerBase"
