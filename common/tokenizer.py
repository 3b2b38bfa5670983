"""Tokenizers for geotrain's token shards.

* ``byte``: the 256 byte values of the UTF-8 text plus an end-of-text id 256 (vocab 257). No
  dependency, nothing to train, works on any text.
* ``bpe``: a byte-level BPE trained offline with Hugging Face ``tokenizers``
  (``ByteLevelBPETokenizer.train_from_iterator``) and saved next to the shards as
  ``tokenizer.json``. ``tokenizers`` is imported lazily (``pip install geotrain[bpe]``).
* ``char``: the character table of a nanoGPT ``meta.pkl`` (``stoi``/``itos``), only for
  imported nanoGPT data; it has no end-of-text id (``eot_id == -1``).
* ``gpt2``: GPT-2's byte-level BPE through ``tiktoken`` (256 byte tokens and 50,000 merges, ranks
  0..50,255, then ``<|endoftext|>`` = 50,256: vocab 50,257). The rank table comes from
  tiktoken's cache (``TIKTOKEN_CACHE_DIR``), from GPT-2's ``vocab.bpe``/``encoder.json`` or from
  a ``.tiktoken`` file the user names; nothing is downloaded.
  ``prepare`` saves it next to the shards as ``gpt2.tiktoken`` (so sampling and evaluation need
  nothing else) and records its sha256 in the spec. ``GPT2Tokenizer`` wraps any
  ``tiktoken.Encoding`` that has an ``<|endoftext|>`` special token and GPT-2's split pattern.
* ``external``: token ids imported from elsewhere with no known tokenizer; encode/decode fail.

``encode`` never produces the end-of-text id from text: the literal string ``<|endoftext|>`` in a
document is encoded as ordinary text, so documents cannot forge separators. ``decode`` renders the
end-of-text id as ``<|endoftext|>`` and replaces invalid UTF-8 with U+FFFD.

A tokenizer is described by ``spec()`` (JSON-able, stored in ``manifest.json["tokenizer"]``) and
rebuilt by ``load_tokenizer(spec, data_dir)``, which refuses rank tables that differ from the spec's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from geotrain.common.fsutil import file_sha256

EOT_TEXT = "<|endoftext|>"
BPE_FILE = "tokenizer.json"
MIN_BPE_VOCAB = 257  # the 256 byte symbols plus end-of-text
GPT2_FILE = "gpt2.tiktoken"  # saved next to the shards by prepare: "base64(token) rank" per line
GPT2_VOCAB_SIZE = 50257
# GPT-2's pre-tokenizer split (tiktoken's r50k_base / gpt2 pattern).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# The files tiktoken.get_encoding("gpt2") caches (as sha1(url) in its cache dir), with their sha256.
GPT2_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


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
            "sha256": file_sha256(self.path),
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


# --------------------------------------------------------------------------- gpt2 (tiktoken)


def _import_tiktoken():
    try:
        import tiktoken
    except ImportError as exc:  # pragma: no cover - tiktoken is a core dependency
        raise ValueError("the gpt2 tokenizer needs tiktoken: pip install tiktoken") from exc
    return tiktoken


def tiktoken_cache_dir() -> Path:
    """Where tiktoken caches downloaded files: TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR, else
    ``$TMPDIR/data-gym-cache`` (tiktoken's own rule)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _missing_gpt2_message(where: str) -> str:
    return (
        f"GPT-2 BPE files not found ({where}); fetch them once on a machine with internet: "
        f"`python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` with the same TIKTOKEN_CACHE_DIR, "
        f"or download vocab.bpe and encoder.json from {GPT2_BASE_URL} into DIR and pass "
        f"`geotrain prepare --tokenizer-file DIR`"
    )


def _data_gym_ranks(vocab_bpe: bytes, encoder_json: bytes, where: str) -> dict[bytes, int]:
    """GPT-2's merges (vocab.bpe) -> tiktoken mergeable ranks, checked against encoder.json.

    Data-gym files spell each byte as a printable character: printable non-space bytes as
    themselves, the other 68 bytes as chr(256 + n) in byte order. Ranks: the 256 bytes in that
    order, then one rank per merge line.
    """
    order = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    char_to_byte = {chr(b): b for b in order}
    n = 0
    for b in range(256):
        if b not in char_to_byte.values():
            order.append(b)
            char_to_byte[chr(256 + n)] = b
            n += 1

    def to_bytes(word: str) -> bytes:
        try:
            return bytes(char_to_byte[c] for c in word)
        except KeyError as exc:
            raise ValueError(f"{where}: character {exc.args[0]!r} is not a data-gym byte") from None

    try:
        lines = vocab_bpe.decode("utf-8").split("\n")
        encoder = json.loads(encoder_json)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: not GPT-2 BPE files ({exc})") from None
    ranks = {bytes([b]): i for i, b in enumerate(order)}
    for line in lines[1:]:  # the first line is a version comment
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{where}: vocab.bpe line {line!r} is not a merge of two tokens")
        ranks.setdefault(to_bytes(parts[0]) + to_bytes(parts[1]), len(ranks))
    if not isinstance(encoder, dict):
        raise ValueError(f"{where}: encoder.json must be an object")
    want = {to_bytes(k): v for k, v in encoder.items() if k not in (EOT_TEXT, "<|startoftext|>")}
    if want != ranks:
        raise ValueError(f"{where}: encoder.json does not match vocab.bpe (different ranks)")
    return ranks


def _tiktoken_file_ranks(data: bytes, where: str) -> dict[bytes, int]:
    """A ``.tiktoken`` rank file ("base64(token) rank" per line) -> mergeable ranks."""
    ranks: dict[bytes, int] = {}
    try:
        for line in data.splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError as exc:
        raise ValueError(f"{where}: not a .tiktoken rank file ({exc})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{where}: ranks must be 0..{len(ranks) - 1} without gaps")
    return ranks


def _read_gpt2_ranks(path: Path | str | None) -> dict[bytes, int]:
    """The rank table from ``path`` (a .tiktoken file, a vocab.bpe with encoder.json beside it, or a
    directory holding either) or, with None, from tiktoken's cache. ValueError names what is missing."""
    if path is None:
        cache = tiktoken_cache_dir()
        blobs = {}
        for name, sha in GPT2_FILES.items():
            f = cache / hashlib.sha1((GPT2_BASE_URL + name).encode()).hexdigest()
            if not f.is_file():
                raise ValueError(_missing_gpt2_message(f"tiktoken cache {cache} has no {name}"))
            blobs[name] = f.read_bytes()
            if hashlib.sha256(blobs[name]).hexdigest() != sha:
                raise ValueError(
                    f"{f}: the cached GPT-2 {name} is corrupt (sha256 mismatch); delete it and fetch it again"
                )
        return _data_gym_ranks(blobs["vocab.bpe"], blobs["encoder.json"], f"tiktoken cache {cache}")
    p = Path(path)
    if p.is_dir():
        if (p / GPT2_FILE).is_file():
            p = p / GPT2_FILE
        elif (p / "vocab.bpe").is_file():
            p = p / "vocab.bpe"
        else:
            raise ValueError(_missing_gpt2_message(f"{p} holds neither {GPT2_FILE} nor vocab.bpe"))
    if not p.is_file():
        raise ValueError(_missing_gpt2_message(f"{p} does not exist"))
    if p.name == "vocab.bpe":
        enc = p.with_name("encoder.json")
        if not enc.is_file():
            raise ValueError(_missing_gpt2_message(f"{enc} is missing beside {p.name}"))
        return _data_gym_ranks(p.read_bytes(), enc.read_bytes(), str(p.parent))
    return _tiktoken_file_ranks(p.read_bytes(), str(p))


def gpt2_encoding(path: Path | str | None = None):
    """A ``tiktoken.Encoding`` of GPT-2's BPE (``path``: see ``_read_gpt2_ranks``; None: the cache).

    The end-of-text token follows the merges (50,256 for GPT-2). Never touches the network.
    """
    tiktoken = _import_tiktoken()
    ranks = _read_gpt2_ranks(path)
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks, special_tokens={EOT_TEXT: len(ranks)})


