"""`ossedge tokenizer o200k -o DIR`: gpt-oss's released tokenizer.json, built offline."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ossedge.runtime.tokenizer_o200k import O200K_VOCAB_SIZE, write_o200k_harmony


@click.group()
def tokenizer() -> None:
    """Write tokenizers in the form gpt-oss checkpoints ship them."""


@tokenizer.command()
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True,
              help="Directory to write tokenizer.json into (new or empty).")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists and is not empty.")
def o200k(out: Path, force: bool) -> None:
    """Write gpt-oss's tokenizer.json (o200k_harmony) into OUTPUT.

    o200k_base's byte-level BPE with the harmony special tokens at ids 199998..201087, as the
    released checkpoint ships it, built offline from the vocabulary of the `tokenizer` extra
    (quicktok-v1)."""
    start = time.perf_counter()
    path = write_o200k_harmony(out, force=force)
    click.echo(f"wrote o200k_harmony ({O200K_VOCAB_SIZE} ids) to {path} in "
               f"{time.perf_counter() - start:.1f} s")  # fmt: skip
