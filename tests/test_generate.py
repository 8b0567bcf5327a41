from types import SimpleNamespace

import pytest
import torch

from ossedge.runtime.errors import TokenizerError
from ossedge.runtime.generate import (
    ContextLimitError,
    GenerationStream,
    chat_turn,
    generate,
    stop_ids_for,
)
from ossedge.runtime.harmony import Message, render_completion_ids, render_ids
from ossedge.runtime.sampling import Sampler
from ossedge.runtime.tokenizer import Tokenizer, build_synthetic_tokenizer


class FakeCache:
    def __init__(self) -> None:
        self.position = 0


class FakeModel:
    """Deterministic logits: after the prompt, generated token k is `plan[k]` by a wide margin
    (`margin`), over seeded noise. Records every call's T so tests can check prefill/decode."""

    def __init__(self, plan, *, vocab=512, limit=4096, margin=20.0) -> None:
        self.plan = list(plan)
        self.vocab = vocab
        self.margin = margin
        self.config = SimpleNamespace(max_position_embeddings=limit)
        self.calls: list[int] = []
        self.last_only_requests: list[bool] = []
        self.prompt_len = 0
        noise = torch.Generator().manual_seed(0)
        self.noise = torch.randn(64, vocab, generator=noise)

    def new_cache(self, *, batch_size: int = 1) -> FakeCache:
        assert batch_size == 1
        return FakeCache()

    def __call__(self, input_ids, **kw):
        return self.forward(input_ids, **kw)

    def forward(self, input_ids, *, cache, last_only=False):
        self.last_only_requests.append(last_only)
        return self._logits(input_ids, cache, last_only=last_only)

    def _logits(self, input_ids, cache, *, last_only):
        b, t = input_ids.shape
        if input_ids.dtype != torch.long or b != 1:
            raise AssertionError(f"bad input {input_ids.dtype} {tuple(input_ids.shape)}")
        if cache.position == 0:
            self.prompt_len = t
        self.calls.append(t)
        cache.position += t
        if cache.position > self.config.max_position_embeddings:
            raise AssertionError("fed past the context window")
        k = cache.position - self.prompt_len  # index of the token these logits predict
        logits = self.noise[(cache.position - t + torch.arange(t)) % 64].clone()
        if k < len(self.plan):
            logits[-1, self.plan[k]] += self.margin
        if last_only:
            logits = logits[-1:]
        return logits[None]  # [1, T, V]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(build_synthetic_tokenizer(512))


def plan_text(tok, text):
    return tok.encode(text)


def test_greedy_follows_plan_and_stops_on_stop_id(tok):
    body = plan_text(tok, "Hello there, friend 🎉")
    stop = tok.special("<|return|>")
    model = FakeModel([*body, stop, 7, 8])
    prompt = tok.encode("Say hi")
    seen = []
    res = generate(
        model,
        tok,
        prompt,
        max_new_tokens=100,
        sampler=Sampler(temperature=0),
        stop_ids=[stop, tok.special("<|call|>")],
        on_token=lambda i, text: seen.append((i, text)),
    )
    assert res.ids == body
    assert res.text == "Hello there, friend 🎉" == tok.decode(body)
    assert res.stop_reason == "stop" and res.stop_id == stop
    assert [i for i, _ in seen] == body and "".join(t for _, t in seen) == res.text
    assert res.prefill_tok_s > 0 and res.decode_tok_s > 0
    assert model.calls == [len(prompt)] + [1] * len(body)  # prefill once, then one per token
    assert model.last_only_requests[:1] == [True]  # prefill asks for the last position only
    assert res.prompt_tokens == len(prompt) and res.sampled_tokens == len(body) + 1
    assert res.prefill_s > 0 and res.decode_s > 0


def test_max_new_tokens(tok):
    model = FakeModel(range(10, 60))
    res = generate(model, tok, [1, 2, 3], max_new_tokens=5, sampler=Sampler(temperature=0),
                   stop_ids=[])  # fmt: skip
    assert res.ids == [10, 11, 12, 13, 14]
    assert res.stop_reason == "length" and res.stop_id is None
    assert model.calls == [3, 1, 1, 1, 1]  # the 5th token is never fed back


