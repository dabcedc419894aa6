"""Automatic prefix caching: the KV of prompt blocks computed once, reused by later
prompts that start with the same tokens (a system prompt, a RAG context), LRU-bounded.

A prompt is cut into blocks of ``block`` tokens (the engine's prefill chunk). Block
``i`` is keyed by a SHA-256 chain over the tokens of blocks ``0 .. i``, so a key names
the whole prefix up to that block (the same tokens at another offset, or after other
tokens, never match: their keys and values differ). The values are the block's
per-layer ``[KV, block, D]`` keys and values on the device. A new prompt reuses its
longest run of cached leading blocks and prefills only the rest (``slots.put_block``,
then chunked prefill from there); its new full blocks are stored once it is prefilled.
Eviction is least-recently-used with a prompt's deeper blocks older than its first
ones (``touch``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


class PrefixCache:
    """At most ``capacity`` blocks of ``block`` tokens, least recently used evicted.

    Attributes:
      hit_tokens / lookup_tokens: prompt tokens served from the cache / looked up.
    """

    def __init__(self, block: int, capacity: int):
        self.block, self.capacity = block, capacity
        self._blocks: OrderedDict[bytes, tuple] = OrderedDict()
        self.hit_tokens = 0
        self.lookup_tokens = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self, ids: Sequence[int], blocks: int) -> list[bytes]:
        """Keys of the first ``blocks`` full blocks of ``ids``."""
        out, digest = [], b""
        for i in range(blocks):
            chunk = np.asarray(ids[i * self.block : (i + 1) * self.block], np.int64)
            digest = hashlib.sha256(digest + chunk.tobytes()).digest()
            out.append(digest)
        return out

    def lookup(self, keys: Sequence[bytes]) -> list[tuple]:
        """The values of the longest cached run of leading ``keys``."""
        hits = []
        for key in keys:
            value = self._blocks.get(key)
            if value is None:
                break
            hits.append(value)
        self.touch(keys[: len(hits)])
        self.hit_tokens += len(hits) * self.block
        self.lookup_tokens += len(keys) * self.block
        return hits

    def touch(self, keys: Sequence[bytes]) -> None:
        """Mark a prompt's blocks used, its first block most recently: eviction then
        takes the deepest blocks of a prefix first, so a shared beginning (the system
        prompt) outlives the different continuations cached after it."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def store(self, key: bytes, value: tuple) -> None:
        self._blocks[key] = value
        self._blocks.move_to_end(key)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
