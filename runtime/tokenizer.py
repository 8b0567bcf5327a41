"""The o200k_harmony tokenizer (a `tokenizer.json` beside the checkpoint), an incremental decoder
that never splits a UTF-8 character, and a synthetic tokenizer with the real special-token
layout."""

from __future__ import annotations

import codecs
import json
import threading
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from ossedge.runtime.errors import TokenizerError

# GPT-4o (o200k) pre-tokenizer regex, as in the released tokenizer.json.
SPLIT_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# Offsets from the first special id (199998 in gpt-oss); every other slot is <|reserved_ID|>.
SPECIAL_OFFSETS: dict[str, int] = {
    "<|startoftext|>": 0,
    "<|endoftext|>": 1,
    "<|return|>": 4,
    "<|constrain|>": 5,
    "<|channel|>": 7,
    "<|start|>": 8,
    "<|end|>": 9,
    "<|message|>": 10,
    "<|call|>": 14,
}
# The released tokenizer.json names id 200018 <|endofprompt|> (inherited from o200k_base).
_FULL_EXTRA = {"<|endofprompt|>": 20}
FULL_SPECIAL_COUNT = 1090  # ids 199998..201087
O200K_BOS = 199998
SMALL_SPECIAL_COUNT = 16
MIN_FULL_BASE = 512  # below this many ordinary tokens, use the compact 16-slot layout
BYTE_ALPHABET = 256

