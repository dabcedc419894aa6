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
over ``[B, T, V]``. Values equal ``step.token_losses`` on the model's logits up to
summation order.
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


def head_loss(head: OutputHead, targets: Array, weights: Array) -> Array:
    """``sum(weights * cross_entropy(logits(head), targets))`` in fp32.

    Args:
      head: the states and output kernel.
      targets: ``[B, T]`` int token ids.
      weights: ``[B, T]`` fp32 per-token weights (the loss mask).
    """
    return _head_loss(head.states, head.kernel, targets, weights, head.tied)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head_loss(states, kernel, targets, weights, tied):
    losses = _token_losses(head_logits(OutputHead(states, kernel, tied)), targets)
    return jnp.sum(losses * weights)


def _token_losses(logits: Array, targets: Array) -> Array:
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - picked


def _head_loss_fwd(states, kernel, targets, weights, tied):
    logits = head_logits(OutputHead(states, kernel, tied))  # [B, T, V] fp32
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    losses = log_z - picked
    vocab = jax.lax.broadcasted_iota(targets.dtype, logits.shape, 2)
    one_hot = (vocab == targets[..., None]).astype(jnp.float32)
    # d sum(w * loss) / d logits, in one elementwise pass over the logits.
    dlogits = (jnp.exp(logits - log_z[..., None]) - one_hot) * weights[..., None]
    dlogits = nn.with_logical_constraint(dlogits.astype(states.dtype), _LOGITS)
    return jnp.sum(losses * weights), (states, kernel, dlogits, losses, targets)


def _head_loss_bwd(tied, residuals, g):
    states, kernel, dlogits, losses, targets = residuals
    k = kernel.astype(states.dtype)
    if tied:  # kernel is the [V, E] table
        dx = jnp.einsum("btv,ve->bte", dlogits, k)
        dk = jnp.einsum("btv,bte->ve", dlogits, states)
    else:
        dx = jnp.einsum("btv,ev->bte", dlogits, k)
        dk = jnp.einsum("bte,btv->ev", states, dlogits)
    targets_ct = jnp.zeros(targets.shape, jax.dtypes.float0)
    return (g * dx).astype(states.dtype), (g * dk).astype(kernel.dtype), targets_ct, g * losses


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)
