"""Pages of a paged KV cache: which pool pages each decode slot owns (host side).

A paged cache (``kernels.paged_attention``) keeps keys and values in a pool of
``num_pages`` pages of ``page_size`` tokens shared by every slot; each slot has a row of
the page table naming its pages in order. ``PagePool`` hands out pages when a request is
admitted and takes them back when it ends. A request reserves the pages for its prompt
plus ``max_tokens`` up front, so it can never run out mid-generation (no preemption
needed; vLLM instead allocates on demand and preempts when the pool runs dry).

Memory per page: ``2 (k, v) x layers x page_size x hidden x bytes``, the contiguous
cache's cost per token times ``page_size``; the pool replaces ``slots x max_len`` tokens
by ``num_pages x page_size``.
"""

from __future__ import annotations

import math

import numpy as np

from neox_jax.errors import UserError


class PagePool:
    """Allocates pages of a shared KV pool to slots.

    Args:
      num_pages: pages in the pool.
      page_size: tokens per page.
      num_slots: rows of the page table (sequences decoded at once).
      max_len: most tokens one sequence may hold; the table has
        ``ceil(max_len / page_size)`` columns.
      first_page: the lowest page id handed out (ids below it are kept back, e.g. the
        engine's scratch page 0).
    """

    def __init__(
        self, num_pages: int, page_size: int, num_slots: int, max_len: int, first_page: int = 0
    ):
        if min(num_pages, page_size, num_slots, max_len) < 1:
            raise UserError(
                "num_pages, page_size, num_slots and max_len must all be >= 1, got "
                f"{num_pages}, {page_size}, {num_slots}, {max_len}."
            )
        self.page_size, self.num_slots = page_size, num_slots
        self.pages_per_slot = math.ceil(max_len / page_size)
        self.max_len = max_len
        # A stack: low ids first.
        self._free = list(range(first_page + num_pages - 1, first_page - 1, -1))
        self.num_pages = num_pages
        self.owned: list[list[int]] = [[] for _ in range(num_slots)]

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def fits(self, tokens: int) -> bool:
        """Whether a sequence of ``tokens`` could be admitted now (pages and a slot)."""
        free_slot = any(not p for p in self.owned)
        return free_slot and tokens <= self.max_len and self.pages_for(tokens) <= self.free_pages

    def allocate(self, slot: int, tokens: int) -> list[int]:
        """Give the empty ``slot`` the pages for ``tokens`` tokens; returns their ids."""
        if self.owned[slot]:
            raise ValueError(f"slot {slot} still owns pages; release it first.")
        if tokens > self.max_len:
            raise UserError(f"{tokens} tokens exceed max_len={self.max_len}.")
        need = self.pages_for(tokens)
        if need > self.free_pages:
            raise ValueError(f"{need} pages needed, {self.free_pages} free.")
        self.owned[slot] = [self._free.pop() for _ in range(need)]
        return list(self.owned[slot])

    def release(self, slot: int) -> None:
        """Return ``slot``'s pages to the pool."""
        self._free.extend(reversed(self.owned[slot]))
        self.owned[slot] = []

    def table(self) -> np.ndarray:
        """The ``[num_slots, pages_per_slot]`` int32 page table (unused entries 0: the
        kernel never reads past a sequence's length; the engine's scratch page)."""
        out = np.zeros((self.num_slots, self.pages_per_slot), np.int32)
        for slot, pages in enumerate(self.owned):
            out[slot, : len(pages)] = pages
        return out


def kv_bytes_per_token(num_layers: int, hidden_size: int, bytes_per_value: int) -> int:
    """KV-cache bytes one token costs: keys and values of every layer."""
    return 2 * num_layers * hidden_size * bytes_per_value


__all__ = ["PagePool", "kv_bytes_per_token"]
