"""Token data, by concern (this module re-exports their public names):

* common/shards.py   shard files and manifest.json (the on-disk format)
* common/prepare.py  text files / directories / .jsonl -> shards (``geotrain prepare``)
* common/nanogpt.py  nanoGPT ``train.bin``/``val.bin`` import
* common/corpus.py   the embedded default corpus, the data cache, ``resolve_data_dir``
* common/reader.py   ``TokenData``: memory-mapped shards and deterministic batches
* common/order.py    the order an async run visits a shard's sequences in
"""

from geotrain.common.corpus import (
    DEFAULT_CORPUS_BYTES,
    cache_root,
    default_corpus_files,
    default_data_dir,
    resolve_data_dir,
)
from geotrain.common.nanogpt import import_nanogpt
from geotrain.common.order import MAX_SEQUENCES_PER_REQUEST, gather_sequences, order_rows, sequence_order
from geotrain.common.prepare import prepare
from geotrain.common.reader import TokenData
from geotrain.common.shards import (
    DEFAULT_SHARD_TOKENS,
    HEADER_BYTES,
    MANIFEST_NAME,
    SHARD_MAGIC,
    SHARD_VERSION,
    Manifest,
    ShardInfo,
    dtype_for_vocab,
    read_shard,
    shard_sha256,
    write_shard,
)

__all__ = [
    "DEFAULT_CORPUS_BYTES", "DEFAULT_SHARD_TOKENS", "HEADER_BYTES", "MANIFEST_NAME", "MAX_SEQUENCES_PER_REQUEST",
    "SHARD_MAGIC", "SHARD_VERSION", "Manifest", "ShardInfo", "TokenData", "cache_root", "default_corpus_files",
    "default_data_dir", "dtype_for_vocab", "gather_sequences", "import_nanogpt", "order_rows", "prepare",
    "read_shard", "resolve_data_dir", "sequence_order", "shard_sha256", "write_shard",
]