def load_gpt2_tokenizer(path: Path | str | None = None) -> "GPT2Tokenizer":
    """GPT-2's tokenizer from ``path`` or tiktoken's cache (for prepare, HF export, evaluation)."""
    return GPT2Tokenizer(gpt2_encoding(path))


class GPT2Tokenizer(Tokenizer):
    """A ``tiktoken.Encoding`` with an ``<|endoftext|>`` special token, as geotrain's ``gpt2``.

    ``encoding.n_vocab`` ids (50,257 for GPT-2); ``eot_id`` is the special token's id. The spec holds
    the sha256 of the rank table in ``.tiktoken`` form (``ranks_text``), which identifies the BPE.
    """

    name = "gpt2"

    def __init__(self, encoding: Any):
        tiktoken = _import_tiktoken()
        if not isinstance(encoding, tiktoken.Encoding):
            raise ValueError(f"GPT2Tokenizer needs a tiktoken.Encoding, got {type(encoding).__name__}")
        if EOT_TEXT not in encoding.special_tokens_set:
            raise ValueError(f"tiktoken encoding {encoding.name!r} has no {EOT_TEXT} special token")
        self.encoding = encoding
        self.eot_id = int(encoding.eot_token)
        self.vocab_size = int(encoding.n_vocab)
        self._sha256: str | None = None

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        # allowed_special empty and no disallowed check: "<|endoftext|>" in text is ordinary text
        return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=()).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the gpt2 vocabulary (0..{self.vocab_size - 1})")
        return self.encoding.decode(ids, errors="replace")

    def ranks_text(self) -> bytes:
        """The mergeable ranks as a ``.tiktoken`` file: "base64(token) rank" lines in rank order."""
        enc = self.encoding
        pairs = sorted((enc.encode_single_token(b), b) for b in enc.token_byte_values())
        return b"".join(base64.b64encode(b) + b" " + str(r).encode() + b"\n" for r, b in pairs)

    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.ranks_text()).hexdigest()
        return self._sha256

    def save(self, data_dir: Path | str) -> Path:
        """Write ``data_dir/gpt2.tiktoken`` atomically (what ``load_tokenizer`` reads back)."""
        path = Path(data_dir) / GPT2_FILE
        tmp = path.with_name(f".{GPT2_FILE}.tmp-{os.getpid()}")
        tmp.write_bytes(self.ranks_text())
        tmp.replace(path)
        return path

    def spec(self) -> dict[str, Any]:
        return {"name": "gpt2", "vocab_size": self.vocab_size, "eot_id": self.eot_id, "file": GPT2_FILE,
                "sha256": self.sha256()}