def test_zero_new_tokens_calls_nothing(tok):
    model = FakeModel([5])
    res = generate(model, tok, [1], max_new_tokens=0, sampler=Sampler(), stop_ids=[])
    assert res.ids == [] and res.stop_reason == "length" and model.calls == []


def test_seeded_sampling_is_reproducible(tok):
    def run(seed):
        model = FakeModel([], margin=0.0)  # pure noise: sampling decides everything
        return generate(model, tok, [1, 2], max_new_tokens=40,
                        sampler=Sampler(temperature=1.0, seed=seed), stop_ids=[]).ids  # fmt: skip

    assert run(3) == run(3)
    assert run(3) != run(4)
    assert len(set(run(3))) > 10


def test_stream_yields_the_same_as_generate(tok):
    plan = plan_text(tok, "stream me please")
    stop = tok.special("<|endoftext|>")
    stream = GenerationStream(FakeModel([*plan, stop]), tok, [9], max_new_tokens=50,
                             sampler=Sampler(temperature=0), stop_ids=[stop])  # fmt: skip
    steps = list(stream)
    assert [s.id for s in steps] == plan
    assert "".join(s.text for s in steps) == "stream me please" == stream.result.text
    with pytest.raises(RuntimeError, match="already ran"):
        list(stream)


def test_context_window(tok):
    with pytest.raises(ContextLimitError, match="context window is 8"):
        generate(FakeModel([], limit=8), tok, list(range(9)), max_new_tokens=4,
                 sampler=Sampler(temperature=0), stop_ids=[])  # fmt: skip
    model = FakeModel(range(100, 120), limit=8)
    res = generate(model, tok, list(range(5)), max_new_tokens=10, sampler=Sampler(temperature=0),
                   stop_ids=[])  # fmt: skip
    assert res.stop_reason == "context"
    assert res.ids == [100, 101, 102, 103]  # positions 0..7 used; the 4th token is not fed
    assert sum(model.calls) == 8


def test_padded_model_vocab_never_yields_unknown_ids(tok):
    model = FakeModel([600, 601], vocab=640)  # ids past the tokenizer's 512
    res = generate(model, tok, [1], max_new_tokens=2, sampler=Sampler(temperature=0), stop_ids=[])
    assert all(i < 512 for i in res.ids)


@pytest.mark.parametrize(
    "prompt,max_new,match",
    [([], 4, "empty"), ([1], -1, ">= 0"), ([1], 2.5, "integer"), ([9999], 1, "outside")],
    ids=["empty-prompt", "negative-max", "float-max", "bad-id"],
)
def test_invalid_arguments(tok, prompt, max_new, match):
    with pytest.raises(ValueError, match=match):
        generate(FakeModel([]), tok, prompt, max_new_tokens=max_new, sampler=Sampler(),
                 stop_ids=[])  # fmt: skip


def test_chat_turn_shows_only_final_text(tok):
    reply_msgs = [
        Message("assistant", "SECRET chain of thought", channel="analysis"),
        Message("assistant", "The capital is Paris.", channel="final"),
    ]
    completion = render_completion_ids(tok, reply_msgs)
    messages = [Message("user", "Capital of France?")]
    for show_reasoning, separate in ((False, True), (True, True), (True, False)):
        model = FakeModel(completion)
        shown, thought = [], []
        reply = chat_turn(
            model,
            tok,
            messages,
            reasoning_effort="low",
            sampler=Sampler(temperature=0),
            max_new_tokens=200,
            show_reasoning=show_reasoning,
            on_text=shown.append,
            on_reasoning=thought.append if separate else None,
        )
        assert model.prompt_len == len(render_ids(tok, messages, reasoning_effort="low"))
        assert reply.final == "The capital is Paris." and reply.stop_reason == "return"
        assert reply.reasoning == "SECRET chain of thought"
        if separate:
            assert "".join(shown) == reply.final
            assert "".join(thought) == (reply.reasoning if show_reasoning else "")
        else:  # reasoning goes to on_text, ahead of the answer
            assert "".join(shown) == reply.reasoning + reply.final
        assert reply.meta["generation_stop"] == "stop"
        assert reply.meta["new_tokens"] == len(completion)
        assert reply.messages == reply_msgs


