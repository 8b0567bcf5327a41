"""ossedge's harmony against OpenAI's openai-harmony 0.0.8 (the library vLLM and the
reference implementation use): the same conversation renders to the same text, and every
completion it parses, ossedge parses to the same final text, reasoning and tool calls. Where
ossedge deliberately differs, the case says why; completions it refuses, ossedge reports."""

from __future__ import annotations

import openai_harmony as oh
import pytest
from harmony_oracle import harmony_encoding
from hypothesis import given, settings
from hypothesis import strategies as st
from ossedge.runtime.errors import HarmonyError
from ossedge.runtime.harmony import (
    DEFAULT_IDENTITY,
    DEFAULT_KNOWLEDGE_CUTOFF,
    Message,
    ToolSpec,
    render_conversation,
)
from ossedge.runtime.harmony_parse import StreamParser, parse_completion
from ossedge.runtime.tokenizer import Tokenizer, build_synthetic_tokenizer, special_layout

R = oh.Role
EFFORT = {"low": oh.ReasoningEffort.LOW, "medium": oh.ReasoningEffort.MEDIUM,
          "high": oh.ReasoningEffort.HIGH}  # fmt: skip


@pytest.fixture(scope="module")
def encoding(tmp_path_factory):
    return harmony_encoding(tmp_path_factory.mktemp("tiktoken"))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(build_synthetic_tokenizer(512))


def theirs_ids(
    enc,
    messages,
    *,
    reasoning_effort="medium",
    tools=None,
    instructions=None,
    model_identity=DEFAULT_IDENTITY,
    knowledge_cutoff=DEFAULT_KNOWLEDGE_CUTOFF,
    current_date=None,
    drop_past_analysis=True,
) -> list[int]:
    """openai-harmony's prompt for the keyword arguments of ossedge's render_conversation."""
    system = oh.SystemContent.new().with_reasoning_effort(EFFORT[reasoning_effort])
    system = system.with_model_identity(model_identity).with_knowledge_cutoff(knowledge_cutoff)
    if current_date is not None:
        system = system.with_conversation_start_date(current_date)
    instructions = next((m.content for m in messages if m.role == "developer"), instructions)
    out = [oh.Message.from_role_and_content(R.SYSTEM, system)]
    if instructions is not None or tools:
        dev = oh.DeveloperContent.new()
        if instructions is not None:
            dev = dev.with_instructions(instructions)
        if tools:
            dev = dev.with_function_tools([oh.ToolDescription.new(t.name, t.description,
                                                                  parameters=t.parameters)
                                           for t in tools])  # fmt: skip
        out.append(oh.Message.from_role_and_content(R.DEVELOPER, dev))
    out += [_their_message(m) for m in messages if m.role != "developer"]
    conversation = oh.Conversation.from_messages(out)
    if drop_past_analysis:  # openai-harmony's default
        return enc.render_conversation_for_completion(conversation, R.ASSISTANT)
    config = oh.RenderConversationConfig(auto_drop_analysis=False)
    return enc.render_conversation_for_completion(conversation, R.ASSISTANT, config)


def theirs(enc, messages, **kwargs) -> str:
    return enc.decode_utf8(theirs_ids(enc, messages, **kwargs))


def _their_message(m: Message) -> oh.Message:
    if m.role == "user":
        return oh.Message.from_role_and_content(R.USER, m.content)
    if m.role == "tool":
        return (oh.Message.from_author_and_content(oh.Author.new(R.TOOL, m.name), m.content)
                .with_channel(m.channel).with_recipient(m.recipient))  # fmt: skip
    x = oh.Message.from_role_and_content(R.ASSISTANT, m.content).with_channel(m.channel)
    if m.recipient:
        x = x.with_recipient(m.recipient)
    return x.with_content_type(f"<|constrain|>{m.content_type}") if m.content_type else x


# ---------------------------------------------------------------- rendering

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
OBJECTS = ToolSpec("objects", "Objects.", {
    "type": "object", "description": "The arguments", "required": ["a", "c", 7], "properties": {
        "a": {"type": "object"},
        "b": {"type": "object", "properties": {}, "description": "Empty"},
        "c": {"type": "object", "description": "Outer", "required": ["x"], "properties": {
            "x": {"type": "string", "description": "Inner"},
            "y": {"type": "object", "properties": {"z": {"type": "integer"}}}}},
        "d": {"type": "object", "additionalProperties": {"type": "string"}},
        "e": {"type": "array", "items": {"type": "object", "required": ["k"],
                                         "properties": {"k": {"type": "string"}}}},
        "f": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "g": {"type": "array"},
        "h": {"properties": {"i": {"type": "string"}}},
        "i": {}, "j": True}})  # fmt: skip
