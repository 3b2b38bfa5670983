"""Throughput of `prepare` (text -> shards) per tokenizer and number of encoding processes.

    .venv/bin/python benchmarks/bench_prepare.py                                  # byte + a gpt2-sized stand-in
    .venv/bin/python benchmarks/bench_prepare.py --tokenizer-file ~/gpt2          # GPT-2's own vocab.bpe/encoder.json
    .venv/bin/python benchmarks/bench_prepare.py --max-bytes 2000000 --workers 1  # quick run

Input: the embedded default corpus (the standard library's .py files, --max-bytes of them). Rows:
tokenizer, encoding processes, input MB, tokens, wall seconds of the whole `prepare` (spawning,
encoding, shard writing, sha256), CPU seconds of this process and its encoder processes (the fairer
figure when other jobs share the machine; the load average is printed), input MB/s and tokens/s
of wall time; the best of --repeat runs.

The gpt2 rows use GPT-2's rank table from --tokenizer-file or tiktoken's cache when either holds
it. Without them (no internet) the rows use a stand-in of the same size: a byte-level BPE of
--stand-in-vocab tokens trained on the corpus with Hugging Face `tokenizers`, converted to a
.tiktoken rank file and run through the same GPT2Tokenizer (GPT-2's split pattern and
end-of-text); the table says which one ran.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geotrain.common.corpus import default_corpus_files  # noqa: E402
from geotrain.common.prepare import prepare  # noqa: E402
from geotrain.common.tokenizer import EOT_TEXT, GPT2Tokenizer, gpt2_encoding, load_gpt2_tokenizer  # noqa: E402


def stand_in_tiktoken(files: list[Path], vocab: int, dest: Path) -> Path:
    """Train a byte-level BPE of ``vocab`` tokens on ``files``; write it as a .tiktoken rank file."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.pre_tokenizers import ByteLevel

    tok = ByteLevelBPETokenizer()
    tok.train([str(p) for p in files], vocab_size=vocab, min_frequency=1, show_progress=False,
              special_tokens=[EOT_TEXT])
    # the byte-level alphabet: HF uses GPT-2's byte -> printable character map
    alphabet = ByteLevel.alphabet()
    chars = sorted(alphabet, key=ord)
    byte_of = {}
    order = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    n = 0
    for b in range(256):
        if b in order:
            byte_of[chr(b)] = b
        else:
            byte_of[chr(256 + n)] = b
            n += 1
    assert set(byte_of) == set(chars)
    ids = sorted((i, t) for t, i in tok.get_vocab().items() if t != EOT_TEXT)
    lines = [base64.b64encode(bytes(byte_of[c] for c in t)) + b" " + str(rank).encode()
             for rank, (_, t) in enumerate(ids)]
    dest.write_bytes(b"\n".join(lines) + b"\n")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-bytes", type=int, default=8 << 20, help="Corpus size (default 8 MiB).")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Encoding processes to try.")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tokenizer-file", type=Path, default=None, help="GPT-2's rank files (default: tiktoken's cache).")
    ap.add_argument("--stand-in-vocab", type=int, default=50257)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "prepare.json")
    args = ap.parse_args()

    files = default_corpus_files(args.max_bytes)
    mb = sum(p.stat().st_size for p in files) / 1e6
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        try:
            gpt2 = GPT2Tokenizer(gpt2_encoding(args.tokenizer_file))
            gpt2_kind = "gpt2 (GPT-2's ranks)"
        except ValueError as exc:
            print(f"GPT-2's files are not here ({str(exc)[:60]}...): using a stand-in", file=sys.stderr)
            t0 = time.monotonic()
            path = stand_in_tiktoken(files, args.stand_in_vocab, tmp / "stand_in.tiktoken")
            gpt2 = load_gpt2_tokenizer(path)
            gpt2_kind = f"gpt2 stand-in ({gpt2.vocab_size}-token BPE, trained in {time.monotonic() - t0:.0f} s)"
        rows = []
        for name, tok in (("byte", "byte"), (gpt2_kind, gpt2)):
            for workers in args.workers:
                best = cpu = None
                for _ in range(args.repeat):
                    out = tmp / "out"
                    c0 = time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
                    t0 = time.monotonic()
                    m = prepare(files, out, tokenizer=tok, workers=workers, progress=False)
                    dt = time.monotonic() - t0
                    dc = time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - c0
                    shutil.rmtree(out)
                    best = dt if best is None else min(best, dt)
                    cpu = dc if cpu is None else min(cpu, dc)
                tokens = sum(s.tokens for s in m.shards)
                rows.append(dict(tokenizer=name, workers=workers, input_mb=round(mb, 2), tokens=tokens,
                                 seconds=round(best, 3), cpu_seconds=round(cpu, 3), mb_per_s=round(mb / best, 2),
                                 tokens_per_s=round(tokens / best)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"prepare: {len(files)} files, {mb:.2f} MB of text, {os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"{'tokenizer':<52} {'procs':>5} {'tokens':>11} {'seconds':>8} {'cpu s':>7} {'MB/s':>7} {'tokens/s':>11}")
    for r in rows:
        print(f"{r['tokenizer']:<52} {r['workers']:>5} {r['tokens']:>11,} {r['seconds']:>8.2f} {r['cpu_seconds']:>7.2f} "
              f"{r['mb_per_s']:>7.2f} {r['tokens_per_s']:>11,}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "files": len(files), "input_mb": mb, "load_average": load,
                                     "cpus": os.cpu_count()}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
