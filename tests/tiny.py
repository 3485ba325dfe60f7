"""Re-export of `arca.models.tiny` so tests keep importing `tests.tiny`."""

from arca.models.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, tiny_model, tiny_tokenizer

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "tiny_model", "tiny_tokenizer"]
