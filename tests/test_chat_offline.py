"""`LLM.chat` (SPEC §2) in both engines, and the rendering it shares with the server (`ref/chat.py`).

The rendered prompts are checked against a direct definition: the documented default text, or
the caller's Jinja template rendered with jinja2 itself; a chat is then exactly `generate` of that
prompt. Errors name `messages` or `chat_template` and queue nothing.
"""

from __future__ import annotations

import jinja2
import pytest

from ref.sampling_params import SamplingParams

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}]
OTHER = [{"role": "user", "content": "Name a colour."}]
DEFAULT_TEXT = "<|system|>\nYou are terse.\n<|user|>\nHello!\n<|assistant|>\n"
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}" \
           "{% if add_generation_prompt %}<assistant>{% endif %}"
GREEDY = SamplingParams(temperature=0, max_tokens=4)


def _render(template: str, messages, add_generation_prompt: bool) -> str:
    return jinja2.Environment().from_string(template).render(messages=messages,
                                                             add_generation_prompt=add_generation_prompt)


def test_default_template_text_and_tokens(ref_llm):
    out = ref_llm.chat(CHAT, GREEDY)
    assert len(out) == 1 and out[0].finished
    assert out[0].prompt == DEFAULT_TEXT
    assert out[0].prompt_token_ids == ref_llm.get_tokenizer().encode(DEFAULT_TEXT)  # as a completion prompt
    assert out[0].outputs == ref_llm.generate(DEFAULT_TEXT, GREEDY)[0].outputs


def test_add_generation_prompt_false_leaves_out_the_assistant_header(ref_llm):
    out = ref_llm.chat(CHAT, GREEDY, add_generation_prompt=False)[0]
    assert out.prompt == DEFAULT_TEXT.removesuffix("<|assistant|>\n")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_a_given_jinja_template(ref_llm, add_generation_prompt):
    out = ref_llm.chat(CHAT, GREEDY, chat_template=TEMPLATE, add_generation_prompt=add_generation_prompt)[0]
    text = _render(TEMPLATE, CHAT, add_generation_prompt)
    assert out.prompt == text
    # the template writes any special tokens itself: the text is tokenized without them
    assert out.prompt_token_ids == ref_llm.get_tokenizer().encode(text, add_special_tokens=False)


def test_a_batch_of_conversations_in_order(ref_llm):
    outs = ref_llm.chat([CHAT, OTHER, CHAT], [GREEDY, SamplingParams(temperature=0, max_tokens=2), GREEDY])
    assert [o.prompt for o in outs] == [DEFAULT_TEXT, "<|user|>\nName a colour.\n<|assistant|>\n", DEFAULT_TEXT]
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 2, 4]
    assert outs[0].outputs == outs[2].outputs


@pytest.mark.parametrize("messages, kwargs, message", [
    ([], {}, "^messages must be"),
    ([[]], {}, "^messages must be"),
    ([{"role": "user"}], {}, r"^messages\[0\] must be"),
    ([{"role": "user", "content": 5}], {}, r"^messages\[0\] must be"),
    (["hello"], {}, "^messages must be"),
    ([CHAT, [{"content": "x"}]], {}, r"^messages\[0\] must be"),
    (CHAT, {"chat_template": 5}, "^chat_template must be"),
    (CHAT, {"chat_template": "{% for m in messages %}"}, "^chat_template is not a valid Jinja template"),
    (CHAT, {"chat_template": "{{ raise_exception('no system messages') }}"},
     "^messages: the chat template rejected them: .*no system messages"),
])
def test_bad_chats_name_the_field_and_queue_nothing(ref_llm, messages, kwargs, message):
    work_before = ref_llm.llm_engine.get_metrics().kv_slot_steps_reserved
    with pytest.raises(ValueError, match=message):
        ref_llm.chat(messages, GREEDY, **kwargs)
    assert not ref_llm.llm_engine.has_unfinished_requests()
    assert ref_llm.llm_engine.get_metrics().kv_slot_steps_reserved == work_before, "something ran"


def test_a_bad_request_in_a_chat_batch_queues_nothing(ref_llm):
    work_before = ref_llm.llm_engine.get_metrics().kv_slot_steps_reserved
    long_chat = [{"role": "user", "content": "x " * 4000}]
    with pytest.raises(ValueError, match="^prompt length must be <= max_model_len"):
        ref_llm.chat([CHAT, long_chat], GREEDY)
    assert not ref_llm.llm_engine.has_unfinished_requests()
    assert ref_llm.llm_engine.get_metrics().kv_slot_steps_reserved == work_before, "something ran"


def test_chat_needs_a_tokenizer(tiny_model_dir):
    from ref import LLM

    with pytest.raises(ValueError, match="^messages: .*no tokenizer"):
        LLM(tiny_model_dir, skip_tokenizer_init=True).chat(CHAT)


def test_fast_chat_renders_as_the_oracle_and_generates_as_its_generate(tiny_model_dir, ref_llm):
    from fast import LLM

    llm = LLM(tiny_model_dir, max_model_len=128, block_size=8)
    try:
        outs = llm.chat([CHAT, OTHER], GREEDY, use_tqdm=False)
        oracle = ref_llm.chat([CHAT, OTHER], GREEDY)
        assert [(o.prompt, o.prompt_token_ids) for o in outs] == [(o.prompt, o.prompt_token_ids) for o in oracle]
        assert outs[0].outputs == llm.generate(DEFAULT_TEXT, GREEDY, use_tqdm=False)[0].outputs
        templated = llm.chat(CHAT, GREEDY, chat_template=TEMPLATE, add_generation_prompt=False, use_tqdm=False)[0]
        assert templated.prompt == _render(TEMPLATE, CHAT, False)
        with pytest.raises(ValueError, match=r"^messages\[0\] must be"):
            llm.chat([{"role": "user"}], use_tqdm=False)
    finally:
        llm.shutdown()


def test_the_server_module_reexports_the_rendering():
    import ref.chat
    from fast.entrypoints import chat_template

    for name in ("chat_prompt", "render_default", "DEFAULT_CHAT_TEMPLATE", "DEFAULT_GENERATION_PROMPT"):
        assert getattr(chat_template, name) is getattr(ref.chat, name)
    assert chat_template.render_default(CHAT) == DEFAULT_TEXT
