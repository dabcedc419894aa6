"""Paged KV cache: the Pallas paged decode kernel (interpreter) against plain attention
over the same keys kept contiguously, and the page allocator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.errors import UserError
from neox_jax.kernels.paged_attention import paged_attention, paged_attention_reference
from neox_jax.kernels.reference import attention
from neox_jax.serving.paged import PagePool, kv_bytes_per_token

PAGE, HEADS, DIM = 8, 4, 16


def _paged_case(lengths, num_pages=16, dtype=jnp.float32, seed=0):
    """Contiguous per-sequence k/v, and the same keys scattered over a shuffled pool."""
    rng = np.random.default_rng(seed)
    batch, pages = len(lengths), -(-max(lengths) // PAGE) or 1
    k = rng.normal(size=(batch, pages * PAGE, HEADS, DIM)).astype(np.float32)
    v = rng.normal(size=(batch, pages * PAGE, HEADS, DIM)).astype(np.float32)
    q = rng.normal(size=(batch, HEADS, DIM)).astype(np.float32)
    ids = rng.permutation(num_pages)[: batch * pages].reshape(batch, pages)
    k_pages = rng.normal(size=(num_pages, PAGE, HEADS, DIM)).astype(np.float32)  # junk
    v_pages = rng.normal(size=(num_pages, PAGE, HEADS, DIM)).astype(np.float32)
    for b in range(batch):
        for i in range(pages):
            k_pages[ids[b, i]] = k[b, i * PAGE : (i + 1) * PAGE]
            v_pages[ids[b, i]] = v[b, i * PAGE : (i + 1) * PAGE]
    lengths = np.array(lengths, np.int32)
    cast = lambda *a: [jnp.asarray(x, dtype) for x in a]  # noqa: E731
    return cast(q, k, v, k_pages, v_pages), jnp.asarray(ids, jnp.int32), jnp.asarray(lengths)


def _contiguous(q, k, v, lengths):
    """Plain attention of each sequence's query over its first ``length`` keys."""
    live = jnp.arange(k.shape[1])[None, :] < lengths[:, None]
    return attention(q[:, None], k, v, live[:, None, None, :])[:, 0]


def test_reference_equals_contiguous_attention():
    """Gathering pages is a permutation of the same keys: equal to fp32 round-off."""
    (q, k, v, kp, vp), table, lengths = _paged_case([5, 23, 16, 1])
    got = paged_attention_reference(q, kp, vp, table, lengths)
    np.testing.assert_allclose(got, _contiguous(q, k, v, lengths), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_pallas_kernel_equals_reference(dtype, tol):
    """Online softmax page by page reorders the fp32 sums: 1e-5 in fp32. In bf16 the
    inputs are the same bf16 values, both accumulate in fp32 and round the output to
    bf16 (8 bits of mantissa: 2e-2 covers one rounding step of O(1) values).
    Length 0 (an empty slot) gives zeros; lengths end mid-page and on a page edge."""
    (q, _, _, kp, vp), table, lengths = _paged_case([5, 23, 16, 0, 1], dtype=dtype)
    got = paged_attention(q, kp, vp, table, lengths, interpret=True)
    want = paged_attention_reference(q, kp, vp, table, lengths)
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
    )
    assert not np.asarray(got[3], np.float32).any()


def test_heads_major_pool_and_grouped_queries():
    """The serving pool's layout (``"phsd"``: ``[pages, kv_heads, page, dim]``) with 2 K/V
    heads for 4 query heads: the same as the reference on the same keys, and the
    reference equals plain attention with each K/V head repeated for its 2 query heads.
    fp32 round-off of the online softmax's reordered sums: 1e-5."""
    (q, k, v, kp, vp), table, lengths = _paged_case([5, 23, 0, 9])
    kp, vp, k, v = kp[:, :, :2], vp[:, :, :2], k[:, :, :2], v[:, :, :2]  # 2 K/V heads
    kp_h, vp_h = kp.swapaxes(1, 2), vp.swapaxes(1, 2)
    want = paged_attention_reference(q, kp_h, vp_h, table, lengths, layout="phsd")
    repeated = [jnp.repeat(t, 2, axis=2) for t in (k, v)]
    live = _contiguous(q, *repeated, lengths)
    np.testing.assert_allclose(want[lengths > 0], live[lengths > 0], rtol=1e-6, atol=1e-6)
    got = paged_attention(q, kp_h, vp_h, table, lengths, layout="phsd", interpret=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layout"):
        paged_attention(q, kp, vp, table, lengths, layout="bshd")


def test_kernel_lowers_to_triton_for_cuda():
    """Compiled (not interpreted) for a GPU, the kernel lowers to a Triton call on this
    CPU machine (nothing runs: no GPU here), in the serving pool's layout."""
    (q, _, _, kp, vp), table, lengths = _paged_case([5, 23])
    kp_h, vp_h = kp.swapaxes(1, 2), vp.swapaxes(1, 2)
    fn = jax.jit(lambda *a: paged_attention(*a, layout="phsd", interpret=False))
    text = fn.trace(q, kp_h, vp_h, table, lengths).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()


def test_kernel_reads_only_the_sequences_pages():
    """Poisoning every page a sequence does not own (and its own slots past its length)
    with NaN leaves its output unchanged: nothing else is read."""
    (q, _, _, kp, vp), table, lengths = _paged_case([11], num_pages=6)
    clean = paged_attention(q, kp, vp, table, lengths, interpret=True)
    own = np.asarray(table[0])
    poison = np.full(kp.shape, np.nan, np.float32)
    poison[own] = np.asarray(kp)[own]
    poison[own[-1], 11 - PAGE :] = np.nan  # rows 3.. of the second page: slots >= 11
    vpoison = np.where(np.isnan(poison), np.nan, np.asarray(vp))
    got = paged_attention(q, jnp.asarray(poison), jnp.asarray(vpoison), table, lengths)
    np.testing.assert_allclose(got, clean, rtol=1e-6, atol=1e-6)


def test_page_pool_hands_each_page_to_one_slot_and_takes_it_back():
    pool = PagePool(num_pages=10, page_size=4, num_slots=3, max_len=16)
    a = pool.allocate(0, 9)  # 3 pages
    b = pool.allocate(1, 16)  # 4 pages
    assert len(a) == 3 and len(b) == 4 and not set(a) & set(b)
    assert pool.free_pages == 3 and pool.fits(12) and not pool.fits(13)
    table = pool.table()
    assert table.shape == (3, 4) and list(table[0, :3]) == a and list(table[1]) == b
    with pytest.raises(ValueError, match="pages needed"):
        pool.allocate(2, 16)
    with pytest.raises(ValueError, match="release it first"):
        pool.allocate(0, 1)
    pool.release(1)
    assert pool.free_pages == 7
    c = pool.allocate(2, 16)
    assert not set(c) & set(a)
    pool.release(0)
    pool.release(2)
    assert pool.free_pages == 10 and sorted(pool._free) == list(range(10))
    with pytest.raises(UserError, match="max_len"):
        pool.allocate(0, 17)
    with pytest.raises(UserError, match=">= 1"):
        PagePool(0, 4, 1, 8)


def test_kv_bytes_per_token_of_neox_20b():
    """44 layers, hidden 6144, bf16: 2 x 44 x 6144 x 2 B = 1,081,344 B (README)."""
    assert kv_bytes_per_token(44, 6144, 2) == 1_081_344
    assert jax.numpy.dtype(jnp.bfloat16).itemsize == 2
