"""The generation loop: prefill the prompt in one call, then decode one token per call with the
model's KV cache; and one harmony chat turn on top of it.

The model contract: `cache = model.new_cache(batch_size=1)`; `model(ids[B, T], cache=cache,
last_only=False)` → logits [B, T, V] ([B, 1, V] with last_only), continuing from where the cache
is; `model.config.max_position_embeddings`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ossedge.runtime.errors import OssedgeError, TokenizerError
from ossedge.runtime.harmony import Message, ParsedReply, ToolSpec, render_ids
from ossedge.runtime.harmony_parse import Delta, StreamParser
from ossedge.runtime.sampling import Sampler
from ossedge.runtime.tokenizer import EOS_NAMES, Tokenizer


class ContextLimitError(OssedgeError):
    """The prompt does not fit the model's context window."""


@dataclass(frozen=True)
class Step:
    """One generated token and the text it completed ("" while a character is still split)."""

    id: int
    text: str


@dataclass
class GenerationResult:
    """`ids`/`text` exclude the stop token. `stop_reason`: "stop" (a stop id, kept in `stop_id`),
    "length" (max_new_tokens) or "context" (the context window is full)."""

    ids: list[int]
    text: str
    stop_reason: str
    stop_id: int | None
    prompt_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def sampled_tokens(self) -> int:
        return len(self.ids) + (self.stop_id is not None)

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens per second of the prefill (which also yields the first new token)."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """New tokens per second after the first."""
        n = self.sampled_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def context_limit(model: Any) -> int | None:
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def stop_ids_for(checkpoint: str | Path, tokenizer: Tokenizer) -> list[int]:
    """The eos ids of the checkpoint's generation_config.json (beside it or one folder up, for an
    `original/` layout); without one, <|return|>, <|endoftext|>, <|call|> looked up by name."""
    p = Path(checkpoint)
    for folder in (p, p.parent) if p.is_dir() else (p.parent, p.parent.parent):
        file = folder / "generation_config.json"
        if file.is_file():
            try:
                eos = json.loads(file.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, AttributeError) as e:
                raise TokenizerError(f"{file}: not a valid generation config ({e})") from None
            ids = [eos] if isinstance(eos, int) else list(eos or [])
            bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < tokenizer.vocab_size]
            if bad:
                raise TokenizerError(
                    f"{file}: eos_token_id {bad[0]!r} is not a token of tokenizer.json; the two "
                    "files do not belong together"
                )
            if ids:
                return ids
    return [tokenizer.special(n) for n in EOS_NAMES]


class GenerationStream:
    """Iterate to get `Step`s as tokens are generated; afterwards `result` holds the summary."""

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        sampler: Sampler,
        stop_ids: Iterable[int],
    ) -> None:
        self.prompt = [int(i) for i in prompt_ids]
        if not self.prompt:
            raise ValueError("prompt_ids is empty; the model needs at least one token to start")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        v = tokenizer.vocab_size
        bad = [i for i in self.prompt if not 0 <= i < v]
        if bad:
            raise ValueError(f"prompt id {bad[0]} is outside the tokenizer's vocabulary [0, {v})")
        self.limit = context_limit(model)
        if self.limit is not None and len(self.prompt) > self.limit:
            raise ContextLimitError(
                f"the prompt has {len(self.prompt)} tokens but the model's context window is "
                f"{self.limit} (max_position_embeddings); shorten the conversation or the prompt"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.result: GenerationResult | None = None
        self.tail = ""  # after iterating: a character left incomplete at the end, as U+FFFD

    def __iter__(self) -> Iterator[Step]:
        if self.result is not None:
            raise RuntimeError("this generation already ran; start a new GenerationStream")
        ids: list[int] = []
        pieces: list[str] = []
        stop_reason, stop_id = "length", None
        prefill_s = decode_s = 0.0
        decoder = self.tokenizer.stream_decoder()
        vocab = self.tokenizer.vocab_size
        t0 = time.perf_counter()
        if self.max_new_tokens > 0:
            cache = self.model.new_cache(batch_size=1)
            x = torch.tensor([self.prompt], dtype=torch.long)
            logits = self.model(x, cache=cache, last_only=True)  # [1, 1, V]
            pos = len(self.prompt)
            t1 = None
            while True:
                # a model vocabulary padded past the tokenizer's must not emit undefined ids
                tok = self.sampler.sample(logits[0, -1, :vocab])
                if t1 is None:
                    t1 = time.perf_counter()
                    prefill_s = t1 - t0
                if tok in self.stop_ids:
                    stop_reason, stop_id = "stop", tok
                    break
                ids.append(tok)
                text = decoder.feed(tok)
                pieces.append(text)
                yield Step(tok, text)
                if len(ids) >= self.max_new_tokens:
                    break
                if self.limit is not None and pos >= self.limit:
                    stop_reason = "context"
                    break
                logits = self.model(torch.tensor([[tok]], dtype=torch.long), cache=cache)
                pos += 1
            decode_s = time.perf_counter() - t1
        self.tail = decoder.flush()
        pieces.append(self.tail)
        self.result = GenerationResult(
            ids=ids,
            text="".join(pieces),
            stop_reason=stop_reason,
            stop_id=stop_id,
            prompt_tokens=len(self.prompt),
            prefill_s=prefill_s,
            decode_s=decode_s,
        )


def generate(
    model: Any,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampler: Sampler,
    stop_ids: Iterable[int],
    on_token: Callable[[int, str], None] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate until a stop id (not included in the result), `max_new_tokens`, or a full context
    window. `on_token(id, text)` is called for each generated token, `on_text(text)` for each
    non-empty piece of text (a character split across tokens arrives whole)."""
    stream = GenerationStream(
        model,
        tokenizer,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        sampler=sampler,
        stop_ids=stop_ids,
    )
    for step in stream:
        if on_token is not None:
            on_token(step.id, step.text)
        if on_text is not None and step.text:
            on_text(step.text)
    if on_text is not None and stream.tail:
        on_text(stream.tail)
    if stream.result is None:
        raise RuntimeError("generation ended without a result")
    return stream.result


