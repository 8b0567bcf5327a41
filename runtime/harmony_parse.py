"""Parsing what gpt-oss writes after `<|start|>assistant`, token by token or all at once.

Strict mode raises HarmonyError on any structural fault; lenient mode records it in `issues`, drops
the malformed message and goes on, so `messages` can always be rendered again as history. Only
well-formed assistant messages on the `final` channel without a recipient make up `final`: text
outside messages, without a channel, or cut off in a header never does."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from ossedge.runtime.errors import HarmonyError
from ossedge.runtime.harmony import (
    _HEADER_WORD,
    _TEXT_SPECIAL,
    CALL,
    CHANNEL,
    CHANNELS,
    CONSTRAIN,
    END,
    ENDOFTEXT,
    MESSAGE,
    RETURN,
    START,
    Message,
    ParsedReply,
    ToolCall,
)
from ossedge.runtime.tokenizer import Tokenizer

_STOPS = {RETURN: "return", CALL: "call", ENDOFTEXT: "endoftext"}


@dataclass(frozen=True)
class Delta:
    """New content text of the message being written."""

    text: str
    channel: str | None
    recipient: str | None = None
    role: str | None = "assistant"

    @property
    def is_final(self) -> bool:
        return self.role == "assistant" and self.channel == "final" and self.recipient is None

    @property
    def is_reasoning(self) -> bool:
        return self.role == "assistant" and self.channel == "analysis" and self.recipient is None


@dataclass(frozen=True)
class _Header:
    role: str | None
    channel: str | None
    recipient: str | None
    content_type: str | None


def _parse_header(raw: str, role: str | None) -> tuple[_Header, list[str]]:
    words = raw.replace(CHANNEL, f" {CHANNEL} ").replace(CONSTRAIN, f" {CONSTRAIN} ").split()
    found: dict[str, str | None] = {"channel": None, "recipient": None, "content_type": None}
    problems = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in (CHANNEL, CONSTRAIN):
            key = "channel" if w == CHANNEL else "content_type"
            value = words[i + 1] if i + 1 < len(words) else None
            if value is None or value in (CHANNEL, CONSTRAIN) or value.startswith("to="):
                problems.append(f"{w} without a value")
                i += 1
                continue
            if found[key] is not None:
                problems.append(f"two {key} values")
            found[key] = found[key] or value
            i += 2
            continue
        if w.startswith("to=") and len(w) > 3 and found["recipient"] is None:
            found["recipient"] = w[3:]
        elif role is None:
            role = w
        elif found["channel"] is not None and found["content_type"] is None and not problems:
            # a bare content type after the channel (`commentary json`), as openai-harmony reads it
            found["content_type"] = w
        else:
            problems.append(f"unexpected {w!r}")
        i += 1
    h = _Header(role, found["channel"], found["recipient"], found["content_type"])
    for key in ("recipient", "content_type"):
        value = found[key]
        if value is not None and not _HEADER_WORD.fullmatch(value):
            problems.append(f"invalid {key} {value!r}")
    if role != "assistant":
        problems.append(f"role {role!r}: a completion holds assistant messages only")
    elif h.channel is None:
        problems.append("no channel (harmony requires one on every message)")
    elif h.channel not in CHANNELS:
        problems.append(f"unknown channel {h.channel!r} (expected {', '.join(CHANNELS)})")
    return h, problems


def _tool_call(m: Message, *, truncated: bool) -> ToolCall:
    args, error = None, None
    if truncated:
        error = "truncated before <|call|>"
    elif m.content_type == "json" or (m.recipient or "").startswith("functions."):
        try:
            args = json.loads(m.content)
        except json.JSONDecodeError as e:
            error = f"arguments are not valid JSON ({e})"
    return ToolCall(m.recipient or "", m.content, args, m.content_type, m.channel, error)


class StreamParser:
    """Feed the generated tokens (`feed`) or text (`feed_text`) as they come; each call returns
    the content `Delta`s it completed. A chat loop shows the deltas whose `is_final` is true."""

    def __init__(self, tokenizer: Tokenizer | None = None, *, strict: bool = True) -> None:
        self.tokenizer = tokenizer
        self.strict = strict
        self._decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self._state = "header"  # header | content | between | done
        self._role: str | None = "assistant"  # the prompt already holds <|start|>assistant
        self._header: list[str] = []
        self._head: _Header | None = None
        self._head_ok = False  # malformed messages are reported, never returned
        self._content: list[str] = []
        self.messages: list[Message] = []
        self.tool_calls: list[ToolCall] = []
        self.issues: list[str] = []
        self.stop_reason: str | None = None

    @property
    def channel(self) -> str | None:
        """Channel of the message being written, if its header is complete."""
        return self._head.channel if self._state == "content" and self._head else None

    def feed(self, token_id: int) -> list[Delta]:
        if self._decoder is None or self.tokenizer is None:
            raise ValueError("StreamParser needs tokenizer= to parse token ids")
        name = self.tokenizer.special_name(token_id)
        if name is None:
            text = self._decoder.feed(token_id)
            return self._text(text) if text else []
        return self._flush() + self._special(name)

    def feed_text(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        for n, piece in enumerate(_TEXT_SPECIAL.split(text)):
            if n % 2:
                out += self._special(piece)
            elif piece:
                out += self._text(piece)
        return out

    def finish(self) -> list[Delta]:
        """End of input: returns the last deltas (a dangling partial character)."""
        return self._flush()

    def result(self) -> ParsedReply:
        self.finish()
        messages, partial = list(self.messages), None
        calls = list(self.tool_calls)
        stop = self.stop_reason
        if self._state == "content" and self._head is not None:
            if self._head_ok:
                partial = self._message()
                if partial.recipient:
                    calls.append(_tool_call(partial, truncated=True))
            stop = "truncated"
        elif self._state == "header":
            stop = "truncated"
        elif self._state == "between":
            stop = "end"
        shown = [
            m
            for m in [*messages, *([partial] if partial else [])]
            if m.role == "assistant" and m.recipient is None
        ]
        finals = [m.content for m in shown if m.channel == "final"]
        return ParsedReply(
            messages=messages,
            final="".join(finals) if finals else None,
            reasoning="\n\n".join(m.content for m in shown if m.channel == "analysis"),
            commentary="\n\n".join(m.content for m in shown if m.channel == "commentary"),
            tool_calls=calls,
            stop_reason=stop or "truncated",
            partial=partial,
            issues=list(self.issues),
        )

    def _fault(self, problem: str) -> None:
        if self.strict:
            raise HarmonyError(f"malformed completion: {problem} (parse with strict=False to skip)")
        self.issues.append(problem)

    def _flush(self) -> list[Delta]:
        text = self._decoder.flush() if self._decoder is not None else ""
        return self._text(text) if text else []

    def _text(self, text: str) -> list[Delta]:
        if self._state == "header":
            self._header.append(text)
        elif self._state == "content" and self._head is not None:
            self._content.append(text)
            h = self._head
            return [Delta(text, h.channel, h.recipient, h.role if self._head_ok else None)]
        elif self._state == "between":
            self._fault(f"text outside a message: {text[:40]!r}")
        else:
            self._fault(f"text after the stop token: {text[:40]!r}")
        return []

    def _special(self, name: str) -> list[Delta]:
        state = self._state
        if state == "done":
            self._fault(f"{name} after the stop token")
        elif name == START:
            if state != "between":
                self._fault(f"{START} inside a message (the previous one was not ended)")
                if state == "content":
                    self._close(END)
            self._begin_header(role=None)
        elif name in (CHANNEL, CONSTRAIN):
            if state == "header":
                self._header.append(name)
            else:
                self._fault(f"{name} outside a message header")
        elif name == MESSAGE:
            if state == "content":
                self._fault(f"{MESSAGE} inside message content")
            else:
                if state == "between":
                    self._fault(f"{MESSAGE} without {START} and a header")
                    self._begin_header(role=None)  # no header: the content is never shown
                self._open()
        elif name in (END, *_STOPS):
            self._end(name)
        else:
            self._fault(f"unexpected special token {name}")
        return []

    def _begin_header(self, *, role: str | None) -> None:
        self._state, self._role, self._header = "header", role, []

    def _open(self) -> None:
        head, problems = _parse_header("".join(self._header), self._role)
        if problems:
            self._fault(f"header {''.join(self._header)!r}: {'; '.join(problems)}")
        self._head, self._content, self._state = head, [], "content"
        self._head_ok = not problems

    def _end(self, name: str) -> None:
        state = self._state
        if state == "content":
            if name == ENDOFTEXT:
                self._fault(f"message ended by {ENDOFTEXT} instead of {END}, {RETURN} or {CALL}")
            self._close(name)
        elif state == "header":
            self._fault(f"{name} ends a message header before {MESSAGE}")
        elif name in (END, RETURN, CALL):
            self._fault(f"{name} outside a message")
        self._state = "between" if name == END else "done"
        self._role, self._header = None, []
        if name != END:
            self.stop_reason = _STOPS[name]

    def _message(self) -> Message:
        h = self._head or _Header(None, None, None, None)
        return Message(h.role or "", "".join(self._content), h.channel, h.recipient, h.content_type)

    def _close(self, terminator: str) -> None:
        m = self._message()
        ok = self._head_ok
        self._head, self._content, self._head_ok = None, [], False
        if terminator == CALL and not m.recipient:
            self._fault(f"{CALL} ends a message that has no recipient (to=...)")
        if ok:
            self.messages.append(m)
            if m.recipient:
                self.tool_calls.append(_tool_call(m, truncated=False))


def parse_completion(
    completion: str | Iterable[int], *, tokenizer: Tokenizer | None = None, strict: bool = True
) -> ParsedReply:
    """Parse a completion (token ids, or text with special-token strings) that starts right after
    `<|start|>assistant`. Include the stop token (<|return|>/<|call|>) when there was one."""
    parser = StreamParser(tokenizer, strict=strict)
    if isinstance(completion, str):
        parser.feed_text(completion)
    else:
        for t in completion:
            parser.feed(int(t))
    return parser.result()
