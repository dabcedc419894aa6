"""Sentence embeddings from any layer of a GPT-NeoX model.

The hidden states are those of transformers' ``output_hidden_states``: entry 0 is the
token embeddings, entry ``i`` the input of layer ``i``, entry ``L`` (= -1) the output
of the final LayerNorm. They are pooled over the real tokens of each text:

* ``mean``: the average over real tokens (the usual choice for retrieval);
* ``last``: the state of the last real token (a causal model's summary of the text);
* ``max``: the element-wise maximum over real tokens.

and optionally L2-normalised, so inner products are cosine similarities. Texts are
sorted by length, right-padded to bucketed lengths and batched to a fixed batch size,
so embedding a corpus compiles once per length bucket; batches are split over the
available devices.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.evaluation.sharding import DataParallel
from neox_jax.inference.generate import bucket_length, context_length
from neox_jax.model import GPTNeoX, ModelConfig

POOLINGS = ("mean", "last", "max")
MIN_BUCKET = 16


def resolve_layer(config: ModelConfig, layer: int) -> int:
    """Index into the ``L + 1`` hidden states; negative indices count from the top.

    Raises:
      ValueError: ``layer`` outside ``[-(L + 1), L]``.
    """
    n = config.num_hidden_layers
    if not isinstance(layer, int | np.integer) or isinstance(layer, bool):
        raise ValueError(f"layer must be an integer, got {layer!r}.")
    if not -(n + 1) <= layer <= n:
        raise ValueError(
            f"layer {layer} is out of range for a model with {n} layers: hidden states are "
            f"0 (embeddings) .. {n} (final LayerNorm output), or -{n + 1} .. -1 from the top."
        )
    return int(layer) % (n + 1)


def pool(hidden: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
    """Pool ``[B, T, E]`` states over the real tokens (``mask`` 1) into ``[B, E]`` fp32.

    Rows must be right-padded for ``last`` (the last real token is at ``sum(mask) - 1``).
    A row without tokens gives zeros.
    """
    hidden = hidden.astype(jnp.float32)
    real = mask.astype(bool)[..., None]  # [B, T, 1]
    if pooling == "mean":
        total = jnp.where(real, hidden, 0.0).sum(axis=1)
        return total / jnp.maximum(real.sum(axis=1), 1)
    if pooling == "last":
        last = jnp.maximum(mask.sum(axis=1) - 1, 0)  # [B]
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    if pooling == "max":
        best = jnp.where(real, hidden, -jnp.inf).max(axis=1)
        return jnp.where(real.any(axis=1), best, 0.0)
    raise ValueError(f"Unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}.")


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _embed(config: ModelConfig, layer: int, pooling: str, normalize: bool, params, ids, mask):
    out = GPTNeoX(config).apply(
        {"params": params},
        ids,
        attention_mask=mask,
        return_hidden_states=True,
        compute_logits=False,
    )
    vectors = pool(out.hidden_states[layer], mask, pooling)  # [B, E]
    if normalize:
        # The epsilon keeps an all-zero vector (an empty row) at zero instead of NaN.
        vectors = vectors / jnp.maximum(jnp.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    return vectors


class Embedder:
    """Embeds texts (or token ids) with one model; reuse it, compiles are cached.

    Args:
      config: the model config.
      params: its parameters.
      tokenizer: a ``neox_jax.data.tokenizer.Tokenizer`` (needed for texts only).
      layer: hidden state to pool, 0 .. L or negative from the top (-1 = final).
      pooling: "mean", "last" or "max".
      normalize: L2-normalise the vectors.
      batch_size: texts per device batch.
      max_length: longest input in tokens; default the model's context.
      truncate: cut longer inputs to ``max_length`` (keeping the start) instead of raising.
      mesh: optional device mesh.
    """

    def __init__(
        self,
        config: ModelConfig,
        params,
        tokenizer=None,
        *,
        layer: int = -1,
        pooling: str = "mean",
        normalize: bool = True,
        batch_size: int = 32,
        max_length: int | None = None,
        truncate: bool = False,
        mesh=None,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"Unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        limit = context_length(config)
        self.max_length = limit if max_length is None else int(max_length)
        if not 1 <= self.max_length <= limit:
            raise ValueError(f"max_length must lie in [1, {limit}], got {max_length}.")
        self.config, self.tokenizer = config, tokenizer
        self.layer = resolve_layer(config, layer)
        self.pooling, self.normalize, self.truncate = pooling, bool(normalize), truncate
        self.placement = DataParallel(config, params, mesh)
        self.batch_size = self.placement.round_batch(batch_size)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``[N, E]`` float32 embeddings of ``texts``.

        Raises:
          ValueError: an empty text, or one longer than ``max_length`` tokens without
            ``truncate``.
        """
        if isinstance(texts, str):
            raise TypeError("embed takes a list of texts; wrap a single text in a list.")
        if self.tokenizer is None:
            raise ValueError("embedding texts needs a tokenizer; pass token ids to embed_ids.")
        encode = self.tokenizer.encode  # as transformers' tokenizer(text): a Llama bos too
        return self.embed_ids([encode(t, add_special_tokens=True) for t in texts])

    def embed_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """``[N, E]`` float32 embeddings of token-id sequences (see ``embed``)."""
        seqs = []
        for i, ids in enumerate(sequences):
            ids = [int(t) for t in ids]
            if not ids:
                raise ValueError(f"input {i} is empty: there is nothing to embed.")
            if len(ids) > self.max_length:
                if not self.truncate:
                    raise ValueError(
                        f"input {i} has {len(ids)} tokens, more than max_length="
                        f"{self.max_length}; chunk it or pass truncate=True."
                    )
                ids = ids[: self.max_length]
            seqs.append(ids)
        out = np.zeros((len(seqs), self.dim), np.float32)
        if not seqs:
            return out
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        width = self.batch_size if len(seqs) >= self.batch_size else _pow2(len(seqs))
        width = self.placement.round_batch(width)
        for start in range(0, len(order), width):
            rows = order[start : start + width]
            length = min(self.max_length, bucket_length(len(seqs[rows[0]]), MIN_BUCKET))
            ids = np.zeros((width, length), np.int32)  # [B, T], right-padded
            mask = np.zeros((width, length), np.int32)
            for r, i in enumerate(rows):
                ids[r, : len(seqs[i])], mask[r, : len(seqs[i])] = seqs[i], 1
            ids, mask = self.placement.put(ids, mask)
            vectors = _embed(
                self.config,
                self.layer,
                self.pooling,
                self.normalize,
                self.placement.params,
                ids,
                mask,
            )
            out[rows] = np.asarray(jax.device_get(vectors))[: len(rows)]
        return out

    def describe(self) -> dict:
        """The settings that produced the vectors (stored beside an index)."""
        return {
            "layer": self.layer,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "max_length": self.max_length,
            "dim": self.dim,
        }


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
