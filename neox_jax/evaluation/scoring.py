"""Log-likelihood of continuations: the one scoring path behind perplexity, few-shot
multiple choice and the lm-evaluation-harness adapter.

A request is ``(context_ids, continuation_ids)``. As lm-eval's Hugging Face model does,
the model reads ``(context + continuation)[:-1]`` (left-truncated to ``max_length``
tokens) and the continuation's tokens are scored from the logits before them; the
result is the summed log-probability and whether every continuation token was the
argmax ("is_greedy"). Requests are sorted by length, right-padded to bucketed lengths
and batched to a fixed batch size, so a run compiles once per length bucket; batches
are split over the available devices (``DataParallel``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.evaluation.sharding import DataParallel
from neox_jax.inference.generate import bucket_length, context_length
from neox_jax.model import GPTNeoX, ModelConfig

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class _Row:
    request: int  # index of the request the row belongs to
    inputs: list[int]  # tokens fed to the model
    targets: list[int]  # the next token at every input position
    num_scored: int  # the last ``num_scored`` targets are the continuation


@functools.partial(jax.jit, static_argnums=0)
def token_logprobs(config: ModelConfig, params, ids, mask, targets):
    """Log-probability of each target token and whether it is the argmax.

    Args:
      config: the model config (static).
      params: the parameters.
      ids: ``[B, T]`` int32 inputs; mask: ``[B, T]`` 1 = token, 0 = padding.
      targets: ``[B, T]`` int32, the token that follows each input position.

    Returns:
      ``(logprobs [B, T] fp32, is_argmax [B, T] bool)``; padding positions are garbage.
    """
    logits = GPTNeoX(config).apply({"params": params}, ids, attention_mask=mask)  # [B, T, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


class LogLikelihoodScorer:
    """Scores continuations with one model; reuse it, compiled programs are cached.

    Args:
      config: the model config.
      params: its parameters.
      batch_size: rows per device batch (rounded up to a multiple of the device count).
      max_length: longest model input; default the model's context (with RoPE scaling).
      mesh: optional mesh (``neox_jax.parallel.create_mesh``); default all devices on data.
    """

    def __init__(
        self,
        config: ModelConfig,
        params,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        limit = context_length(config)
        max_length = limit if max_length is None else max_length
        if not 2 <= max_length <= limit:
            raise ValueError(
                f"max_length={max_length} must lie in [2, {limit}] (the model's context, "
                "times the RoPE scaling factor when one is set)."
            )
        self.config = config
        self.placement = DataParallel(config, params, mesh)
        self.batch_size = self.placement.round_batch(batch_size)
        self.max_length = max_length

    def _rows(self, requests) -> list[_Row]:
        rows = []
        for i, (context, continuation) in enumerate(requests):
            context, continuation = list(map(int, context)), list(map(int, continuation))
            if not continuation:
                raise ValueError(f"request {i}: empty continuation; nothing to score.")
            if not context:
                raise ValueError(
                    f"request {i}: empty context; prefix a BOS/EOS token so the first "
                    "continuation token has something to be predicted from."
                )
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"request {i}: a continuation of {len(continuation)} tokens exceeds "
                    f"max_length={self.max_length}; it cannot be scored in one window."
                )
            whole = (context + continuation)[-(self.max_length + 1) :]  # drop oldest context
            rows.append(_Row(i, whole[:-1], whole[1:], len(continuation)))
        return rows

    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]):
        """Summed log-probability and greediness of each continuation.

        Args:
          requests: ``(context_ids, continuation_ids)`` pairs; the context must be
            non-empty (use a BOS/EOS token for "no context").

        Returns:
          One ``(logprob, is_greedy)`` per request, in order.

        Raises:
          ValueError: an empty context or continuation, or a continuation longer than
            ``max_length``.
        """
        rows = self._rows(requests)
        # Longest first: the first batch hits the biggest bucket (an OOM shows at once),
        # and similar lengths share a batch.
        rows.sort(key=lambda r: -len(r.inputs))
        width = self.batch_size if len(rows) >= self.batch_size else _pow2(len(rows))
        width = self.placement.round_batch(width)
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in range(0, len(rows), width):
            batch = rows[start : start + width]
            length = min(self.max_length, bucket_length(len(batch[0].inputs), MIN_BUCKET))
            ids = np.zeros((width, length), np.int32)  # [B, T]
            mask = np.zeros((width, length), np.int32)
            targets = np.zeros((width, length), np.int32)
            for r, row in enumerate(batch):
                n = len(row.inputs)
                ids[r, :n], mask[r, :n], targets[r, :n] = row.inputs, 1, row.targets
            logp, greedy = jax.device_get(
                token_logprobs(
                    self.config, self.placement.params, *self.placement.put(ids, mask, targets)
                )
            )
            for r, row in enumerate(batch):
                n = len(row.inputs)
                span = slice(n - row.num_scored, n)
                # Sum in float64 on the host: long documents add up many terms.
                out[row.request] = (
                    float(logp[r, span].astype(np.float64).sum()),
                    bool(greedy[r, span].all()),
                )
        return out


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
