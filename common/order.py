"""The order in which an async run visits a shard's sequences, and the rows it hands out.

The coordinator's ledger leases token positions of a shard; coordinator and workers both map a
position to a sequence slot through ``sequence_order`` (a pure function, never sent on the wire).
``order_rows`` is what the coordinator sends before a worker holds the whole shard;
``gather_sequences`` is what a worker trains from once it does.
"""

from __future__ import annotations

import zlib

import numpy as np


def sequence_order(shard: str, shard_tokens: int, block_size: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an async run visits one shard's sequences in one epoch.

    A shard of n tokens holds S = (n - 1) // block_size sequence slots (slot s: inputs
    tokens[s*T : s*T + T], targets shifted by one). The ledger leases *positions* p (token offsets,
    multiples of T, in [0, S*T)); position p trains slot order[p // T]. The permutation is a pure
    function of (shard name, size, block size, seed, epoch), so coordinator and workers agree on it
    without sending it, and every slot is visited exactly once per epoch while each batch mixes
    sequences from all over the shard. Returns int64 (S,).
    """
    slots = (shard_tokens - 1) // block_size
    mix = (seed * 1_000_003 + epoch * 7919 + zlib.crc32(shard.encode())) % (2**63)
    return np.random.default_rng(mix).permutation(slots).astype(np.int64)


MAX_SEQUENCES_PER_REQUEST = 1 << 20


def order_rows(tokens: np.ndarray, order: np.ndarray, first: int, count: int, block_size: int) -> np.ndarray:
    """Entries first .. first+count-1 of a shard's visiting order as rows of block_size + 1 tokens
    (inputs plus the last target), in the shard's dtype: (count, T + 1). What a worker trains from
    before it has the whole shard (ShardRequest.sequences). ValueError for a range outside the order."""
    if count <= 0 or count > MAX_SEQUENCES_PER_REQUEST:
        raise ValueError(f"sequences must be in 1..{MAX_SEQUENCES_PER_REQUEST}, got {count}")
    if first < 0 or first + count > len(order):
        raise ValueError(f"slots {first}..{first + count} are outside the shard's {len(order)} sequences")
    slots = order[first : first + count]
    return np.asarray(tokens[slots[:, None] * block_size + np.arange(block_size + 1)[None, :]])


def gather_sequences(tokens: np.ndarray, slots: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of the given slots: two int64 arrays (len(slots), block_size)."""
    index = slots[:, None] * block_size + np.arange(block_size + 1)[None, :]  # (n, T + 1)
    rows = np.asarray(tokens[index], dtype=np.int64)
    return rows[:, :-1], rows[:, 1:]
