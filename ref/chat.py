"""Chat messages -> engine prompts (`LLM.chat` of both engines, and the server's chat endpoint).

A conversation is a list of `{"role": str, "content": str}` dicts (other keys are passed to the
template untouched). It is rendered with, in this order of preference:
- `chat_template`, a Jinja template given by the caller, or the tokenizer's own `chat_template`
  (from its tokenizer_config.json): `tokenizer.apply_chat_template`, and the text is tokenized
  with `add_special_tokens=False`, since such templates write BOS and the like themselves;
- otherwise (e.g. the embedded tiny model, or any base model) this documented default, tokenized
  like a completion prompt:

    <|system|>
    You are terse.
    <|user|>
    Hello!
    <|assistant|>

  i.e. "<|{role}|>\\n{content}\\n" per message, then "<|assistant|>\\n" for the reply when
  `add_generation_prompt` (the default).

Errors are ValueErrors naming `messages` (no tokenizer, a malformed message, a template that
rejects the messages) or `chat_template` (not a string, or not a valid Jinja template).
"""

from __future__ import annotations

from typing import Any

DEFAULT_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
DEFAULT_GENERATION_PROMPT = "<|assistant|>\n"


def render_default(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The default template's text for `messages` ({"role", "content"} dicts)."""
    text = "".join(DEFAULT_CHAT_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages)
    return text + (DEFAULT_GENERATION_PROMPT if add_generation_prompt else "")


def check_conversation(messages: Any, where: str = "messages") -> None:
    """A conversation is a non-empty list of dicts with string "role" and "content"."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where} must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{i}] must be a dict with string 'role' and 'content', got {m!r}")


def chat_prompt(messages: list[dict[str, str]], tokenizer, chat_template: str | None = None,
                add_generation_prompt: bool = True) -> Any:
    """The engine prompt for one conversation: a string (default template) or a token-id dict
    {"prompt": text, "prompt_token_ids": ids}. Raises ValueError naming `messages` or
    `chat_template` (this module's docstring)."""
    if tokenizer is None:
        raise ValueError("messages: this model has no tokenizer, so chat is unavailable; "
                         "use /v1/completions with token ids")
    check_conversation(messages)
    if chat_template is not None and not isinstance(chat_template, str):
        raise ValueError(f"chat_template must be None or a Jinja template string, got {chat_template!r}")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        return render_default(messages, add_generation_prompt)
    text = _apply_template(tokenizer, list(messages), chat_template, add_generation_prompt)
    return {"prompt": text, "prompt_token_ids": list(tokenizer.encode(text, add_special_tokens=False))}


def _apply_template(tokenizer, messages: list[dict], chat_template: str | None,
                    add_generation_prompt: bool) -> str:
    """`tokenizer.apply_chat_template` as text; a bad template or one refusing the messages is a
    ValueError naming the culprit."""
    from jinja2 import TemplateSyntaxError

    # Only pass chat_template when given, so tokenizer-likes without that keyword still work.
    extra = {} if chat_template is None else {"chat_template": chat_template}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **extra)
    except TemplateSyntaxError as e:
        raise ValueError(f"chat_template is not a valid Jinja template: {e}") from None
    except Exception as e:  # jinja raises TemplateError subclasses for messages it refuses
        raise ValueError(f"messages: the chat template rejected them: {e}") from None


def chat_prompts(messages: Any, tokenizer, chat_template: str | None = None,
                 add_generation_prompt: bool = True) -> list[Any]:
    """Engine prompts for one conversation (a list of message dicts) or a list of them, in
    order; every conversation is rendered (and checked) before any is returned."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a conversation (a non-empty list of message dicts) or a "
                         f"non-empty list of conversations, got {messages!r}")
    conversations = [messages] if isinstance(messages[0], dict) else list(messages)
    return [chat_prompt(c, tokenizer, chat_template, add_generation_prompt) for c in conversations]
