"""The harmony chat format of gpt-oss: render conversations (as text or as token ids, special tokens
looked up by name) and parse what the assistant generated — strictly, so that analysis text never
reaches the final answer and tool calls are either well formed or reported broken."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ossedge.runtime.errors import HarmonyError
from ossedge.runtime.tokenizer import Tokenizer

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CONSTRAIN, RETURN, CALL, ENDOFTEXT = "<|constrain|>", "<|return|>", "<|call|>", "<|endoftext|>"
CHANNELS = ("analysis", "commentary", "final")
REASONING_EFFORTS = ("low", "medium", "high")
ROLES = ("system", "developer", "user", "assistant", "tool")
DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"

_HEADER_WORD = re.compile(r"[A-Za-z0-9_.:/\-]+")
_TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_TEXT_SPECIAL = re.compile(
    r"(<\|(?:start|end|message|channel|constrain|return|call|endoftext|startoftext|endofprompt"
    r"|reserved_\d+)\|>)"
)
_Seg = tuple[bool, str]  # (is a special token, text)


@dataclass(frozen=True)
class Message:
    """One harmony message. Tool results: role "tool", `name` the tool ("functions.get_weather").
    `content_type` is what follows <|constrain|> in the header, e.g. "json"."""

    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    name: str | None = None

    @classmethod
    def tool_call(cls, name: str, arguments: Any, *, channel: str = "commentary") -> Message:
        args = arguments if isinstance(arguments, str) else json.dumps(arguments)
        recipient = name if "." in name else f"functions.{name}"
        return cls("assistant", args, channel=channel, recipient=recipient, content_type="json")

    @classmethod
    def tool_result(cls, name: str, content: str) -> Message:
        full = name if "." in name else f"functions.{name}"
        return cls("tool", content, channel="commentary", recipient="assistant", name=full)


@dataclass(frozen=True)
class ToolSpec:
    """A function tool; `parameters` is a JSON schema of the single argument object."""

    name: str
    description: str
    parameters: dict[str, Any] | None = None


@dataclass(frozen=True)
class ToolCall:
    recipient: str
    raw: str
    arguments: Any = None
    content_type: str | None = None
    channel: str | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        return self.recipient.removeprefix("functions.")

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class ParsedReply:
    """A parsed completion. `final` is None when no final-channel message was written; it never
    contains analysis or commentary text. `stop_reason`: "return", "call", "endoftext", "end"
    (input ended between messages) or "truncated" (input ended inside a message)."""

    messages: list[Message]
    final: str | None
    reasoning: str
    commentary: str
    tool_calls: list[ToolCall]
    stop_reason: str
    partial: Message | None = None
    issues: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.stop_reason in ("return", "call")


# ---------------------------------------------------------------- rendering


def system_text(
    *,
    reasoning_effort: str = "medium",
    model_identity: str | None = DEFAULT_IDENTITY,
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
    current_date: str | None = None,
    has_tools: bool = False,
) -> str:
    """The system message. None leaves a line out; any string, even empty, is written (as
    openai-harmony writes it)."""
    if reasoning_effort not in REASONING_EFFORTS:
        raise HarmonyError(
            f"reasoning_effort {reasoning_effort!r} is not one of {', '.join(REASONING_EFFORTS)}"
        )
    top = [model_identity] if model_identity is not None else []
    if knowledge_cutoff is not None:
        top.append(f"Knowledge cutoff: {knowledge_cutoff}")
    if current_date is not None:
        top.append(f"Current date: {current_date}")
    channels = (
        "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    )
    if has_tools:
        channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
    sections = ["\n".join(top)] if top else []
    return "\n\n".join([*sections, f"Reasoning: {reasoning_effort}", channels])


def developer_text(*, instructions: str | None, tools: Sequence[ToolSpec] | None) -> str | None:
    sections = []
    if instructions is not None:
        sections += ["# Instructions", instructions]
    if tools:
        sections.append(tools_text(tools))
    return "\n\n".join(sections) if sections else None


def tools_text(tools: Sequence[ToolSpec]) -> str:
    """The `# Tools` section: a TypeScript-like `namespace functions { ... }` declaration."""
    lines = ["## functions\n", "namespace functions {\n"]
    seen = set()
    for t in tools:
        if not _TOOL_NAME.fullmatch(t.name) or t.name in seen:
            raise HarmonyError(
                f"tool name {t.name!r} is invalid or repeated; use unique names of letters, digits "
                "and underscores"
            )
        seen.add(t.name)
        lines += [f"// {line}" for line in _lines(t.description)]
        if t.parameters is None:
            lines.append(f"type {t.name} = () => any;\n")
        else:
            lines.append(f"type {t.name} = (_: {schema_to_typescript(t.parameters)}) => any;\n")
    lines.append("} // namespace functions")
    return "# Tools\n\n" + "\n".join(lines)


def _lines(text: str) -> list[str]:
    """Lines as openai-harmony splits a tool description: at \\n (a \\r before it dropped), no
    empty last line."""
    parts = text.split("\n")
    if parts[-1] == "":
        parts.pop()
    return [p.removesuffix("\r") for p in parts]


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """A JSON schema as the TypeScript-like type gpt-oss reads, written as openai-harmony 0.0.8
    writes it: `oneOf` as a multi-line union, enums of strings only, integers as `number`, a
    listed `type` joined as is, anything else (anyOf, const, $ref, no type) as `any`."""
    s = schema if isinstance(schema, dict) else {}
    if isinstance(s.get("oneOf"), list):
        return "".join(f"\n{indent} | {_variant(v, indent, top=True)}" for v in s["oneOf"])
    kind = s.get("type")
    if isinstance(kind, list) and any(isinstance(k, str) for k in kind):
        return " | ".join("number" if k == "integer" else k for k in kind if isinstance(k, str))
    if kind == "object":
        return _object_type(s, indent)
    if kind == "string":
        enum = s.get("enum") if isinstance(s.get("enum"), list) else []
        return " | ".join(f'"{v}"' for v in enum if isinstance(v, str)) or "string"
    if kind == "array":
        return f"{schema_to_typescript(s['items'], indent)}[]" if "items" in s else "Array<any>"
    return {"number": "number", "integer": "number", "boolean": "boolean"}.get(_str(kind), "any")


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _comment(text: str, indent: str) -> str:
    # Every line of a multi-line text is a comment line; openai-harmony comments only the first,
    # leaving the others as bare lines inside the type (read as declarations).
    return f"{indent}// " + text.replace("\n", f"\n{indent}// ") + "\n"


def _default_text(s: dict[str, Any], *, raw_enum: bool = True) -> str:
    """A default as openai-harmony writes it: a string quoted without escapes (bare when the
    schema has an enum, except in a top-level oneOf variant), anything else as compact JSON."""
    d = s["default"]
    if not isinstance(d, str):
        return _json(d)
    if isinstance(s.get("enum"), list) and s["enum"]:
        return d if raw_enum else _json(d)
    return f'"{d}"'


def _json(value: Any) -> str:
    """Compact JSON as serde_json writes it (key order kept, floats as `1e20`, `0.00001`)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{_json(str(k))}:{_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_json(v) for v in value) + "]"
    if isinstance(value, float) and math.isfinite(value):
        mantissa, e, exp = repr(value).partition("e")
        if not e:
            return mantissa
        if int(exp) == -5:  # Python writes 1e-05 where serde_json (ryu) still writes decimals
            return format(Decimal(repr(value)), "f")
        return f"{mantissa}e{int(exp)}"
    return json.dumps(value, ensure_ascii=False)


