"""gpt-oss's released tokenizer, o200k_harmony, rebuilt offline from the o200k_base vocabulary that
the optional package quicktok-v1 ships (`pip install 'ossedge[tokenizer]'`).

quicktok's `data/o200k.vocab` holds, little-endian, a u32 count and then per token a u16 length,
the token's bytes and its u32 rank. Written as `base64(bytes) rank` lines it is byte for byte
tiktoken's `o200k_base.tiktoken` (checked against tiktoken's sha256). The tokenizer.json built from
it has the form transformers' tiktoken converter gives gpt-oss's release: byte-level BPE over the
ranks, the o200k split regex, and the 1090 harmony special tokens at ids 199998..201087.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from importlib import resources
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from ossedge.runtime.atomic import atomic_dir, check_output
from ossedge.runtime.errors import TokenizerError
from ossedge.runtime.tokenizer import (FULL_SPECIAL_COUNT, SPLIT_PATTERN, _byte_decoder,
                                       special_layout)

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_BASE_SIZE = 199998  # ordinary tokens (ranks 0..199997)
O200K_VOCAB_SIZE = O200K_BASE_SIZE + FULL_SPECIAL_COUNT  # 201088, gpt-oss's vocab_size
QUICKTOK = "quicktok"
VOCAB_RESOURCE = "data/o200k.vocab"
INSTALL_HINT = "pip install 'ossedge[tokenizer]'"
TOKENIZER_FILE = "tokenizer.json"


def _vocab_bytes() -> bytes:
    try:
        where = resources.files(QUICKTOK)
    except ImportError:
        raise TokenizerError(
            "gpt-oss's tokenizer is built from the vocabulary of the optional package "
            f"quicktok-v1, which is not installed; run: {INSTALL_HINT}"
        ) from None
    try:
        return where.joinpath(VOCAB_RESOURCE).read_bytes()
    except OSError as e:
        raise TokenizerError(
            f"quicktok-v1 is installed but its {VOCAB_RESOURCE} cannot be read "
            f"({e.strerror or e}); reinstall it: {INSTALL_HINT}"
        ) from None


def o200k_ranks() -> dict[bytes, int]:
    """o200k_base's tokens (bytes → rank), read from quicktok-v1 and checked against tiktoken's
    sha256; raises TokenizerError saying how to install it when it is missing or different."""
    data = _vocab_bytes()
    ranks: dict[bytes, int] = {}
    try:
        (count,) = struct.unpack_from("<I", data, 0)
        at = 4
        for _ in range(count):
            (n,) = struct.unpack_from("<H", data, at)
            (rank,) = struct.unpack_from("<I", data, at + 2 + n)
            ranks[data[at + 2 : at + 2 + n]] = rank
            at += 6 + n
    except struct.error:
        count, at = -1, -1
    digest = hashlib.sha256(tiktoken_text(ranks)).hexdigest() if at == len(data) else "-"
    if digest != O200K_SHA256 or len(ranks) != O200K_BASE_SIZE:
        raise TokenizerError(
            f"quicktok-v1's {VOCAB_RESOURCE} is not o200k_base ({len(ranks)} tokens, sha256 "
            f"{digest[:12]}…, expected {O200K_BASE_SIZE} and {O200K_SHA256[:12]}…); reinstall "
            f"it: {INSTALL_HINT}"
        )
    return ranks


def tiktoken_text(ranks: dict[bytes, int]) -> bytes:
    """The `o200k_base.tiktoken` file: one `base64(token) rank` line per token, in rank order."""
    lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=_rank))
    return "".join(lines).encode()


def write_o200k_base(folder: str | Path) -> Path:
    """folder/o200k_base.tiktoken, as tiktoken ships it (for tiktoken-based tools offline)."""
    path = Path(folder) / "o200k_base.tiktoken"
    path.write_bytes(tiktoken_text(o200k_ranks()))
    return path


def _rank(item: tuple[bytes, int]) -> int:
    return item[1]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary (GPT-2 byte-level strings → rank) and merges of `ranks`: every split of
    a token into two tokens, ordered by the rank of the token they make (then by the ranks of the
    two parts). Pairs then merge in the order tiktoken merges them; this is also the list
    transformers' tiktoken converter writes."""
    table = {b: c for c, b in _byte_decoder().items()}
    chars = [table[b] for b in range(256)]
    vocab: dict[str, int] = {}
    ordered = sorted(ranks.items(), key=_rank)
    for token, rank in ordered:
        vocab["".join([chars[b] for b in token])] = rank
    merges: list[tuple[str, str]] = []
    # one character per byte, so splitting the byte-level string splits the bytes
    for s in vocab:
        if len(s) < 2:
            continue
        pairs = [(s[:i], s[i:]) for i in range(1, len(s)) if s[:i] in vocab and s[i:] in vocab]
        if len(pairs) > 1:
            pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges += pairs
    return vocab, merges


def build_o200k_harmony() -> tokenizers.Tokenizer:
    """o200k_harmony as gpt-oss ships it in tokenizer.json (201088 ids); needs quicktok-v1."""
    vocab, merges = vocab_and_merges(o200k_ranks())
    # ignore_merges: a pre-token that is itself a token is taken whole, as tiktoken does
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = special_layout(O200K_VOCAB_SIZE)
    # added tokens take the ids after the model's, in the order given
    tok.add_special_tokens(
        [AddedToken(name, normalized=False, special=True) for _, name in sorted(specials.items())]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    wrong = [(n, i) for i, n in specials.items() if tok.token_to_id(n) != i]
    if wrong or tok.get_vocab_size(with_added_tokens=True) != O200K_VOCAB_SIZE:
        raise RuntimeError(f"o200k_harmony's special tokens landed on the wrong ids: {wrong[:3]}")
    return tok


def write_o200k_harmony(out: str | Path, *, force: bool = False) -> Path:
    """Write out/tokenizer.json (o200k_harmony) atomically and return its path. An existing
    non-empty `out` is refused unless `force`; an empty directory is used."""

    out = Path(out)
    force = force or (out.is_dir() and not any(out.iterdir()))
    check_output(out, force=force)  # before the build: refuse at once
    tok = build_o200k_harmony()
    with atomic_dir(out, force=force) as tmp:
        tok.save(str(tmp / TOKENIZER_FILE))
    return out / TOKENIZER_FILE
