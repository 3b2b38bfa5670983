"""Tokenizers for geotrain's token shards.

* ``byte``: the 256 byte values of the UTF-8 text plus an end-of-text id 256 (vocab 257). No
  dependency, nothing to train, works on any text.
* ``bpe``: a byte-level BPE trained offline with Hugging Face ``tokenizers``
  (``ByteLevelBPETokenizer.train_from_iterator``) and saved next to the shards as
  ``tokenizer.json``. ``tokenizers`` is imported lazily (``pip install geotrain[bpe]``).
* ``char``: the character table of a nanoGPT ``meta.pkl`` (``stoi``/``itos``), only for
  imported nanoGPT data; it has no end-of-text id (``eot_id == -1``).
* ``external``: token ids imported from elsewhere with no known tokenizer; encode/decode fail.

``encode`` never produces the end-of-text id from text: the literal string ``<|endoftext|>`` in a
document is encoded as ordinary text, so documents cannot forge separators. ``decode`` renders the
end-of-text id as ``<|endoftext|>`` and replaces invalid UTF-8 with U+FFFD.

A tokenizer is described by ``spec()`` (JSON-able, stored in ``manifest.json["tokenizer"]``) and
rebuilt by ``load_tokenizer(spec, data_dir)``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

EOT_TEXT = "<|endoftext|>"
BPE_FILE = "tokenizer.json"
MIN_BPE_VOCAB = 257  # the 256 byte symbols plus end-of-text


class Tokenizer:
    """Base class: ``name``, ``vocab_size``, ``eot_id``, ``encode``, ``decode``, ``spec``."""

    name: str = ""
    vocab_size: int = 0
    eot_id: int = -1

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        """Like ``encode`` but as a 1-D int64 array (subclasses may do it faster)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, end-of-text 256."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
            elif i == self.eot_id:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                out.append(EOT_TEXT)
            else:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary (0..256)")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def spec(self) -> dict[str, Any]:
        return {"name": "byte", "vocab_size": self.vocab_size, "eot_id": self.eot_id}


def _import_tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError(
            "the bpe tokenizer needs Hugging Face 'tokenizers': pip install 'geotrain[bpe]' "
            "(or use --tokenizer byte)"
        ) from exc
    return tokenizers


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class BPETokenizer(Tokenizer):
    """Byte-level BPE from a ``tokenizer.json`` written by ``train_bpe``."""

    name = "bpe"

    def __init__(self, path: Path | str):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"bpe tokenizer file {path} is missing")
        tokenizers = _import_tokenizers()
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception type
            raise ValueError(f"cannot load bpe tokenizer {path}: {exc}") from exc
        # Treat a literal "<|endoftext|>" inside a document as text, not as the separator.
        self._tok.encode_special_tokens = True
        eot = self._tok.token_to_id(EOT_TEXT)
        if eot is None:
            raise ValueError(f"bpe tokenizer {path} has no {EOT_TEXT} token")
        self.path = path
        self.eot_id = int(eot)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the bpe vocabulary (0..{self.vocab_size - 1})")
        return self._tok.decode(ids, skip_special_tokens=False)

    def spec(self) -> dict[str, Any]:
        return {
            "name": "bpe",
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "file": self.path.name,
            "sha256": _file_sha256(self.path),
        }


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: Path | str) -> BPETokenizer:
    """Train a byte-level BPE offline on ``texts`` and save it to ``out_path`` (tokenizer.json).

    The trained vocabulary may be smaller than ``vocab_size`` on a small corpus.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
        raise ValueError(
            f"bpe vocab size must be at least {MIN_BPE_VOCAB} (256 bytes + end-of-text), got {vocab_size!r}"
        )
    if vocab_size > 2**32:
        raise ValueError(f"vocab size {vocab_size} does not fit uint32 token ids (max 2**32)")
    _import_tokenizers()
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[EOT_TEXT]
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(out_path)
    return BPETokenizer(out_path)


class CharTokenizer(Tokenizer):
    """nanoGPT's character-level table (``meta.pkl``: ``itos``). No end-of-text id."""

    name = "char"

    def __init__(self, itos: Sequence[str]):
        self.itos = [str(c) for c in itos]
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.eot_id = -1

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the char vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return "".join(self.itos[int(i)] for i in ids)
        except IndexError:
            raise ValueError(f"token id outside the char vocabulary (0..{self.vocab_size - 1})") from None

    def spec(self) -> dict[str, Any]:
        return {"name": "char", "vocab_size": self.vocab_size, "eot_id": -1, "itos": self.itos}


class ExternalTokenizer(Tokenizer):
    """Token ids imported without a tokenizer (e.g. nanoGPT bins with no meta.pkl)."""

    name = "external"

    def __init__(self, vocab_size: int, note: str = ""):
        self.vocab_size = int(vocab_size)
        self.eot_id = -1
        self.note = note

    def _refuse(self):
        raise ValueError(
            "this data has no known tokenizer (imported token ids"
            + (f": {self.note}" if self.note else "")
            + "); encode/decode are unavailable"
        )

    def encode(self, text: str) -> list[int]:
        self._refuse()
        return []

    def decode(self, ids: Sequence[int]) -> str:
        self._refuse()
        return ""

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": "external", "vocab_size": self.vocab_size, "eot_id": -1}
        if self.note:
            out["note"] = self.note
        return out


def load_tokenizer(spec: dict, data_dir: Path | str | None = None) -> Tokenizer:
    """Rebuild a tokenizer from its ``spec()``; ``bpe`` needs ``data_dir`` (where tokenizer.json is)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"tokenizer spec must be a dict with a 'name', got {spec!r}")
    name = spec["name"]
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        if data_dir is None:
            raise ValueError("the bpe tokenizer needs the data directory that holds tokenizer.json")
        path = Path(data_dir) / spec.get("file", BPE_FILE)
        tok = BPETokenizer(path)
        want = spec.get("sha256")
        if want and _file_sha256(path) != want:
            raise ValueError(f"{path}: sha256 does not match the manifest's tokenizer spec")
        return tok
    if name == "char":
        return CharTokenizer(spec["itos"])
    if name == "external":
        return ExternalTokenizer(spec["vocab_size"], spec.get("note", ""))
    raise ValueError(f"unknown tokenizer {name!r}; known: byte, bpe, char, external")