def _load_gpt2(spec: dict, data_dir: Path | str | None, tokenizer_file: Path | str | None) -> GPT2Tokenizer:
    """The spec's gpt2 tokenizer: from ``tokenizer_file``, else the data dir's gpt2.tiktoken, else
    tiktoken's cache; ValueError when its ranks differ from the spec's (another vocabulary)."""
    source = tokenizer_file
    if source is None and data_dir is not None and (Path(data_dir) / spec.get("file", GPT2_FILE)).is_file():
        source = Path(data_dir) / spec.get("file", GPT2_FILE)
    tok = load_gpt2_tokenizer(source)
    where = source if source is not None else f"tiktoken cache {tiktoken_cache_dir()}"
    want_vocab, want_sha = spec.get("vocab_size"), spec.get("sha256")
    if (want_vocab is not None and want_vocab != tok.vocab_size) or (want_sha and want_sha != tok.sha256()):
        raise ValueError(
            f"the gpt2 tokenizer from {where} (vocab {tok.vocab_size}, ranks sha256 {tok.sha256()[:12]}) "
            f"is not the one this data/checkpoint was tokenized with (vocab {want_vocab}, ranks sha256 "
            f"{str(want_sha)[:12]})"
        )
    return tok


def load_tokenizer(
    spec: dict, data_dir: Path | str | None = None, tokenizer_file: Path | str | None = None
) -> Tokenizer:
    """Rebuild a tokenizer from its ``spec()``; ``bpe`` needs ``data_dir`` (where tokenizer.json is).

    ``gpt2`` reads ``tokenizer_file`` if given, else ``data_dir/gpt2.tiktoken``, else tiktoken's cache.
    """
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
        if want and file_sha256(path) != want:
            raise ValueError(f"{path}: sha256 does not match the manifest's tokenizer spec")
        return tok
    if name == "char":
        return CharTokenizer(spec["itos"])
    if name == "gpt2":
        return _load_gpt2(spec, data_dir, tokenizer_file)
    if name == "external":
        return ExternalTokenizer(spec["vocab_size"], spec.get("note", ""))
    raise ValueError(f"unknown tokenizer {name!r}; known: byte, bpe, gpt2, char, external")