ENUMS = ToolSpec("enums", "Enums and constants.", {"type": "object", "properties": {
    "a": {"type": "integer", "enum": [1, 2, 3], "default": 2},
    "b": {"enum": ["x", 1, None]},
    "c": {"type": "string", "enum": ["x", 2, "y"], "default": "y"},
    "d": {"const": "x"}, "e": {"type": "string", "const": "x"},
    "f": {"type": "array", "items": {"type": "string", "enum": ["p", "q"]}},
    "g": {"type": "boolean", "enum": [True]}}})  # fmt: skip
DEFAULTS = ToolSpec("defaults", "Defaults.", {"type": "object", "properties": {
    "a": {"type": "number", "default": 1.5}, "b": {"type": "number", "default": 1e20},
    "c": {"type": "number", "default": 1e-5}, "d": {"type": "number", "default": 2e-7},
    "e": {"type": "boolean", "default": False}, "f": {"type": "string", "default": None},
    "g": {"type": "object", "default": {"k": [1, "Zürich"], "n": None}},
    "h": {"type": "array", "items": {"type": "string"}, "default": ["x", "y"]},
    "i": {"type": "string", "default": 'say "hi"'}, "j": {"default": 3}}})  # fmt: skip
UNIONS = ToolSpec("unions", "Unions.", {"type": "object", "required": ["a"], "properties": {
    "a": {"type": "array", "items": {"oneOf": [{"type": "string"}, {"type": "number"}]}},
    "b": {"description": "Either", "oneOf": [{"type": "string", "description": "Either"},
                                             {"type": "number", "description": "A count"}]},
    "c": {"description": "When", "default": "now", "oneOf": [
        {"type": "string", "description": "ISO"}, {"type": "null", "nullable": True}]},
    "d": {"oneOf": [{"type": "object", "properties": {"x": {"type": "string"}}},
                    {"type": "string", "default": "x", "enum": ["x"]}]},
    "e": {"type": ["string", "array", "object"]}, "f": {"type": "null"},
    "g": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
    "h": {"type": "string", "anyOf": [{"minLength": 1}]},
    "i": {"allOf": [{"type": "string"}]}, "j": {"$ref": "#/$defs/X"},
    "k": {"type": "object", "nullable": True,
          "properties": {"x": {"type": "string"}}}}})  # fmt: skip
ANNOTATED = ToolSpec("annotated", "Annotated.", {"type": "object", "properties": {
    "a": {"type": "string", "title": "Name", "description": "The name",
          "examples": ["Ada", 3, "Bob"]},
    "b": {"type": "string", "format": "date-time", "pattern": "^2", "minLength": 1},
    "c": {"type": "integer", "minimum": 0, "maximum": 9, "title": "Digit"},
    "d e": {"type": "string", "description": "Stadt, 東京 🎉"}}})  # fmt: skip
TOP_ONE_OF = ToolSpec("pick", "A top-level union.", {"oneOf": [
    {"type": "object", "properties": {"id": {"type": "integer"}}, "description": "By id"},
    {"type": "object", "properties": {"name": {"type": "string"}},
     "default": {"name": "x"}}]})  # fmt: skip
NO_ARGUMENTS = [ToolSpec("none", "No parameters.", None), ToolSpec("empty", "{}.", {}),
                ToolSpec("bare_object", "An object.", {"type": "object"}),
                ToolSpec("no_properties", "", {"type": "object", "properties": {}}),
                ToolSpec("string", "A string.", {"type": "string"}),
                ToolSpec("strings", "A list.",
                         {"type": "array", "items": {"type": "string"}})]  # fmt: skip
SEARCH = ToolSpec("search", "Searches.", {"type": "object",
                                          "properties": {"q": {"type": "string"}}})  # fmt: skip
TURN1 = [Message("user", "Weather in Oslo?"),
         Message("assistant", "OLD reasoning", channel="analysis"),
         Message("assistant", "Sunny.", channel="final")]  # fmt: skip
