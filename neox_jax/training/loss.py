"""The output layer and its cross entropy as one function with a hand-written gradient.

Autodiff of ``logits = x @ W`` followed by ``logsumexp(logits) - logits[target]``
walks the ``[B, T, V]`` fp32 logits (412 MB for pythia-70m at 8 x 256 tokens) many
times: the softmax is rebuilt in the backward pass, the gradient of the target pick
is a zero ``[B, T, V]`` array with a scatter into it, and XLA:CPU transposes the
whole logits gradient to feed the weight-gradient product (``experiments/train_bench``
profiles these ops). The gradient of a summed cross entropy is known in closed form,

    d loss / d logits = weight * (softmax(logits) - one_hot(target)),

and the loss is a sum, so its cotangent is a scalar ``g``: the forward pass can finish
the logits gradient in the same sweep that computes the loss and keep it instead of
the logits, and the backward pass is two matmuls scaled by ``g``:

    dx = g * dlogits @ W.T        dW = g * x.T @ dlogits

Same FLOPs as autodiff (three ``[N, E] x [E, V]`` products), a third of the passes
over ``[B, T, V]``.

The tokens go through this in chunks of about ``CHUNK_TOKENS`` (all batch rows, a span
of positions), each projected, reduced and differentiated on its own in the forward
sweep: what the backward pass keeps is ``dx`` ``[B, T, E]`` and ``dW`` (the chunks'
products summed in fp32), and no ``[B, T, V]`` logits or gradient exist whole, only a
chunk's at a time. The chunks are independent, so XLA:CPU can run one chunk's cross
entropy (single-threaded elementwise passes) beside another's products. Values equal
``step.token_losses`` on the model's logits up to summation order.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from neox_jax.model import ModelConfig, axes

Array = jax.Array
_LOGITS = (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB)
# Tokens per chunk of the head's cross entropy (see the module docstring), and the most
# chunks a batch is cut into.
CHUNK_TOKENS = 512
MAX_CHUNKS = 8


@flax.struct.dataclass
class OutputHead:
    """What an ``ApplyFn`` may return instead of logits: the final normed states and
    the output projection, so the loss projects and differentiates them in one pass.

    states: ``[B, T, E]`` in the compute dtype.
    kernel: ``embed_out/kernel`` ``[E, V]``, or with ``tied`` the input table ``[V, E]``.
    """

    states: Array
    kernel: Array
    tied: bool = flax.struct.field(pytree_node=False, default=False)


def output_head(config: ModelConfig, params, states: Array) -> OutputHead:
    """The ``OutputHead`` of ``GPTNeoX`` parameters (as ``model.output_logits`` projects)."""
    if config.tie_word_embeddings:
        return OutputHead(states, params["embed_in"]["embedding"], tied=True)
    return OutputHead(states, params["embed_out"]["kernel"])


def head_logits(head: OutputHead) -> Array:
    """``[B, T, V]`` fp32 logits, computed as the model's ``_project`` does."""
    x = head.states
    kernel = head.kernel.astype(x.dtype)
    if head.tied:
        logits = jnp.einsum("bte,ve->btv", x, kernel, preferred_element_type=jnp.float32)
    else:  # ``Linear``: a product in the compute dtype, then fp32
        logits = jnp.einsum("bte,ev->btv", x, kernel)
    return nn.with_logical_constraint(logits.astype(jnp.float32), _LOGITS)


def head_loss(
    head: OutputHead, targets: Array, weights: Array, chunk_tokens: int | None = None
) -> Array:
    """``sum(weights * cross_entropy(logits(head), targets))`` in fp32.

    Args:
      head: the states and output kernel.
      targets: ``[B, T]`` int token ids.
      weights: ``[B, T]`` fp32 per-token weights (the loss mask).
      chunk_tokens: tokens per chunk (``B`` rows times a span of positions); default
        ``CHUNK_TOKENS``, 0 for one chunk of the whole batch.
    """
    chunk = CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    bounds = chunk_bounds(head.states.shape[0], head.states.shape[1], chunk)
    return _head_loss(head.states, head.kernel, targets, weights, head.tied, bounds)


