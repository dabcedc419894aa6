"""Array layout and grid order of the flash attention kernels, per compilation target.

The kernels themselves (``flash_attention.py``) are written once; this is what differs
between Triton (GPU) and Mosaic (TPU): where the heads axis sits, the grid order, and
which K/V head a query head's block reads under grouped-query attention.
"""

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class Layout:
    """Array layout and grid order of the kernels for one compilation target.

    ``gpu`` keeps the model's ``[batch, length, heads, head_dim]``: Triton indexes any
    strides, and the grid is ``(blocks, batch, heads)`` so CUDA's fastest-launched axis
    walks the blocks of one (batch, head) and neighbouring CTAs share its K/V in L2.
    ``tpu`` transposes to ``[batch, heads, length, head_dim]`` because the two minor
    dims of a Mosaic block must be (8, 128)-aligned or whole, which a squeezed heads
    axis is not; its grid and block specs are ``flash_stream``'s, which streams both
    sides through the grid instead of holding a whole-sequence slab in VMEM.

    Under causality the blocks are walked last-first, so the longest rows start first.
    """

    target: str  # "gpu" or "tpu"
    reverse: bool = False
    groups: int = 1  # query heads per K/V head (grouped-query attention)

    def to_kernel(self, x):  # [b, l, h, d] <-> kernel layout (a swap: its own inverse)
        return x if self.target == "gpu" else jnp.swapaxes(x, 1, 2)

    # grid/split/block_id/spec: the Triton (and interpreter) schedule's; Mosaic's are
    # flash_stream's.
    def grid(self, batch, heads, blocks):
        return (blocks, batch, heads)

    def split(self, ids, blocks):
        """Grid indices (or program ids) -> (batch, head, block)."""
        b, h, i = ids[1], ids[2], ids[0]
        return b, h, (blocks - 1 - i if self.reverse else i)

    def block_id(self, blocks):
        return self.split([pl.program_id(a) for a in range(3)], blocks)[2]

    def spec(self, kind, rows, blocks, dp=None, tiled=True):
        """BlockSpec for one operand; ``tiled`` follows the grid's block, else a whole slab.

        kinds: "seq" q/o/grads, "kv" k/v (query head ``h`` reads K/V head
        ``h // groups``: grouped heads share one K/V, never repeated in memory), "stat"
        [b, h, l, 1] lse/delta, "qseg" [b, l, 1], "kvseg" [b, 1, l] (segment ids as a
        column and as a row, so the kernels compare them by broadcasting without a
        transpose).
        """
        seq = (None, rows, None, dp)
        shapes = {
            "seq": seq,
            "kv": seq,
            "stat": (None, None, rows, 1),
            "qseg": (None, rows, 1),
            "kvseg": (None, 1, rows),
        }

        def index_map(*ids):
            b, h, i = self.split(ids, blocks)
            i = i if tiled else 0
            kv_h = h if self.groups == 1 else h // self.groups  # MHA: the index map as before
            return {
                "seq": (b, i, h, 0),
                "kv": (b, i, kv_h, 0),
                "stat": (b, h, i, 0),
                "qseg": (b, i, 0),
                "kvseg": (b, 0, i),
            }[kind]

        return pl.BlockSpec(shapes[kind], index_map)