CALLS = [Message("user", "Oslo and Rome?"),
         Message("assistant", "Two lookups.", channel="analysis"),
         Message.tool_call("get_weather", '{"loc": {"city": "Oslo"}}'),
         Message.tool_result("get_weather", '{"sunny": true}'),
         Message("assistant", "Now Rome.", channel="analysis"),
         Message.tool_call("search", {"q": "Rome weather"}),
         Message.tool_result("search", "Rainy in Rome.")]  # fmt: skip

CASES = {
    "effort-low": dict(messages=[Message("user", "Hi")], reasoning_effort="low"),
    "effort-medium": dict(messages=[Message("user", "Hi")], reasoning_effort="medium"),
    "effort-high": dict(messages=[Message("user", "Hi")], reasoning_effort="high"),
    "date": dict(messages=[Message("user", "Hi")], current_date="2026-12-03"),
    "identity": dict(messages=[Message("user", "Hi")],
                     model_identity="You are Ada, a careful assistant.\nYou answer briefly."),
    "knowledge-cutoff": dict(messages=[Message("user", "Hi")], knowledge_cutoff="2025-01"),
    "no-knowledge-cutoff": dict(messages=[Message("user", "Hi")], knowledge_cutoff=None),
    "no-identity-no-cutoff": dict(messages=[Message("user", "Hi")], model_identity=None,
                                  knowledge_cutoff=None, current_date="2026-12-03"),
    "empty-identity": dict(messages=[Message("user", "Hi")], model_identity=""),
    "unicode-high-date": dict(messages=[Message("user", "Grüße, 東京 🎉\n\n  x")],
                              reasoning_effort="high", current_date="2026-01-01"),
    "developer": dict(messages=[Message("user", "Hi")], instructions="Be terse.\nUse lists."),
    "developer-message": dict(messages=[Message("developer", "Be terse."), Message("user", "Hi")]),
    "tools": dict(messages=[Message("user", "Weather?")],
                  tools=[WEATHER, ToolSpec("now", "Current time.", None)]),
    "tools-and-developer": dict(messages=[Message("user", "Hi")], instructions="Be terse.",
                                tools=[WEATHER], reasoning_effort="low", current_date="2026-12-03"),
    "schema-objects": dict(messages=[Message("user", "Hi")], tools=[OBJECTS]),
    "schema-enums-and-consts": dict(messages=[Message("user", "Hi")], tools=[ENUMS]),
    "schema-defaults": dict(messages=[Message("user", "Hi")], tools=[DEFAULTS]),
    "schema-unions": dict(messages=[Message("user", "Hi")], tools=[UNIONS]),
    "schema-annotations": dict(messages=[Message("user", "Hi")], tools=[ANNOTATED]),
    "schema-top-level-one-of": dict(messages=[Message("user", "Hi")], tools=[TOP_ONE_OF]),
    "schema-no-arguments": dict(messages=[Message("user", "Hi")], tools=NO_ARGUMENTS),
    "multi-turn-analysis-dropped": dict(messages=[*TURN1, Message("user", "And tomorrow?")]),
    "analysis-kept": dict(messages=[*TURN1, Message("user", "b")], drop_past_analysis=False),
    "past-call-and-result": dict(messages=[
        Message("user", "Weather in Oslo?"),
        Message("assistant", "Need the tool.", channel="analysis"),
        Message.tool_call("get_weather", '{"loc": {"city": "Oslo"}}'),
        Message.tool_result("get_weather", '{"sunny": true}')], tools=[WEATHER]),
    "several-calls-and-results": dict(messages=CALLS, tools=[WEATHER, SEARCH]),
    "result-then-final-then-user": dict(messages=[
        *CALLS, Message("assistant", "Oslo sunny, Rome rainy.", channel="final"),
        Message("user", "Thanks! And Paris?")], tools=[WEATHER, SEARCH]),
    "preamble-and-browser-call": dict(messages=[
        Message("user", "News?"), Message("assistant", "Let me look.", channel="commentary"),
        Message.tool_call("browser.search", {"query": "news"}, channel="analysis"),
        Message.tool_result("browser.search", "【0†Headline】")]),
    "unicode-turns": dict(messages=[
        Message("user", "Grüße 🎉"), Message("assistant", "Überlegung…", channel="analysis"),
        Message("assistant", "東京は晴れ。", channel="final"), Message("user", "Merci ✓")]),
}  # fmt: skip

