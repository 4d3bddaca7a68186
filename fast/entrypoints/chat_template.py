"""Chat messages -> one engine prompt.

With the tokenizer's own `chat_template` (from its tokenizer_config.json) the rendered text is
tokenized with `add_special_tokens=False`, since such templates write BOS and the like
themselves. A checkpoint without one (e.g. the embedded tiny model, or any base model) gets this
documented default, tokenized like a completion prompt:

    <|system|>
    You are terse.
    <|user|>
    Hello!
    <|assistant|>

i.e. "<|{role}|>\\n{content}\\n" per message, then "<|assistant|>\\n" for the reply.
"""

from __future__ import annotations

from typing import Any

DEFAULT_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
DEFAULT_GENERATION_PROMPT = "<|assistant|>\n"


def render_default(messages: list[dict[str, str]]) -> str:
    """The default template's text for `messages` ({"role", "content"} dicts)."""
    return "".join(DEFAULT_CHAT_TEMPLATE.format(**m) for m in messages) + DEFAULT_GENERATION_PROMPT


def chat_prompt(messages: list[dict[str, str]], tokenizer) -> Any:
    """The engine prompt for `messages`: a string (default template) or a token-id dict.

    Raises ValueError "messages: ..." when there is no tokenizer or the template rejects them.
    """
    if tokenizer is None:
        raise ValueError("messages: this model has no tokenizer, so chat is unavailable; "
                         "use /v1/completions with token ids")
    if not getattr(tokenizer, "chat_template", None):
        return render_default(messages)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises TemplateError subclasses for messages it refuses
        raise ValueError(f"messages: the chat template rejected them: {e}") from None
    return {"prompt": text, "prompt_token_ids": list(tokenizer.encode(text, add_special_tokens=False))}