def test_chat_turn_tool_call_and_truncation(tok):
    call = Message.tool_call("get_weather", {"city": "Oslo"})
    completion = render_completion_ids(tok, [call])
    reply = chat_turn(FakeModel(completion), tok, [Message("user", "Weather in Oslo?")],
                      sampler=Sampler(temperature=0), max_new_tokens=200)  # fmt: skip
    assert reply.stop_reason == "call"
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("get_weather", {"city": "Oslo"})]
    assert reply.final is None

    long = render_completion_ids(tok, [Message("assistant", "SECRET " * 30, channel="analysis")])
    reply = chat_turn(FakeModel(long), tok, [Message("user", "hi")],
                      sampler=Sampler(temperature=0), max_new_tokens=10)  # fmt: skip
    assert reply.stop_reason == "truncated" and reply.final is None
    assert reply.meta["generation_stop"] == "length"


def test_real_tiny_model_cached_decode_matches_full_forward(tiny_ckpt):
    from ossedge.runtime.model import load_model

    model = load_model(tiny_ckpt)
    tok = Tokenizer.from_dir(tiny_ckpt)
    prompt = render_ids(tok, [Message("user", "Hello!")])
    limit = model.config.max_position_embeddings
    res = generate(model, tok, prompt, max_new_tokens=12, sampler=Sampler(temperature=0),
                   stop_ids=[])  # fmt: skip
    assert len(res.ids) == 12 and res.stop_reason == "length"
    assert res.text == tok.decode(res.ids)
    ids = list(prompt)
    for expected in res.ids:  # greedy without a cache: recompute the whole sequence each step
        logits = model(torch.tensor([ids[-limit:]]))
        assert int(torch.argmax(logits[0, -1, : tok.vocab_size])) == expected
        ids.append(expected)


def test_on_text_gets_whole_characters(tok):
    plan = tok.encode("a🎉b")
    pieces = []
    res = generate(FakeModel(plan), tok, [1], max_new_tokens=len(plan),
                   sampler=Sampler(temperature=0), stop_ids=[], on_text=pieces.append)  # fmt: skip
    assert pieces == ["a", "🎉", "b"] and res.text == "a🎉b"


def test_stop_ids_for(tmp_path, tok):
    assert stop_ids_for(tmp_path, tok) == [500, 497, 510]  # by name when no generation_config
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [500, 497]}')
    assert stop_ids_for(tmp_path, tok) == [500, 497]
    (tmp_path / "original").mkdir()
    assert stop_ids_for(tmp_path / "original", tok) == [500, 497]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 200002}')
    with pytest.raises(TokenizerError, match="200002"):
        stop_ids_for(tmp_path, tok)


def test_chat_turn_on_garbage_keeps_history_renderable(tok):
    garbage = tok.encode_with_special(
        "<|channel|>bogus<|message|>SECRET<|end|><|start|>assistant<|channel|>final<|message|>ok"
        "<|end|><|message|>SECRET2<|end|><|start|>assistant<|channel|>final<|message|>!<|return|>"
    )
    reply = chat_turn(FakeModel(garbage), tok, [Message("user", "hi")],
                      sampler=Sampler(temperature=0), max_new_tokens=100)  # fmt: skip
    assert reply.final == "ok!"
    assert any("'bogus'" in i for i in reply.issues)
    assert any("<|message|> without <|start|>" in i for i in reply.issues)
    history = [Message("user", "hi"), *reply.messages, Message("user", "again")]
    assert "SECRET" not in tok.decode(render_ids(tok, history))
