"""Tool calling in chat: templates with tools render as transformers renders them, SFT
trains only on what the assistant writes, and generated calls parse into OpenAI's form.

References: ``transformers.PreTrainedTokenizerFast.apply_chat_template`` (rendered text,
token ids and, through the templates' ``{% generation %}`` markers, the assistant mask),
and for the parsers the text the family's own template writes for known calls.
"""

import copy
import json

import pytest
import transformers
from helpers.finetune import write_jsonl
from helpers.tool_templates import (
    BOS,
    CALLS,
    CONVERSATION,
    EOS,
    MISTRAL,
    PAD,
    QWEN,
    TOOLS,
    write_printable_tokenizer,
)

from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.finetune.chat import ChatFormatError, ChatTemplate, format_chat
from neox_jax.finetune.sft_data import load_examples
from neox_jax.inference.tool_calls import (
    MARKERS,
    StreamSplitter,
    ToolCallError,
    detect_format,
    for_template,
    parse_tool_calls,
    tool_names,
)

TEMPLATES = {"qwen": QWEN, "mistral": MISTRAL}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_printable_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def _conversation(family):
    """Mistral's v0.3 template writes the system prompt into the last user turn only, so
    a conversation with one is not prefix-consistent there (refused, tested below)."""
    return CONVERSATION if family == "qwen" else CONVERSATION[1:]


def _hf(tok_dir, template):
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tok_dir / "tokenizer.json"),
        chat_template=template,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
    )


@pytest.mark.parametrize("family", TEMPLATES)
def test_templates_with_tools_render_exactly_as_transformers(tok, tok_dir, family):
    hf = _hf(tok_dir, TEMPLATES[family])
    ours = ChatTemplate.for_tokenizer(tok, TEMPLATES[family])
    cases = [
        (CONVERSATION, TOOLS, False),  # calls, results and the final answer
        (CONVERSATION[:5], TOOLS, True),  # the prompt for the answer after the results
        (CONVERSATION[:2], TOOLS, True),  # the prompt that offers the tools
        (CONVERSATION[:2], None, True),  # no tools: the plain system turn
    ]
    for messages, tools, gen in cases:
        want = hf.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=gen
        )
        assert ours.render(messages, add_generation_prompt=gen, tools=tools) == want
        assert format_chat(messages, tok, TEMPLATES[family], gen, tools=tools) == want
        assert ("get_weather" in want) == (tools is not None)


def test_tools_given_to_a_template_without_them_are_refused(tok):
    with pytest.raises(ChatFormatError, match="never renders 'tools'"):
        format_chat(CONVERSATION[:2], tok, None, tools=TOOLS)