def _nullable(typ: str, s: Any) -> str:
    nullable = isinstance(s, dict) and s.get("nullable") is True
    return f"{typ} | null" if nullable and "null" not in typ else typ


def _variant(
    v: Any, indent: str, *, skip: str | None = None, first_above: bool = False, top: bool = False
) -> str:
    """One `oneOf` variant: its type, then its description (unless it repeats the property's,
    `skip`, or the property's own description went above it) and default as a trailing comment."""
    notes = []
    desc = _str(v.get("description")) if isinstance(v, dict) else None
    if desc is not None and not first_above and desc != skip:
        notes.append(desc.replace("\n", f"\n{indent}// "))
    if isinstance(v, dict) and "default" in v:
        notes.append(f"default: {_default_text(v, raw_enum=not top)}")
    typ = _nullable(schema_to_typescript(v, indent + "   "), v)
    return typ + (" // " + " ".join(notes) if notes else "")


def _object_type(s: dict[str, Any], indent: str) -> str:
    desc = _str(s.get("description"))
    out = [_comment(desc, indent) if desc is not None else "", "{\n"]
    props = s.get("properties")
    if isinstance(props, dict):
        req = s.get("required") if isinstance(s.get("required"), list) else []
        out += [_property(k, v, k in req, indent) for k, v in props.items()]
    return "".join([*out, f"{indent}}}"])