EOS_NAMES = ("<|return|>", "<|endoftext|>", "<|call|>")
PAD_NAME = "<|endoftext|>"
BOS_NAME = "<|startoftext|>"
CORPUS_RESOURCE = "data/synth_corpus.txt"


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level table, inverted: printable bytes map to themselves, the rest to 256+n."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class Tokenizer:
    """A `tokenizers.Tokenizer` with harmony-safe encoding: `encode` treats special-token strings
    in text as ordinary text; only `encode_with_special` turns them into special ids."""

    def __init__(self, backend: tokenizers.Tokenizer, *, source: str = "<memory>") -> None:
        self.backend = backend
        self.source = source
        self._lock = threading.Lock()
        added = backend.get_added_tokens_decoder()
        self._special_by_name = {t.content: i for i, t in added.items() if t.special}
        self._special_ids = frozenset(self._special_by_name.values())
        self._added_ids = frozenset(added)
        self._byte_level = isinstance(backend.decoder, tokenizers.decoders.ByteLevel)
        self._bytes_cache: dict[int, bytes] = {}

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` from a checkpoint directory (or the file itself)."""
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise TokenizerError(
                f"{file}: tokenizer.json not found; pass the checkpoint directory that ships "
                "tokenizer.json (copy it from the original checkpoint, or re-run `ossedge synth`)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(
                f"{file}: cannot parse tokenizer.json ({e}); the file is corrupt or truncated, "
                "copy it again from the original checkpoint"
            ) from e
        tok = cls(backend, source=str(file))
        check_special_layout(tok)
        return tok

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; `<|start|>` and friends in `text` stay ordinary text."""
        with self._lock:
            self.backend.encode_special_tokens = True
            try:
                return self.backend.encode(text, add_special_tokens=False).ids
            finally:
                self.backend.encode_special_tokens = False

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, in parallel threads (for corpora: training, evaluation)."""
        with self._lock:
            self.backend.encode_special_tokens = True
            try:
                return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
            finally:
                self.backend.encode_special_tokens = False

    def encode_with_special(self, text: str) -> list[int]:
        """Text to ids, recognizing special-token strings. Never use on untrusted text."""
        with self._lock:
            return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        ids = self._check_ids(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def special(self, name: str) -> int:
        """Id of a special token looked up by name, e.g. `special("<|start|>")`."""
        try:
            return self._special_by_name[name]
        except KeyError:
            raise TokenizerError(
                f"{self.source}: special token {name!r} is missing; this tokenizer.json is not "
                "o200k_harmony (use the tokenizer.json shipped with the gpt-oss checkpoint)"
            ) from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def special_name(self, token_id: int) -> str | None:
        """The special token's name for `token_id`, or None for ordinary tokens."""
        return self.backend.id_to_token(token_id) if token_id in self._special_ids else None

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (part of a UTF-8 character for some tokens)."""
        b = self._bytes_cache.get(token_id)
        if b is not None:
            return b
        self._check_ids([token_id])
        if token_id in self._added_ids or not self._byte_level:
            b = self.backend.decode([token_id], skip_special_tokens=False).encode()
        else:
            table = _byte_decoder()
            token = self.backend.id_to_token(token_id) or ""
            b = b"".join(bytes([table[c]]) if c in table else c.encode() for c in token)
        self._bytes_cache[token_id] = b
        return b

    def stream_decoder(self, *, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special=skip_special)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        v = self.vocab_size
        bad = [i for i in ids if not 0 <= i < v]
        if bad:
            raise TokenizerError(
                f"token id {bad[0]} is outside the vocabulary [0, {v}) of {self.source}; the model "
                "and tokenizer.json do not belong together"
            )
        return ids


class StreamDecoder:
    """Incremental decoding: `feed(ids)` returns the text completed so far, holding back the bytes
    of a UTF-8 character split across tokens; `flush()` returns what is left."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Iterable[int]) -> str:
        ids = [ids] if isinstance(ids, int) else ids
        tok = self.tokenizer
        data = b"".join(
            tok.token_bytes(i) for i in ids if not (self.skip_special and tok.is_special(i))
        )
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of stream: a dangling partial character becomes U+FFFD."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


def special_ids(tokenizer: Tokenizer | tokenizers.Tokenizer) -> dict[str, int]:
    """The harmony special tokens, name → id; raises TokenizerError naming any that is missing."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    return {name: tok.special(name) for name in SPECIAL_OFFSETS}


def check_special_layout(tokenizer: Tokenizer) -> None:
    """Raise TokenizerError naming the first harmony special token that is missing, not special or
    off its id. The block of special tokens is the last 1090 ids (gpt-oss: <|startoftext|> 199998)
    or, in compact layouts, the last 16; each token sits at its SPECIAL_OFFSETS from the first."""
    tok = tokenizer
    v, by_name = tok.vocab_size, tok._special_by_name
    start = by_name.get(BOS_NAME)
    full, compact = v - FULL_SPECIAL_COUNT, v - SMALL_SPECIAL_COUNT
    candidates = [b for b in (start, full, compact) if b is not None and b >= 0] or [0]
    # the layout most tokens agree with names the token that is off (first wins a tie)
    base = max(candidates, key=lambda b: sum(by_name.get(n) == b + o for n, o in
                                             SPECIAL_OFFSETS.items()))  # fmt: skip
    added = tok.backend.get_added_tokens_decoder()
    for name, offset in SPECIAL_OFFSETS.items():
        want, got = base + offset, by_name.get(name)
        if got == want:
            continue
        plain = [i for i, t in added.items() if t.content == name]
        if got is not None:
            found = f"it is id {got}"
        elif plain:
            found = f"id {plain[0]} holds it but not as a special token"
        else:
            at = added.get(want)
            found = "it is missing" + (f" (id {want} is {at.content})" if at else "")
        raise TokenizerError(
            f"{tok.source}: harmony special token {name} should be id {want}, but {found}; use "
            "the tokenizer.json shipped with the checkpoint (gpt-oss's: `ossedge tokenizer o200k`)"
        )
    if v - base not in (FULL_SPECIAL_COUNT, SMALL_SPECIAL_COUNT):
        raise TokenizerError(
            f"{tok.source}: the harmony special tokens start at id {base} of {v}, but they must be "
            f"the last {FULL_SPECIAL_COUNT} ids (gpt-oss: {BOS_NAME} {O200K_BOS}) or the last "
            f"{SMALL_SPECIAL_COUNT}; use the tokenizer.json shipped with the checkpoint"
        )


def generation_ids(tokenizer: Tokenizer | tokenizers.Tokenizer) -> dict[str, int | list[int]]:
    """`generation_config.json` token ids, looked up by name: eos = <|return|>, <|endoftext|>,
    <|call|>; pad = <|endoftext|>; bos = <|startoftext|>."""
    ids = special_ids(tokenizer)
    return {
        "bos_token_id": ids[BOS_NAME],
        "eos_token_id": [ids[n] for n in EOS_NAMES],
        "pad_token_id": ids[PAD_NAME],
    }


def special_layout(vocab_size: int, *, count: int | None = None) -> dict[int, str]:
    """id → name of every special token of a synthetic vocabulary of `vocab_size`: the last 1090
    ids as in gpt-oss (199998..201087 for 201088), or the last 16 for small test vocabularies.
    `count` (FULL_SPECIAL_COUNT or SMALL_SPECIAL_COUNT) forces a layout; by default the vocabulary
    size picks it. A small trained model forces 16 so its ordinary ids are not spent on reserved
    slots."""
    if count is None:
        full = vocab_size - FULL_SPECIAL_COUNT >= MIN_FULL_BASE
        count = FULL_SPECIAL_COUNT if full else SMALL_SPECIAL_COUNT
    if count == FULL_SPECIAL_COUNT:
        names = SPECIAL_OFFSETS | _FULL_EXTRA
    elif count == SMALL_SPECIAL_COUNT:
        names = SPECIAL_OFFSETS
    else:
        raise ValueError(
            f"special token count {count} is not a harmony layout; use {SMALL_SPECIAL_COUNT} "
            f"(compact) or {FULL_SPECIAL_COUNT} (as gpt-oss)"
        )
    base = vocab_size - count
    if base < BYTE_ALPHABET:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for a byte-level tokenizer; it needs at least "
            f"{BYTE_ALPHABET + count} (256 bytes + {count} special tokens)"
        )
    by_offset = {o: n for n, o in names.items()}
    return {base + o: by_offset.get(o, f"<|reserved_{base + o}|>") for o in range(count)}


def build_synthetic_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    """A deterministic byte-level BPE tokenizer of exactly `vocab_size` ids in the form of
    o200k_harmony's tokenizer.json, trained on a small English corpus. Ordinary ids the corpus
    cannot fill are placeholders `<unused_ID>` that no merge produces (they still decode)."""
    corpus = resources.files("ossedge.runtime").joinpath(CORPUS_RESOURCE).read_text("utf-8")
    return train_bpe_tokenizer([corpus], vocab_size)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, *, special_count: int | None = None
) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer of exactly `vocab_size` ids trained on `texts`: o200k's
    pre-tokenizer regex, the harmony special tokens at the end (`special_layout(vocab_size,
    count=special_count)`), and `<unused_ID>` placeholders for ordinary ids the texts cannot fill.
    Deterministic for the same texts in the same order."""
    specials = special_layout(vocab_size, count=special_count)
    base = min(specials)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    if len(vocab) > base or sorted(vocab.values()) != list(range(len(vocab))):
        raise RuntimeError(f"BPE training gave {len(vocab)} ids with gaps; expected ≤ {base}")
    for i in range(len(vocab), base):
        vocab[f"<unused_{i}>"] = i
    if len(vocab) != base:
        raise RuntimeError("a placeholder token collided with a trained token")
    # tokenizers renumbers added tokens to follow the model vocabulary in list order, ignoring
    # the ids written here; listing them in id order after exactly `base` model ids keeps them.
    spec["added_tokens"] = [
        {
            "id": i,
            "content": name,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, name in sorted(specials.items())
    ]
    out = tokenizers.Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    wrong = [(n, i) for i, n in specials.items() if out.token_to_id(n) != i]
    if wrong or out.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(f"special tokens landed on the wrong ids: {wrong[:3]}")
    return out