@pytest.mark.parametrize("family", TEMPLATES)
def test_sft_loss_mask_is_the_assistant_turns_only(tmp_path, tok, tok_dir, family):
    """ids and mask equal transformers' ``return_assistant_tokens_mask`` (computed from the
    template's generation markers, not from our prefix rendering); the tool results and
    the offered tools carry no loss."""
    messages = _conversation(family)
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": TEMPLATES[family]}))
    record = {"tools": TOOLS, "messages": messages}
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    (ex,), stats = load_examples(path, tok, max_len=4096, chat_template=str(cfg))
    ref = _hf(tok_dir, TEMPLATES[family]).apply_chat_template(
        messages, tools=TOOLS, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ex[0].tolist() == list(ref["input_ids"])
    assert ex[1].tolist() == list(ref["assistant_masks"])
    trained = tok.decode(ex[0][ex[1] == 1])
    assert "Paris" in trained and "get_time" in trained and "18 C in Paris" in trained
    assert "temp" not in trained and "12:00" not in trained.replace("12:00 UTC", "")
    assert "Current weather" not in trained  # the tool schemas are prompt, not answer
    assert stats.target_tokens == int(ex[1][1:].sum())
    if family == "mistral":
        with pytest.raises(ChatFormatError, match="not prefix-consistent at message 2"):
            ChatTemplate.for_tokenizer(tok, MISTRAL).segments(CONVERSATION, TOOLS)


@pytest.mark.parametrize("family", TEMPLATES)
def test_calls_written_by_the_template_parse_back(tok, family):
    """The assistant turn the template writes for CALLS (what the model is trained to
    generate), minus its end-of-turn, parses into OpenAI's structure of the same calls."""
    chat = ChatTemplate.for_tokenizer(tok, TEMPLATES[family])
    pieces = chat.segments(_conversation(family), TOOLS)
    turn = [text for text, is_assistant in pieces if is_assistant][0]
    generated = turn.removesuffix("<|im_end|>\n").removesuffix(EOS)
    assert detect_format(TEMPLATES[family]) == family
    reply = parse_tool_calls(generated, family, tool_names(TOOLS))
    assert reply.content is None
    assert [c["type"] for c in reply.tool_calls] == ["function", "function"]
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
           for c in reply.tool_calls]  # fmt: skip
    assert got == [(c["function"]["name"], c["function"]["arguments"]) for c in CALLS]
    if family == "mistral":  # ids travel in Mistral's format
        assert [c["id"] for c in reply.tool_calls] == ["call00001", "call00002"]
    else:
        assert all(c["id"].startswith("call_") for c in reply.tool_calls)
    # OpenAI's JSON-text arguments render back into the very same turn.
    openai_style = copy.deepcopy(CONVERSATION[:3])
    openai_style[2]["tool_calls"] = [
        {**c, "id": want["id"]} for c, want in zip(reply.tool_calls, CALLS, strict=True)
    ]
    want = chat.render(CONVERSATION[:3], tools=TOOLS)
    assert chat.render(for_template(openai_style), tools=TOOLS) == want


def test_prose_before_calls_and_the_newer_mistral_form():
    text = 'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    reply = parse_tool_calls(text, "qwen")
    assert reply.content == "Let me check.\n"
    assert reply.tool_calls[0]["function"] == {"name": "get_time", "arguments": "{}"}
    assert parse_tool_calls("just text", "qwen").tool_calls == []
    newer = '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}'
    calls = parse_tool_calls(newer, "mistral").tool_calls
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {"tz": "CET"}),
    ]
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in calls)


@pytest.mark.parametrize(
    "family,text,match",
    [
        ("qwen", '<tool_call>{"name": "get_time", "arguments": {}</tool_call>', "not valid JSON"),
        ("qwen", '<tool_call>\n{"name": "get_time", "arguments": {}}', "not closed"),
        ("qwen", '<tool_call>{"arguments": {}}</tool_call>', '"name" string'),
        ("qwen", '<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>', "JSON object"),
        ("qwen", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "not an offered"),
        ("mistral", '[TOOL_CALLS] [{"name": "get_time", "arguments": {}', "not valid JSON"),
        ("mistral", "[TOOL_CALLS] []", "non-empty JSON list"),
        ("mistral", "[TOOL_CALLS]get_time{}", r"name\[ARGS\]"),
    ],
)  # fmt: skip
def test_malformed_calls_are_clear_errors(family, text, match):
    with pytest.raises(ToolCallError, match=match) as e:
        parse_tool_calls(text, family, tool_names(TOOLS))
    assert e.value.text == text


@pytest.mark.parametrize("family", TEMPLATES)
def test_streamed_prose_and_calls_equal_the_whole_parse(family):
    """Cut at every position into two pieces (and char by char): the streamed prose plus
    what ``finish`` returns equals parsing the whole text; no marker text leaks out."""
    obj = '{"name": "get_time", "arguments": {"tz": "UTC"}'
    call = {"qwen": f"<tool_call>\n{obj}}}\n</tool_call>",
            "mistral": f'[TOOL_CALLS] [{obj}, "id": "abcdefghi"}}]'}  # fmt: skip
    for text in ("Sure <b>[x] " + call[family], "no calls here <tool <b [TOOL"):
        whole = parse_tool_calls(text, family)
        cuts = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
        for pieces in cuts:
            splitter = StreamSplitter(family)
            streamed = "".join(splitter.feed(p) for p in pieces)
            tail, calls = splitter.finish()
            assert streamed + tail == (whole.content or "")
            assert [c["function"] for c in calls] == [c["function"] for c in whole.tool_calls]
            assert MARKERS[family] not in streamed
