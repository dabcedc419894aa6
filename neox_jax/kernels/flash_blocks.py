"""Block-level math of the flash attention kernels, shared by both kernel schedules.

One ``[block_q, block_k]`` tile of attention: its mask, the online-softmax update of the
forward pass and the two backward updates (FlashAttention-2, Dao 2023, arXiv
2307.08691), plus which tiles of a row are visible at all (causal and sliding-window
block skipping). ``flash_attention.py`` runs these tiles in a ``fori_loop`` over a
whole-sequence ref (Triton, the interpreter); ``flash_stream.py`` runs one tile per grid
step with the running statistics in VMEM scratch (Mosaic). Same math, same results.
"""

import functools

import jax.numpy as jnp
from jax import lax

from neox_jax.kernels.reference import MASK_VALUE


def _mm(a, b, contract):
    """fp32-accumulated 2-D matmul contracting a's and b's dims ``contract``."""
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


dot_nt = functools.partial(_mm, contract=((1,), (1,)))  # [m, d] x [n, d] -> [m, n]
dot_tn = functools.partial(_mm, contract=((0,), (0,)))  # [m, n] x [m, d] -> [n, d]
dot = functools.partial(_mm, contract=((1,), (0,)))  # [m, n] x [n, d] -> [m, d]


def block_mask(q_seg, kv_seg, q_start, k_start, shape, causal, window=None):
    """[block_q, block_k] bool (True = attend) or None when nothing is masked.

    Same rule as ``reference.make_attention_mask``: equal non-zero segment ids and,
    when causal, key slot <= query slot (and, with a sliding ``window``, key slot >
    query slot - window, as ``model.grouped.window_mask``). Padded slots carry segment id 0.
    """
    mask = None
    if q_seg is not None:
        mask = (q_seg == kv_seg) & (kv_seg != 0)  # [bq, 1] vs [1, bk]
    if causal:
        q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
        visible = q_pos >= k_pos
        if window is not None:
            visible &= k_pos > q_pos - window
        mask = visible if mask is None else mask & visible
    return mask


def fwd_update(q, k, v, carry, scale, mask_fn):
    """Online softmax over one key block: (m, row_sum, acc) [bq, 1], [bq, 1], [bq, dp] fp32.

    ``mask_fn()`` gives the block's mask (or None); it is called after the logits, so
    the kernels trace their ops in the order they always had (the Triton programs stay
    the same, op for op)."""
    m, row_sum, acc = carry
    s = dot_nt(q, k) * scale  # [bq, bk]
    mask = mask_fn()
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    if mask is not None:
        # Explicit zeros: a row whose keys are all masked keeps l == 0 (exp(0) would
        # count masked keys), so the caller can tell padding rows apart.
        p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp(m - m_new)
    row_sum = alpha * row_sum + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + dot(p.astype(v.dtype), v)
    return m_new, row_sum, acc


def fwd_init(bq, dp):
    """The forward's starting (m, row_sum, acc). m starts at the finite MASK_VALUE, not
    -inf, so alpha = exp(m - m_new) is never exp(-inf + inf) = NaN while a row has only
    seen masked keys."""
    return (
        jnp.full((bq, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
        jnp.zeros((bq, dp), jnp.float32),
    )


def fwd_store(o_ref, lse_ref, m, row_sum, acc):
    """Write the output and logsumexp. Fully masked rows (padding queries): output 0,
    lse = MASK_VALUE."""
    l_safe = jnp.where(row_sum == 0.0, 1.0, row_sum)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l_safe)


def _probs(q, k, lse, scale, mask_fn):
    """Recomputed probabilities [bq, bk] fp32 from the forward's logsumexp."""
    s = dot_nt(q, k) * scale
    p = jnp.exp(s - lse)
    mask = mask_fn()
    # where, not multiply: masked entries may be exp(+large) = inf.
    return p if mask is None else jnp.where(mask, p, 0.0)


def dq_update(dq, q, k, v, do, lse, delta, scale, mask_fn):
    """dq / scale [bq, dp] fp32 plus one key block's contribution."""
    p = _probs(q, k, lse, scale, mask_fn)
    ds = p * (dot_nt(do, v) - delta)  # [bq, bk]
    return dq + dot(ds.astype(k.dtype), k)


def dkv_update(carry, q, k, v, do, lse, delta_fn, scale, mask_fn):
    """(dk / scale, dv) [bk, dp] fp32 each plus one query block's contributions;
    ``delta_fn()`` reads the block's softmax-backward row term [bq, 1]."""
    dk, dv = carry
    p = _probs(q, k, lse, scale, mask_fn)
    dv = dv + dot_tn(p.astype(do.dtype), do)  # [bk, dp]
    ds = p * (dot_nt(do, v) - delta_fn())  # [bq, bk]
    dk = dk + dot_tn(ds.astype(q.dtype), q)
    return dk, dv


def visible_blocks(cfg, i, rows_block, cols_block, n_cols, rows_are_queries):
    """(lo, hi, plain_lo, plain_hi): the other side's blocks [lo, hi) hold a visible
    pair for row block ``i``; those in [plain_lo, plain_hi) need no causal mask. The
    rest lie wholly above the diagonal or outside the sliding window and are skipped."""
    if not cfg.causal:
        return 0, n_cols, 0, n_cols
    if cfg.window is not None:  # every visited block masked (window edge and diagonal)
        lo, hi = _window_range(i, rows_block, cols_block, n_cols, rows_are_queries, cfg.window)
        return lo, hi, 0, 0
    if rows_are_queries:
        full = lax.div(i * rows_block, cols_block)  # kv blocks with every key <= first query
        end = lax.div((i + 1) * rows_block + cols_block - 1, cols_block)
        return 0, jnp.minimum(end, n_cols), 0, full
    start = lax.div(i * rows_block, cols_block)  # first q block reaching this key block
    full = jnp.minimum(lax.div((i + 1) * rows_block + cols_block - 1, cols_block), n_cols)
    return start, n_cols, full, n_cols


def _window_range(i, rows_block, cols_block, n_cols, rows_are_queries, window):
    """[lo, hi): the other side's blocks that hold a visible pair under a sliding window
    (query q sees keys q - window < k <= q)."""
    if rows_are_queries:  # keys in (i * bq - window, (i + 1) * bq - 1]
        lo = lax.div(jnp.maximum(i * rows_block - window + 1, 0), cols_block)
        return lo, jnp.minimum(lax.div((i + 1) * rows_block - 1, cols_block) + 1, n_cols)
    lo = lax.div(i * rows_block, cols_block)  # queries in [j * bk, (j + 1) * bk + window - 2]
    return lo, jnp.minimum(lax.div((i + 1) * rows_block + window - 2, cols_block) + 1, n_cols)
