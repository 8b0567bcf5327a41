"""Parsing what gpt-oss writes after `<|start|>assistant`, token by token or all at once.

Strict mode raises HarmonyError on any structural fault; lenient mode records it in `issues`, drops
the malformed message and goes on, so `messages` can always be rendered again as history. Only
well-formed assistant messages on the `final` channel without a recipient make up `final`: text
outside messages, without a channel, or cut off in a header never does."""

from __future__ import annotations

import json
import re
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
_ASCII_SPACE = re.compile(r"[\t\n\x0c\r ]+")  # where openai-harmony splits a header into words
_CHANNEL_WORD = re.compile(r"\s*([^\s<]*)")
_CONSTRAIN_SPACE = re.compile(re.escape(CONSTRAIN) + r"\s*")
_SPECIAL_PREFIX = re.compile(r"<(?:\|[a-z_0-9]*\|?)?")  # text that may yet become <|name|>


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
    """A header read as openai-harmony reads it: the channel is the word after <|channel|>; of
    the other words (the role first, after <|start|>), the last is the recipient when it is
    `to=...` or alone, else the content type, with the recipient (`to=` optional) before it.
    Unlike openai-harmony 0.0.8, a lone `<|constrain|>json` is a content type, not a recipient
    (a structured final answer stays the answer), and `<|constrain|> json` is `json`."""
    channel, rest = _take_channel(raw)
    rest = _CONSTRAIN_SPACE.sub(f" {CONSTRAIN}", rest)
    words = [w for w in _ASCII_SPACE.split(rest.strip()) if w]
    if role is None:
        role = words.pop(0) if words else None
    elif words and words[0] == role:
        words.pop(0)  # the role written again after the prompt's <|start|>assistant
    recipient, ctype, left = _recipient_and_type(words)
    content_type = (ctype.removeprefix(CONSTRAIN) or None) if ctype is not None else None
    head = _Header(role, channel or None, recipient, content_type)
    return head, _header_problems(head, channel, left)


def _header_problems(head: _Header, channel: str | None, left: list[str]) -> list[str]:
    problems = [f"unexpected {' '.join(left)!r}"] if left else []
    for what, value in (("recipient", head.recipient), ("content type", head.content_type)):
        if value is not None and not _HEADER_WORD.fullmatch(value):
            problems.append(f"invalid {what} {value!r}")
    if head.role != "assistant":
        problems.append(f"role {head.role!r}: a completion holds assistant messages only")
    elif channel == "":
        problems.append(f"{CHANNEL} without a value")
    elif channel is None:
        problems.append("no channel (harmony requires one on every message)")
    elif channel not in CHANNELS:
        problems.append(f"unknown channel {channel!r} (expected {', '.join(CHANNELS)})")
    return problems


def _take_channel(raw: str) -> tuple[str | None, str]:
    """The word after the first <|channel|> (empty if there is none), and the header without
    both. Unlike openai-harmony, which then finds no value, a space before the word is allowed."""
    at = raw.find(CHANNEL)
    if at < 0:
        return None, raw
    after = raw[at + len(CHANNEL) :]
    m = _CHANNEL_WORD.match(after)
    return m.group(1), raw[:at] + after[m.end() :]


def _recipient_and_type(words: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(recipient, content type, words left over) from a header's words after role and channel."""
    if not words:
        return None, None, []
    *rest, last = words
    if last.startswith("to="):
        return last[3:], None, rest
    if not rest:
        return (None, last, []) if last.startswith(CONSTRAIN) else (last, None, [])
    *rest, before = rest
    return before.removeprefix("to="), last, rest


def _tool_call(m: Message, *, truncated: bool) -> ToolCall:
    args, error = None, None
    if truncated:
        error = "truncated before <|call|>"
    elif m.content_type == "json" or (
        m.content_type is None and (m.recipient or "").startswith("functions.")
    ):  # a call declared as another type (`<|constrain|>sql`) takes its text as it is
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
        self._stray: list[str] = []  # text outside messages, reported once it ends
        self._held = ""  # feed_text: the end of a chunk that may be the start of <|name|>
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
        text, self._held = _hold_back(self._held + text)
        out: list[Delta] = []
        for n, piece in enumerate(_TEXT_SPECIAL.split(text)):
            if n % 2:
                out += self._special(piece)
            elif piece:
                out += self._text(piece)
        return out

    def finish(self) -> list[Delta]:
        """End of input: returns the last deltas (text held back as a possible special token, a
        dangling partial character)."""
        held, self._held = self._held, ""
        out = (self._text(held) if held else []) + self._flush()
        self._report_stray()
        return out

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
        else:
            self._stray.append(text)
        return []

    def _report_stray(self) -> None:
        if self._stray:
            text, self._stray = "".join(self._stray), []
            where = "outside a message" if self._state == "between" else "after the stop token"
            self._fault(f"text {where}: {text[:40]!r}")

    def _special(self, name: str) -> list[Delta]:
        self._report_stray()
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


def _hold_back(text: str) -> tuple[str, str]:
    """`text` split before a trailing piece that the next chunk may complete into <|name|>."""
    at = text.rfind("<")
    if at >= 0 and _SPECIAL_PREFIX.fullmatch(text, at):
        return text[:at], text[at:]
    return text, ""


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