def _property(key: str, v: Any, required: bool, indent: str) -> str:
    p = v if isinstance(v, dict) else {}
    name = key if required else f"{key}?"
    out = ""
    if _str(p.get("title")) is not None:
        out += _comment(p["title"], indent) + f"{indent}//\n"
    if "oneOf" not in p and _str(p.get("description")) is not None:
        out += _comment(p["description"], indent)
    if isinstance(p.get("examples"), list) and p["examples"]:
        out += f"{indent}// Examples:\n"
        out += "".join(f'{indent}// - "{e}"\n' for e in p["examples"] if isinstance(e, str))
    if isinstance(p.get("oneOf"), list):
        return out + _one_of_property(name, p, indent)
    line = f"{indent}{name}: {_nullable(schema_to_typescript(v, indent + '    '), v)},"
    if "oneOf" not in p and "default" in p:
        line += f" // default: {_default_text(p)}"
    return out + line + "\n"


def _one_of_property(name: str, p: dict[str, Any], indent: str) -> str:
    """A property whose schema is a `oneOf`: its description (unless the first variant repeats
    it) and default as comment lines, then one `| type` line per variant, then a lone comma."""
    variants, desc = p["oneOf"], _str(p.get("description"))
    first = variants[0] if variants and isinstance(variants[0], dict) else {}
    above = desc is not None and desc != first.get("description")
    out = _comment(desc, indent) if above else ""
    if "default" in p:
        out += f"{indent}// default: {_default_text(p)}\n"
    out += f"{indent}{name}:\n"
    for n, v in enumerate(variants):
        out += f"{indent} | {_variant(v, indent, skip=desc, first_above=above and n == 0)}\n"
    return out + f"{indent},\n"


def _header_word(value: str, what: str) -> str:
    if not _HEADER_WORD.fullmatch(value):
        raise HarmonyError(
            f"{what} {value!r} cannot go in a message header; use letters, digits and . _ - : /"
        )
    return value


def _message_segments(m: Message, *, stop: str | None = None,
                      recipient_first: bool = True) -> list[_Seg]:  # fmt: skip
    """A message's segments. A tool call's recipient goes in the role section (as openai-harmony
    renders past calls in a prompt), or with `recipient_first=False` after the channel (as the
    model writes a call in a completion)."""
    if m.role not in ROLES:
        raise HarmonyError(f"unknown role {m.role!r}; use one of {', '.join(ROLES)}")
    if not isinstance(m.content, str):
        raise HarmonyError(f"{m.role} message content must be str, got {type(m.content).__name__}")
    segs: list[_Seg] = [(True, START)]
    if m.role == "tool":
        if not m.name:
            raise HarmonyError("a tool message needs name=, e.g. 'functions.get_weather'")
        recipient = _header_word(m.recipient or "assistant", "recipient")
        segs += [(False, f"{_header_word(m.name, 'tool name')} to={recipient}")]
        segs += [(True, CHANNEL), (False, _header_word(m.channel or "commentary", "channel"))]
    elif m.role == "assistant":
        if m.channel not in CHANNELS:
            raise HarmonyError(
                f"assistant message channel {m.channel!r} must be one of {', '.join(CHANNELS)}"
            )
        # a past tool call: the recipient in the role section, as openai-harmony renders it
        # (the model may write it after the channel; the parser reads both)
        to = f" to={_header_word(m.recipient, 'recipient')}" if m.recipient else ""
        if recipient_first:
            segs += [(False, f"assistant{to}"), (True, CHANNEL), (False, m.channel)]
        else:
            segs += [(False, "assistant"), (True, CHANNEL), (False, m.channel + to)]
    else:
        if m.channel or m.recipient:
            raise HarmonyError(f"{m.role} messages take no channel or recipient")
        segs.append((False, m.role))
    if m.content_type:
        segs += [(False, " "), (True, CONSTRAIN), (False, _header_word(m.content_type, "type"))]
    segs += [(True, MESSAGE), (False, m.content)]
    default_stop = CALL if m.role == "assistant" and m.recipient else END
    segs.append((True, stop or default_stop))
    return segs


