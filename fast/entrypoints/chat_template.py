"""Chat messages -> one engine prompt: the rendering lives in `ref/chat.py` (shared by both
engines' `LLM.chat` and this server); these names are re-exported for existing importers."""

from ref.chat import (
    DEFAULT_CHAT_TEMPLATE, DEFAULT_GENERATION_PROMPT, chat_prompt, chat_prompts, render_default,
)

__all__ = ["DEFAULT_CHAT_TEMPLATE", "DEFAULT_GENERATION_PROMPT", "chat_prompt", "chat_prompts", "render_default"]
