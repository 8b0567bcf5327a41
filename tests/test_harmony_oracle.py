"""ossedge's harmony against OpenAI's openai-harmony 0.0.8 (the library vLLM and the
reference implementation use): the same conversation renders to the same text, and every
completion parses to the same final text, reasoning and tool calls."""

from __future__ import annotations

import openai_harmony as oh
import pytest
from harmony_oracle import harmony_encoding

from ossedge.runtime.harmony import Message, ToolSpec, parse_completion, render_conversation

R = oh.Role
EFFORT = {"low": oh.ReasoningEffort.LOW, "medium": oh.ReasoningEffort.MEDIUM,
          "high": oh.ReasoningEffort.HIGH}  # fmt: skip


@pytest.fixture(scope="module")
def encoding(tmp_path_factory):
    return harmony_encoding(tmp_path_factory.mktemp("tiktoken"))


def theirs(enc, messages, *, effort="medium", date=None, instructions=None, tools=None) -> str:
    system = oh.SystemContent.new().with_reasoning_effort(EFFORT[effort])
    if date:
        system = system.with_conversation_start_date(date)
    out = [oh.Message.from_role_and_content(R.SYSTEM, system)]
    if instructions or tools:
        dev = oh.DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions(instructions)
        if tools:
            dev = dev.with_function_tools([oh.ToolDescription.new(t.name, t.description,
                                                                  parameters=t.parameters)
                                           for t in tools])  # fmt: skip
        out.append(oh.Message.from_role_and_content(R.DEVELOPER, dev))
    for m in messages:
        if m.role == "user":
            out.append(oh.Message.from_role_and_content(R.USER, m.content))
        elif m.role == "assistant":
            x = oh.Message.from_role_and_content(R.ASSISTANT, m.content).with_channel(m.channel)
            if m.recipient:
                x = x.with_recipient(m.recipient)
            if m.content_type:
                x = x.with_content_type(f"<|constrain|>{m.content_type}")
            out.append(x)
        else:  # a tool result
            out.append(oh.Message.from_author_and_content(oh.Author.new(R.TOOL, m.name), m.content)
                       .with_channel("commentary").with_recipient("assistant"))  # fmt: skip
    ids = enc.render_conversation_for_completion(oh.Conversation.from_messages(out), R.ASSISTANT)
    return enc.decode_utf8(ids)


WEATHER = ToolSpec("get_weather", "Gets the weather.\nIn one city.", {
    "type": "object", "required": ["loc"], "properties": {
        "loc": {"type": "object", "required": ["city"],
                "properties": {"city": {"type": "string", "description": "City"}}},
        "tags": {"type": "array", "items": {"type": "string"}},
        "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
        "days": {"type": ["integer", "null"]},
        "hint": {"type": "string", "nullable": True, "default": "none"},
        "at": {"oneOf": [{"type": "string", "description": "ISO date"}, {"type": "number"}]},
        "any": {"anyOf": [{"type": "string"}, {"type": "number"}]}}})  # fmt: skip
CASES = {
    "user-low": dict(messages=[Message("user", "Hi")], effort="low"),
    "unicode-high-date": dict(messages=[Message("user", "Grüße, 東京 🎉\n\n  x")], effort="high",
                              date="2026-01-01"),
    "developer": dict(messages=[Message("user", "Hi")], instructions="Be terse.\nUse lists."),
    "multi-turn-analysis-dropped": dict(messages=[
        Message("user", "a"), Message("assistant", "think", channel="analysis"),
        Message("assistant", "ans", channel="final"), Message("user", "b")]),
    "tools": dict(messages=[Message("user", "Weather?")], tools=[
        WEATHER, ToolSpec("now", "Current time.", None)]),
    "past-call-and-result": dict(messages=[
        Message("user", "Weather in Oslo?"),
        Message("assistant", "Need the tool.", channel="analysis"),
        Message.tool_call("get_weather", '{"loc": {"city": "Oslo"}}'),
        Message.tool_result("get_weather", '{"sunny": true}')], tools=[WEATHER]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_text_equals_openai_harmony(encoding, case) -> None:
    c = CASES[case]
    ours = render_conversation(c["messages"], reasoning_effort=c.get("effort", "medium"),
                               current_date=c.get("date"), instructions=c.get("instructions"),
                               tools=c.get("tools"))  # fmt: skip
    assert ours == theirs(encoding, c["messages"], effort=c.get("effort", "medium"),
                          date=c.get("date"), instructions=c.get("instructions"),
                          tools=c.get("tools"))  # fmt: skip


COMPLETIONS = {
    "final": "<|channel|>final<|message|>Hi.<|return|>",
    "analysis-then-final": "<|channel|>analysis<|message|>think<|end|><|start|>assistant"
                           "<|channel|>final<|message|>Hi.<|return|>",
    "call-recipient-after": '<|channel|>commentary to=functions.f <|constrain|>json<|message|>'
                            '{"a":1}<|call|>',
    "call-recipient-before": ' to=functions.f<|channel|>commentary <|constrain|>json<|message|>'
                             '{"a":1}<|call|>',
    "call-bare-json": ' to=functions.f<|channel|>commentary json<|message|>{"a":1}<|call|>',
    "constrain-no-space": '<|channel|>commentary to=functions.f<|constrain|>json<|message|>'
                          '{"a":1}<|call|>',
    "preamble-then-call": "<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant"
                          "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}"
                          "<|call|>",
    "two-calls": "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|end|>"
                 "<|start|>assistant<|channel|>commentary to=functions.g <|constrain|>json"
                 '<|message|>{"b": [1, 2]}<|call|>',
    "truncated-final": "<|channel|>analysis<|message|>think<|end|><|start|>assistant"
                       "<|channel|>final<|message|>Hel",
    "unicode": "<|channel|>final<|message|>Grüße 🎉 東京<|return|>",
}  # fmt: skip


def _summary(messages) -> tuple:
    """(final text, reasoning, tool calls as (recipient, raw, content type)) of parsed messages."""
    shown = [m for m in messages if m[1] is None]
    final = "".join(c for ch, _, c, _ in shown if ch == "final") or None
    reasoning = "\n\n".join(c for ch, _, c, _ in shown if ch == "analysis")
    calls = [(r, c, t) for _, r, c, t in messages if r is not None]
    return final, reasoning, calls


@pytest.mark.parametrize("case", list(COMPLETIONS))
def test_completion_parses_as_openai_harmony_parses_it(encoding, case) -> None:
    text = COMPLETIONS[case]
    parsed = encoding.parse_messages_from_completion_tokens(
        encoding.encode(text, allowed_special="all"), R.ASSISTANT)
    theirs = _summary([(m.channel, m.recipient, "".join(c.text for c in m.content),
                        (m.content_type or "").removeprefix("<|constrain|>") or None)
                       for m in parsed])  # fmt: skip
    reply = parse_completion(text)
    ours = (reply.final, reply.reasoning,
            [(c.recipient, c.raw, c.content_type) for c in reply.tool_calls])  # fmt: skip
    assert ours == theirs
    assert reply.issues == []