def chunk_bounds(batch: int, length: int, chunk_tokens: int) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` position spans of about ``chunk_tokens`` tokens each, all ``batch``
    rows of a span (the batch axis may be sharded over devices, the length axis is not);
    at most ``MAX_CHUNKS`` of them, so a large batch does not unroll into many ops."""
    chunks = min(MAX_CHUNKS, length, (batch * length) // chunk_tokens) if chunk_tokens > 0 else 1
    span = -(-length // max(chunks, 1))  # ceil
    return tuple((lo, min(lo + span, length)) for lo in range(0, length, span))


def _chunk_logits(states, kernel, tied, lo, hi):
    """``[B, hi - lo, V]`` fp32 logits of positions ``[lo, hi)``."""
    return head_logits(OutputHead(states[:, lo:hi], kernel, tied))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _head_loss(states, kernel, targets, weights, tied, bounds):
    losses = [
        _token_losses(_chunk_logits(states, kernel, tied, lo, hi), targets[:, lo:hi])
        for lo, hi in bounds
    ]
    return jnp.sum(jnp.concatenate(losses, axis=1) * weights)


def _token_losses(logits: Array, targets: Array) -> Array:
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - picked


def _losses_and_dlogits(logits: Array, targets: Array, weights: Array):
    """Per-token losses ``[B, c]`` and ``d sum(w * loss) / d logits`` ``[B, c, V]`` fp32.

    One exponential per logit: ``e = exp(logits - max)`` is written once and feeds both
    the sum and the gradient ``e / sum - one_hot`` (``logsumexp`` followed by
    ``exp(logits - log_z)`` computes every exponential twice, and on XLA:CPU those
    single-threaded passes cost twice the CPU time of this form).
    """
    peak = jnp.max(logits, axis=-1, keepdims=True)  # [B, c, 1]: e <= 1, sum >= 1
    e = jnp.exp(logits - peak)  # [B, c, V]
    total = jnp.sum(e, axis=-1)  # [B, c]
    log_z = jnp.log(total) + peak[..., 0]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    vocab = jax.lax.broadcasted_iota(targets.dtype, logits.shape, 2)
    one_hot = (vocab == targets[..., None]).astype(jnp.float32)
    dlogits = (e * (1.0 / total)[..., None] - one_hot) * weights[..., None]
    return log_z - picked, nn.with_logical_constraint(dlogits, _LOGITS)


def _head_loss_fwd(states, kernel, targets, weights, tied, bounds):
    k = kernel.astype(states.dtype)
    losses, dxs, dk = [], [], None
    for lo, hi in bounds:  # independent chunks: XLA may run them side by side
        logits = _chunk_logits(states, kernel, tied, lo, hi)  # [B, c, V] fp32
        loss, dl = _losses_and_dlogits(logits, targets[:, lo:hi], weights[:, lo:hi])
        dl = dl.astype(states.dtype)
        s = states[:, lo:hi]  # [B, c, E]
        if tied:  # kernel is the [V, E] table
            dxs.append(jnp.einsum("btv,ve->bte", dl, k))
            part = jnp.einsum("btv,bte->ve", dl, s, preferred_element_type=jnp.float32)
        else:
            dxs.append(jnp.einsum("btv,ev->bte", dl, k))
            part = jnp.einsum("bte,btv->ev", s, dl, preferred_element_type=jnp.float32)
        dk = part if dk is None else dk + part
        losses.append(loss)
    losses = jnp.concatenate(losses, axis=1)  # [B, T]
    dx = jnp.concatenate(dxs, axis=1)  # [B, T, E]
    return jnp.sum(losses * weights), (dx, dk.astype(kernel.dtype), losses, targets)


def _head_loss_bwd(tied, bounds, residuals, g):
    del tied, bounds
    dx, dk, losses, targets = residuals
    targets_ct = jnp.zeros(targets.shape, jax.dtypes.float0)
    return (g * dx).astype(dx.dtype), (g * dk).astype(dk.dtype), targets_ct, g * losses


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)
