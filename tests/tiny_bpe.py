"""A small GPT-2-style BPE built from local merges, so gpt2-tokenizer tests run offline.

``tiny_encoding()`` is a real ``tiktoken.Encoding`` with GPT-2's split pattern, the 256 byte tokens
in GPT-2's data-gym order, a few merges and ``<|endoftext|>`` after them; ``write_data_gym`` writes
the same table as GPT-2's ``vocab.bpe`` + ``encoder.json`` files.
"""

from __future__ import annotations

import json
from pathlib import Path

import tiktoken

from geotrain.common.tokenizer import EOT_TEXT, GPT2_PAT_STR

# Merges in data-gym spelling ("Ġ" is the space byte), each one token of the table in order.
MERGES = [("t", "h"), ("th", "e"), ("Ġ", "the"), ("i", "n"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"),
          ("o", "n"), ("Ġ", "s"), ("e", "r")]
OTHER_MERGES = [("a", "b"), ("c", "d")]  # a different table: another vocabulary


def byte_chars() -> dict[int, str]:
    """GPT-2's data-gym spelling of each byte: printable non-space bytes as themselves, the rest as
    chr(256 + n) in byte order."""
    out = {b: chr(b) for b in range(256) if chr(b).isprintable() and chr(b) != " "}
    n = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


def _table(merges: list[tuple[str, str]]) -> list[str]:
    chars = byte_chars()
    order = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    order += [b for b in range(256) if b not in order]
    return [chars[b] for b in order] + [a + b for a, b in merges]


def _to_bytes(word: str) -> bytes:
    back = {c: b for b, c in byte_chars().items()}
    return bytes(back[c] for c in word)


def tiny_encoding(merges: list[tuple[str, str]] = MERGES, name: str = "tiny") -> tiktoken.Encoding:
    ranks = {_to_bytes(w): i for i, w in enumerate(_table(merges))}
    return tiktoken.Encoding(name, pat_str=GPT2_PAT_STR, mergeable_ranks=ranks, special_tokens={EOT_TEXT: len(ranks)})


def write_data_gym(directory: Path, merges: list[tuple[str, str]] = MERGES) -> Path:
    """vocab.bpe + encoder.json of the table into ``directory``; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    table = _table(merges)
    (directory / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    encoder = {w: i for i, w in enumerate(table)}
    encoder[EOT_TEXT] = len(table)
    (directory / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    return directory
