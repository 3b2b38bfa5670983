"""`geotrain`: the umbrella command (prepare, train, sample, eval, demo, status).

Each subcommand maps flags (and `--config FILE.toml` where it applies) onto the typed dataclasses
of common/config.py and calls a plain function; ValueError from those becomes a clear message and
exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from common import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geotrain")
def cli() -> None:
    """Train GPT models on GPUs scattered over the internet."""


def fail(message: str) -> None:
    """Print a one-line error and exit 2 (callers' mistakes: bad flags, bad files)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@cli.command()
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output data directory.")
@click.option("--tokenizer", type=click.Choice(["byte", "bpe"]), default="byte", show_default=True,
              help="byte: UTF-8 bytes + end-of-text (vocab 257). bpe: byte-level BPE trained here "
                   "(needs 'tokenizers'), saved as OUT/tokenizer.json.")
@click.option("--vocab-size", type=int, default=None,
              help="bpe: target vocabulary (>= 257, default 4096). byte: optional padded vocabulary "
                   "(>= 257). Above 65,536 ids tokens are stored as uint32.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Validation share in [0, 0.5]: the last fraction of a single document, else whole documents.")
@click.option("--shard-tokens", type=int, default=50_000_000, show_default=True, help="Tokens per shard file.")
@click.option("--workers", type=int, default=None, help="Encoding processes (spawned). Default: 1 below 32 MiB of input, else CPU count (max 8).")
@click.option("--from-nanogpt", "from_nanogpt", type=click.Path(path_type=Path), default=None,
              help="Convert nanoGPT train.bin/val.bin (uint16) in this directory instead of encoding text; "
                   "vocab size from its meta.pkl, else --vocab-size.")
@click.option("--hf-dataset", default=None, metavar="NAME[:SPLIT]",
              help="Also encode the 'text' column of a Hugging Face dataset (needs 'datasets').")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar and summary.")
def prepare(inputs, out, tokenizer, vocab_size, val_fraction, shard_tokens, workers, from_nanogpt,
            hf_dataset, progress) -> None:
    """Tokenize INPUT files into token shards + manifest.json in --out.

    INPUT: text files, directories of them (recursive, sorted; hidden files skipped) or .jsonl files
    (one document per line, field "text"). With no INPUT: the embedded default corpus, the Python
    standard library's .py files (8 MiB). Documents are separated by the end-of-text token.

    Undecodable bytes are replaced with U+FFFD and a warning naming the file is printed (once per
    file); files that look binary are skipped with a warning.
    """
    from common import data as data_mod

    try:
        if from_nanogpt is not None:
            if inputs or hf_dataset:
                fail("--from-nanogpt converts existing bins; give no INPUT or --hf-dataset with it")
            if not 0 < shard_tokens:
                fail(f"--shard-tokens must be positive, got {shard_tokens}")
            manifest = data_mod.import_nanogpt(from_nanogpt, out, vocab_size, shard_tokens=shard_tokens)
        else:
            manifest = data_mod.prepare(
                list(inputs), out, tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction,
                shard_tokens=shard_tokens, workers=workers, progress=progress, hf_dataset=hf_dataset,
            )
    except (ValueError, OSError) as exc:
        fail(str(exc))
        return
    n_train = sum(s.tokens for s in manifest.split("train"))
    n_val = sum(s.tokens for s in manifest.split("val"))
    click.echo(
        f"{out}: {n_train} train tokens, {n_val} val tokens, {len(manifest.shards)} shards, "
        f"tokenizer {manifest.tokenizer['name']}, vocab_size {manifest.vocab_size}, dtype {manifest.dtype}"
    )


def main() -> None:
    cli()
