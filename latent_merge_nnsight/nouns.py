"""The package's nouns as type aliases, so signatures say what they take instead of `Any`.

- `Model`: what `lmn.load` / `lmn.wrap` return (an nnsight `LanguageModel`), or the Hugging Face module
  it wraps (the engines and `unwrap` take either);
- `Chat`, `Prompts`: one chat (OpenAI-style messages), and what `lmn.generate` takes as prompts: a string,
  strings, a chat or chats;
- `Tokenizer`: a Hugging Face tokenizer.

`Sources` and `RecipeLike` (which name the package's own `Deltas`, `Recipe` and `Ensemble`) live in
`latent_merge_nnsight.plan`, beside the code that resolves them. This module imports nothing of the
package, so any module may use it; `Model` and `Tokenizer` are `Any` at run time (no torch, nnsight or
transformers import here) and the classes they name for a type checker.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

__all__ = ["Chat", "Model", "Prompts", "Tokenizer"]

if TYPE_CHECKING:
    from nnsight import LanguageModel
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    Model: TypeAlias = LanguageModel | nn.Module
    Tokenizer: TypeAlias = PreTrainedTokenizerBase
else:
    Model = Any
    Tokenizer = Any

Chat: TypeAlias = list[dict[str, str]]
Prompts: TypeAlias = str | Sequence[str] | Chat | Sequence[Chat]
