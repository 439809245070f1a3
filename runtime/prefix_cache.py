"""Prefix caching: the K/V of prompt prefixes kept in blocks, so a prompt that starts like an earlier one prefills
only the rest (vLLM's automatic prefix caching; the serving side of Query-OPT's many questions over one context).

A block holds BLOCK tokens' K/V for every layer. It is keyed by the hash chain of the tokens up to its end, so a
block matches only when everything before it matches too. Keys are stored after rotary at their absolute
positions, which a prefix keeps, so a restored block is exactly what a prefill would have written. Blocks are
copied into and out of a cache row (numpy, host memory); the least recently used leave first when the cache
exceeds its byte budget. At least one prompt token is always left to prefill: its logits choose the first token.
"""

from __future__ import annotations

import collections
import hashlib
import threading

import numpy as np

BLOCK = 32  # tokens per block


def block_keys(ids: list[int], blocks: int) -> list[bytes]:
    """The hash chain of the first `blocks` full blocks of `ids`."""
    keys, digest = [], b""
    for b in range(blocks):
        digest = hashlib.blake2b(digest + np.asarray(ids[b * BLOCK : (b + 1) * BLOCK], np.int64).tobytes(),
                                 digest_size=16).digest()
        keys.append(digest)
    return keys


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.blocks: collections.OrderedDict[bytes, list[np.ndarray]] = collections.OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0  # tokens restored / prompt tokens that were not
        self.lock = threading.Lock()  # the engine writes, /metrics reads

    def restore(self, ids: list[int], row) -> int:
        """Copy the longest cached prefix of `ids` into the batch-1 cache `row` (positions 0..n); return n."""
        wanted = (len(ids) - 1) // BLOCK  # leave at least one token to prefill
        found = 0
        with self.lock, row.editing("prefix caching") as arrays:
            for key in block_keys(ids, wanted):
                block = self.blocks.get(key)
                if block is None:
                    break
                self.blocks.move_to_end(key)
                for a, saved in zip(arrays, block):  # (1, kv_heads, capacity, head_dim) <- (kv_heads, BLOCK, hd)
                    a[0, :, found : found + BLOCK] = saved
                found += BLOCK
            self.hits += found
            self.misses += len(ids) - found
        row.length = found
        return found

    def store(self, ids: list[int], row) -> None:
        """Keep the full blocks of `ids` that `row` (a batch-1 cache holding them at 0..) has and the cache lacks."""
        with self.lock, row.editing("prefix caching", write=False) as arrays:
            for b, key in enumerate(block_keys(ids, len(ids) // BLOCK)):
                if key in self.blocks:
                    self.blocks.move_to_end(key)
                    continue
                block = [a[0, :, b * BLOCK : (b + 1) * BLOCK].copy() for a in arrays]  # (kv_heads, BLOCK, hd)
                self.blocks[key] = block
                self.bytes += sum(x.nbytes for x in block)
            while self.bytes > self.max_bytes and self.blocks:
                _, old = self.blocks.popitem(last=False)
                self.bytes -= sum(x.nbytes for x in old)