# Conversations openai-harmony renders in a way ossedge deliberately does not follow:
# (conversation, the text only openai-harmony writes, ossedge's text in its place, why).
TURN2 = [Message("user", "Rome?"), Message("assistant", "SECOND reasoning", channel="analysis")]
RENDERED_OTHERWISE = {
    "analysis-of-a-later-ended-turn": (
        dict(messages=[*TURN1, *TURN2, Message("assistant", "Rainy.", channel="final"),
                       Message("user", "Paris?")]),
        "<|start|>assistant<|channel|>analysis<|message|>SECOND reasoning<|end|>", "",
        ("openai-harmony drops only the analysis before the first final answer; every turn that "
         "ended in a final answer drops its reasoning, as the harmony guide says")),
    "analysis-of-an-ended-turn-during-tool-use": (
        dict(messages=[*TURN1, *TURN2, Message.tool_call("search", {"q": "Rome"}),
                       Message.tool_result("search", "Rainy.")], tools=[SEARCH]),
        "<|start|>assistant<|channel|>analysis<|message|>OLD reasoning<|end|>", "",
        ("openai-harmony keeps all reasoning unless the last assistant message is a final answer; "
         "the finished first turn's reasoning is dropped, the running turn's is kept")),
    "multi-line-property-description": (
        dict(messages=[Message("user", "Hi")], tools=[ToolSpec("f", "F.", {
            "type": "object", "properties": {"a": {"type": "string",
                                                   "description": "Line 1\nsee: below"}}})]),
        "// Line 1\nsee: below\n", "// Line 1\n// see: below\n",
        "openai-harmony comments only the first line, so the next reads as a declaration"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_text_equals_openai_harmony(encoding, case) -> None:
    assert render_conversation(**CASES[case]) == theirs(encoding, **CASES[case])


@pytest.mark.parametrize("case", list(RENDERED_OTHERWISE))
def test_prompt_differs_from_openai_harmony_only_as_documented(encoding, case) -> None:
    conversation, their_part, our_part, _why = RENDERED_OTHERWISE[case]
    text = theirs(encoding, **conversation)
    assert their_part in text
    assert render_conversation(**conversation) == text.replace(their_part, our_part)


# ---------------------------------------------------------------- parsing

START = "<|end|><|start|>assistant"
COMPLETIONS = {
    "final": "<|channel|>final<|message|>Hi.<|return|>",
    "analysis-then-final": "<|channel|>analysis<|message|>SECRET<|end|><|start|>assistant"
                           "<|channel|>final<|message|>Hi.<|return|>",
    "call-recipient-after": '<|channel|>commentary to=functions.f <|constrain|>json<|message|>'
                            '{"a":1}<|call|>',
    "call-recipient-before": ' to=functions.f<|channel|>commentary <|constrain|>json<|message|>'
                             '{"a":1}<|call|>',
    "call-bare-json": ' to=functions.f<|channel|>commentary json<|message|>{"a":1}<|call|>',
    "constrain-no-space": '<|channel|>commentary to=functions.f<|constrain|>json<|message|>'
                          '{"a":1}<|call|>',
    "call-constrain-other-type": "<|channel|>commentary to=functions.query <|constrain|>sql"
                                 "<|message|>SELECT 1<|call|>",
    "call-constrain-without-type": "<|channel|>commentary to=functions.f <|constrain|><|message|>"
                                   "{}<|call|>",
    "call-recipient-without-to": "<|channel|>commentary functions.f<|message|>{}<|call|>",
    "preamble-then-call": "<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant"
                          "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}"
                          "<|call|>",
    "preamble-then-final": f"<|channel|>commentary<|message|>Checking.{START}<|channel|>final"
                           "<|message|>Done.<|return|>",
    "two-calls": "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|end|>"
                 "<|start|>assistant<|channel|>commentary to=functions.g <|constrain|>json"
                 '<|message|>{"b": [1, 2]}<|call|>',
    "browser-call": f"<|channel|>analysis<|message|>SECRET{START}<|channel|>analysis "
                    'to=browser.search code<|message|>{"query": "news"}<|call|>',
    "python-call": "<|channel|>analysis to=python code<|message|>print(1)<|call|>",
    "final-to-a-recipient": "<|channel|>final to=functions.f<|message|>{}<|call|>",
    "word-before-the-channel": "SECRET<|channel|>final<|message|>ok<|return|>",
    "analysis-only-truncated": "<|channel|>analysis<|message|>SECRET and mo",
    "analysis-several": f"<|channel|>analysis<|message|>SECRET a{START}<|channel|>analysis"
                        f"<|message|>SECRET b{START}<|channel|>analysis<|message|>SECRET c{START}"
                        "<|channel|>final<|message|>ok<|return|>",
    "truncated-final": "<|channel|>analysis<|message|>SECRET<|end|><|start|>assistant"
                       "<|channel|>final<|message|>Hel",
    "ended-by-end": "<|channel|>final<|message|>ok<|end|>",
    "empty-final": "<|channel|>final<|message|><|return|>",
    "role-written-again": "assistant<|channel|>final<|message|>ok<|return|>",
    "spaces-around-role": "<|channel|>analysis<|message|>SECRET<|end|><|start|> assistant "
                          "<|channel|>final<|message|>!<|return|>",
    "spaces-around-header": " <|channel|>final <|message|>ok<|return|>",
    "tabs-and-newlines": "<|channel|>commentary\tto=functions.f\n<|constrain|>json \n<|message|>"
                         "{}<|call|>",
    "double-spaces": "<|channel|>commentary  to=functions.f  <|constrain|>json<|message|>"
                     "{}<|call|>",
    "unicode": "<|channel|>final<|message|>Grüße 🎉 東京<|return|>",
}  # fmt: skip

# Completions openai-harmony parses that ossedge reads otherwise, without a fault: (completion,
# ossedge's final answer, why).
READ_OTHERWISE = {
    "constrained-final": ('<|channel|>final <|constrain|>json<|message|>{"a": 1}<|return|>',
                          '{"a": 1}', ("openai-harmony 0.0.8 takes a lone `<|constrain|>json` for "
                                       "a recipient, hiding a structured answer; it is the type")),
    "constrained-final-no-space": ("<|channel|>final<|constrain|>json<|message|>[]<|return|>",
                                   "[]", "as above"),
    "constrain-space-type": ("<|channel|>final <|constrain|> json<|message|>[]<|return|>", "[]",
                             ("openai-harmony reads `<|constrain|>` as a recipient and `json` as "
                              "the type; the space after it means nothing")),
}  # fmt: skip

# Completions openai-harmony parses that ossedge reports as malformed (reply.issues; HarmonyError
# when strict), never showing their text as the answer: (completion, the fault, why).
REPORTED = {
    "user-role": (("<|channel|>analysis<|message|>SECRET<|end|><|start|>user<|channel|>final"
                   "<|message|>SECRET2<|return|>"), "role 'user'",
                  "the assistant writing a user message is no answer"),
    "tool-role-after-call": (("<|channel|>commentary to=functions.f<|message|>{}<|call|><|start|>"
                              "functions.f to=assistant<|channel|>commentary<|message|>x<|end|>"),
                             "after the stop token", "the completion ends at <|call|>"),
    "second-turn-after-return": (("<|channel|>final<|message|>ok<|return|><|start|>assistant"
                                  "<|channel|>final<|message|>more<|return|>"),
                                 "after the stop token", "the completion ends at <|return|>"),
    "no-channel": ("<|message|>SECRET<|return|>", "no channel",
                   "without a channel the text may be reasoning"),
    "unknown-channel": ("<|channel|>secret<|message|>SECRET<|return|>", "unknown channel", ""),
    "channel-with-punctuation": ("<|channel|>final!<|message|>SECRET<|return|>",
                                 "unknown channel", ""),
    "two-channels": ("<|channel|>analysis<|channel|>final<|message|>SECRET<|return|>",
                     "invalid recipient", "openai-harmony takes `<|channel|>final` for one"),
    "empty-recipient": ("<|channel|>commentary to=<|message|>{}<|call|>", "invalid recipient", ""),
    "call-without-recipient": ("<|channel|>commentary<|message|>SECRET<|call|>", "no recipient",
                               "a call needs a recipient"),
    "start-inside-a-message": (("<|channel|>analysis<|message|>SECRET<|start|>assistant"
                                "<|channel|>final<|message|>ok<|return|>"), "not ended",
                               ("openai-harmony keeps the header as analysis text; ossedge ends "
                                "the message there")),
    "message-inside-a-message": ("<|channel|>final<|message|>ok<|message|>more<|return|>",
                                 "inside message content", "openai-harmony keeps the token text"),
    "channel-inside-a-message": ("<|channel|>final<|message|>ok<|channel|>more<|return|>",
                                 "outside a message header", "as above"),
    "endoftext-ends-a-message": ("<|channel|>final<|message|>ok<|endoftext|>", "<|endoftext|>",
                                 "openai-harmony keeps the token text in the answer"),
    "reserved-token-in-content": ("<|channel|>final<|message|>ok<|reserved_200013|><|return|>",
                                  "unexpected special token", "as above"),
}  # fmt: skip

# Completions openai-harmony refuses (raises): ossedge reports each (issues; strict raises).
REFUSED = {
    "header-without-message": ("<|channel|>final<|end|>", "before <|message|>"),
    "stop-token-first": ("<|return|>", "before <|message|>"),
    "stray-end-first": ("<|end|>", "before <|message|>"),
    "unknown-role": (("<|channel|>analysis<|message|>SECRET<|end|><|start|>wizard<|channel|>final"
                      "<|message|>SECRET2<|return|>"), "role 'wizard'"),
    "role-with-a-name": (("<|channel|>analysis<|message|>SECRET<|end|><|start|>assistant:bob"
                          "<|channel|>final<|message|>SECRET2<|return|>"), "role 'assistant:bob'"),
    "no-role": (("<|channel|>analysis<|message|>SECRET<|end|><|start|><|channel|>final"
                 "<|message|>SECRET2<|return|>"), "role None"),
    "start-twice": (("<|channel|>final<|message|>ok<|end|><|start|><|start|>assistant"
                     "<|channel|>final<|message|>x<|return|>"), "not ended"),
    "stray-return": ("<|channel|>final<|message|>ok<|end|><|return|>", "outside a message"),
    "end-after-return": ("<|channel|>final<|message|>ok<|return|><|end|>", "after the stop"),
    "text-between-messages": (("<|channel|>analysis<|message|>SECRET<|end|>junk<|start|>assistant"
                               "<|channel|>final<|message|>ok<|return|>"), "outside a message"),
    "text-after-return": ("<|channel|>final<|message|>ok<|return|>more", "after the stop"),
    "words-before-the-channel": ("SECRET text here<|channel|>final<|message|>SECRET2<|return|>",
                                 "unexpected 'SECRET'"),
    "reserved-token-in-header": (("<|channel|><|reserved_200013|>analysis<|message|>SECRET"
                                  "<|return|>"), "unexpected special token"),
    "two-types": (("<|channel|>commentary to=functions.f <|constrain|>json <|constrain|>json"
                   "<|message|>{}<|call|>"), "unexpected 'to=functions.f'"),
    "two-recipients": ("<|channel|>commentary to=functions.f to=functions.g<|message|>{}<|call|>",
                       "unexpected 'to=functions.f'"),
    "space-after-constrain-in-a-call": (("<|channel|>commentary to=functions.f <|constrain|> json"
                                         "<|message|>{}<|call|>"), None),
    "space-after-channel": ("<|channel|> final<|message|>ok<|return|>", None),
}  # fmt: skip
# Of those, ossedge reads two (fault None): a space after <|channel|> or <|constrain|> changes no
# meaning. Cut off in a header (openai-harmony: "unexpected EOS"), ossedge reports truncation.
TRUNCATED = {
    "empty": "", "plain-text": "SECRET plain text", "cut-in-a-header": "<|channel|>fin",
    "cut-after-analysis": "<|channel|>analysis<|message|>SECRET<|end|><|start|>assis",
}  # fmt: skip


def _their_summary(enc, text: str) -> tuple:
    """(final text, reasoning, tool calls as (recipient, raw, content type)) as openai-harmony
    parses `text`: final and reasoning from messages without a recipient."""
    parsed = enc.parse_messages_from_completion_tokens(
        enc.encode(text, allowed_special="all"), R.ASSISTANT)  # fmt: skip
    messages = [(m.channel, m.recipient, "".join(c.text for c in m.content),
                 (m.content_type or "").removeprefix("<|constrain|>") or None)
                for m in parsed]  # fmt: skip
    finals = [c for ch, r, c, _ in messages if ch == "final" and r is None]
    reasoning = "\n\n".join(c for ch, r, c, _ in messages if ch == "analysis" and r is None)
    calls = [(r, c, t) for _, r, c, t in messages if r is not None]
    return "".join(finals) if finals else None, reasoning, calls


def _summary(reply) -> tuple:
    return (reply.final, reply.reasoning,
            [(c.recipient, c.raw, c.content_type) for c in reply.tool_calls])  # fmt: skip


@pytest.mark.parametrize("case", list(COMPLETIONS))
def test_completion_parses_as_openai_harmony_parses_it(encoding, case) -> None:
    text = COMPLETIONS[case]
    reply = parse_completion(text)
    assert _summary(reply) == _their_summary(encoding, text)
    assert reply.issues == [] and "SECRET" not in (reply.final or "")


@pytest.mark.parametrize("case", list(READ_OTHERWISE))
def test_completion_read_otherwise_as_documented(encoding, case) -> None:
    text, final, _why = READ_OTHERWISE[case]
    reply = parse_completion(text)
    assert reply.final == final and reply.issues == []
    assert _their_summary(encoding, text)[0] is None  # openai-harmony loses the answer


@pytest.mark.parametrize("case", list(REPORTED))
def test_completion_openai_harmony_accepts_is_reported(encoding, case) -> None:
    text, fault, _why = REPORTED[case]
    _their_summary(encoding, text)  # parses
    reply = parse_completion(text, strict=False)
    assert any(fault in issue for issue in reply.issues), reply.issues
    assert "SECRET" not in (reply.final or "")
    with pytest.raises(HarmonyError, match="malformed completion"):
        parse_completion(text)


@pytest.mark.parametrize("case", list(REFUSED))
def test_completion_openai_harmony_refuses_is_reported(encoding, case) -> None:
    text, fault = REFUSED[case]
    with pytest.raises(oh.HarmonyError):
        _their_summary(encoding, text)
    reply = parse_completion(text, strict=False)
    assert "SECRET" not in (reply.final or "")
    if fault is None:  # read (see above)
        assert reply.issues == [] and parse_completion(text) == reply
        return
    assert any(fault in issue for issue in reply.issues), reply.issues
    with pytest.raises(HarmonyError, match="malformed completion"):
        parse_completion(text)


@pytest.mark.parametrize("case", list(TRUNCATED))
def test_completion_cut_in_a_header_is_truncated(encoding, case) -> None:
    with pytest.raises(oh.HarmonyError):
        _their_summary(encoding, TRUNCATED[case])
    reply = parse_completion(TRUNCATED[case])
    assert reply.stop_reason == "truncated" and not reply.complete
    assert reply.final is None and reply.issues == []


ALL = {**COMPLETIONS, **{k: v[0] for k, v in {**READ_OTHERWISE, **REPORTED, **REFUSED}.items()},
       **TRUNCATED}  # fmt: skip


def _check_stream(parser: StreamParser, deltas: list, text: str) -> None:
    deltas += parser.finish()
    whole = parse_completion(text, strict=False)
    assert parser.result() == whole
    assert "".join(d.text for d in deltas if d.is_final) == (whole.final or "")
    written = [*whole.messages, *([whole.partial] if whole.partial else [])]
    thought = [m.content for m in written if m.channel == "analysis" and m.recipient is None]
    assert "".join(d.text for d in deltas if d.is_reasoning) == "".join(thought)
    assert "SECRET" not in (whole.final or "")


@pytest.mark.parametrize("case", list(ALL))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_text_in_any_chunks_parses_as_the_whole(case, data) -> None:
    text = ALL[case]
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=8)))
    parser, deltas = StreamParser(strict=False), []
    for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
        deltas += parser.feed_text(text[a:b])
    _check_stream(parser, deltas, text)


@pytest.mark.parametrize("case", list(ALL))
def test_token_ids_parse_as_the_text(tok, case) -> None:
    reserved = next(n for n in special_layout(tok.vocab_size).values() if "reserved" in n)
    text = ALL[case].replace("<|reserved_200013|>", reserved)  # o200k's, not in the test vocabulary
    parser = StreamParser(tok, strict=False)
    deltas = [d for i in tok.encode_with_special(text) for d in parser.feed(i)]
    _check_stream(parser, deltas, text)