def chat_turn(
    model: Any,
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    *,
    reasoning_effort: str = "medium",
    sampler: Sampler,
    max_new_tokens: int,
    show_reasoning: bool = False,
    on_text: Callable[[str], None] | None = None,
    on_reasoning: Callable[[str], None] | None = None,
    tools: Sequence[ToolSpec] | None = None,
    instructions: str | None = None,
    current_date: str | None = None,
    strict: bool = False,
) -> ParsedReply:
    """Render `messages` with harmony, generate the assistant's reply and parse it.

    `on_text(text)` receives user-facing text as it arrives: the final answer and commentary
    preambles. Analysis text goes to `on_reasoning` (to `on_text` if that is None), and only when
    `show_reasoning`. Structural faults of the reply are listed in `reply.issues` (or raise
    HarmonyError when `strict`); `reply.meta` holds token counts and timings."""
    prompt = render_ids(
        tokenizer,
        messages,
        reasoning_effort=reasoning_effort,
        tools=tools,
        instructions=instructions,
        current_date=current_date,
    )
    parser = StreamParser(tokenizer, strict=strict)
    reasoning_sink = on_reasoning or on_text

    def show(deltas: list[Delta]) -> None:
        for d in deltas:
            preamble = d.role == "assistant" and d.channel == "commentary" and d.recipient is None
            if (d.is_final or preamble) and on_text is not None:
                on_text(d.text)
            elif d.is_reasoning and show_reasoning and reasoning_sink is not None:
                reasoning_sink(d.text)

    result = generate(
        model,
        tokenizer,
        prompt,
        max_new_tokens=max_new_tokens,
        sampler=sampler,
        stop_ids=[tokenizer.special(n) for n in EOS_NAMES],
        on_token=lambda tok, _text: show(parser.feed(tok)),
    )
    if result.stop_id is not None:
        show(parser.feed(result.stop_id))
    show(parser.finish())
    reply = parser.result()
    reply.meta.update(
        prompt_tokens=result.prompt_tokens,
        new_tokens=result.sampled_tokens,
        prefill_s=result.prefill_s,
        decode_s=result.decode_s,
        prefill_tok_s=result.prefill_tok_s,
        decode_tok_s=result.decode_tok_s,
        generation_stop=result.stop_reason,
    )
    return reply
