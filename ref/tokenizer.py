"""Tokenizer loading and decoding; a checkpoint without tokenizer files has none.

With no tokenizer, token-id prompts still work and every text field is the empty string.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_dir: str | Path):
    """transformers' AutoTokenizer over the local files, or None when the checkpoint has none."""
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


class TextCodec:
    """Encode prompts and decode outputs, degrading to empty text when there is no tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def has_tokenizer(self) -> bool:
        return self.tokenizer is not None

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `prompt`; add_special_tokens=False leaves out what the tokenizer adds
        around a prompt (e.g. BOS), for text that is not a whole prompt (bad words, templates)."""
        if self.tokenizer is None:
            raise ValueError(
                "prompt: this model has no tokenizer, so text prompts cannot be encoded; "
                "pass {'prompt_token_ids': [...]} instead"
            )
        return list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None or not token_ids:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str | None:
        """One token's text for Logprob.decoded_token (None without a tokenizer)."""
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id])