def _conversation_segments(
    messages: Sequence[Message],
    *,
    reasoning_effort: str,
    tools: Sequence[ToolSpec] | None,
    instructions: str | None,
    model_identity: str | None,
    knowledge_cutoff: str | None,
    current_date: str | None,
    drop_past_analysis: bool,
) -> list[_Seg]:
    body = []
    for m in messages:
        if m.role == "system":
            raise HarmonyError(
                "pass reasoning_effort=, current_date= etc. instead of a system message; the "
                "system message is built from them"
            )
        if m.role == "developer":
            if instructions is not None:
                raise HarmonyError("give instructions either as instructions= or as a developer "
                                   "message, not both")  # fmt: skip
            instructions = m.content
            continue
        body.append(m)
    if drop_past_analysis:
        # Reasoning of turns that already ended in a final answer is not shown to the model again.
        last_final = max(
            (i for i, m in enumerate(body) if m.role == "assistant" and m.channel == "final"),
            default=-1,
        )
        body = [
            m
            for i, m in enumerate(body)
            if not (i < last_final and m.role == "assistant" and m.channel == "analysis")
        ]
    system = system_text(
        reasoning_effort=reasoning_effort,
        model_identity=model_identity,
        knowledge_cutoff=knowledge_cutoff,
        current_date=current_date,
        has_tools=bool(tools),
    )
    segs = _message_segments(Message("system", system))
    developer = developer_text(instructions=instructions, tools=tools)
    if developer is not None:
        segs += _message_segments(Message("developer", developer))
    for m in body:
        segs += _message_segments(m)
    return [*segs, (True, START), (False, "assistant")]


def render_conversation(
    messages: Sequence[Message],
    *,
    reasoning_effort: str = "medium",
    tools: Sequence[ToolSpec] | None = None,
    instructions: str | None = None,
    model_identity: str | None = DEFAULT_IDENTITY,
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
    current_date: str | None = None,
    drop_past_analysis: bool = True,
) -> str:
    """The prompt as text, ending with `<|start|>assistant`. For the model use `render_ids`: text
    that happens to contain special-token strings is only safe once encoded as ordinary text."""
    segs = _conversation_segments(
        messages,
        reasoning_effort=reasoning_effort,
        tools=tools,
        instructions=instructions,
        model_identity=model_identity,
        knowledge_cutoff=knowledge_cutoff,
        current_date=current_date,
        drop_past_analysis=drop_past_analysis,
    )
    return "".join(text for _, text in segs)


def render_ids(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    *,
    reasoning_effort: str = "medium",
    tools: Sequence[ToolSpec] | None = None,
    instructions: str | None = None,
    model_identity: str | None = DEFAULT_IDENTITY,
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
    current_date: str | None = None,
    drop_past_analysis: bool = True,
) -> list[int]:
    """The prompt of `render_conversation` as token ids. Special tokens come from the tokenizer by
    name; message text is encoded as ordinary text, so it never becomes a special token."""
    segs = _conversation_segments(
        messages,
        reasoning_effort=reasoning_effort,
        tools=tools,
        instructions=instructions,
        model_identity=model_identity,
        knowledge_cutoff=knowledge_cutoff,
        current_date=current_date,
        drop_past_analysis=drop_past_analysis,
    )
    return _segments_to_ids(tokenizer, segs)


def render_completion(messages: Sequence[Message]) -> str:
    """Assistant messages as the model writes them after `<|start|>assistant`: the last one ends
    in <|call|> (tool call) or <|return|>. Useful for tests and training targets."""
    return "".join(text for _, text in _completion_segments(messages))


def render_completion_ids(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[int]:
    return _segments_to_ids(tokenizer, _completion_segments(messages))


def _completion_segments(messages: Sequence[Message]) -> list[_Seg]:
    segs: list[_Seg] = []
    for n, m in enumerate(messages):
        if m.role != "assistant":
            raise HarmonyError(f"a completion holds assistant messages only, got {m.role!r}")
        last = n == len(messages) - 1
        stop = None if not last or m.recipient else RETURN
        segs += _message_segments(m, stop=stop, recipient_first=False)[2 if n == 0 else 0 :]
        # (the first drops <|start|>assistant: the prompt ends with it)
    return segs


def _segments_to_ids(tokenizer: Tokenizer, segs: list[_Seg]) -> list[int]:
    ids: list[int] = []
    for special, text in segs:
        if special:
            ids.append(tokenizer.special(text))
        elif text:
            ids += tokenizer.encode(text)
    return ids


__all__ = [
    "CHANNELS",
    "REASONING_EFFORTS",
    "Message",
    "ParsedReply",
    "ToolCall",
    "ToolSpec",
    "developer_text",
    "render_completion",
    "render_completion_ids",
    "render_conversation",
    "render_ids",
    "schema_to_typescript",
    "system_text",
    "tools_text",
]
