"""Sharded train states: shapes from ``jax.eval_shape``, shardings from logical axes.

Parameters are never materialised on one device: the abstract state (shapes only) and
the logical axis names give a ``NamedSharding`` per leaf, and initialisation runs
under ``jax.jit(..., out_shardings=...)`` so each device creates only its shard.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from neox_jax.parallel.rules import logical_to_sharding, replicated
from neox_jax.training.step import TrainState


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def opt_state_specs(tx: optax.GradientTransformation, abstract_params, param_specs):
    """Logical specs for the optimizer state: moments follow their parameter."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    return abstract_opt, optax.tree_map_params(
        tx,
        lambda _, spec: spec,
        abstract_opt,
        param_specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=_is_spec,
    )


def abstract_train_state(
    tx, abstract_params, param_specs, mesh, *, abstract_frozen=None, frozen_specs=None
) -> tuple[TrainState, TrainState]:
    """``(abstract state with shardings attached, tree of shardings)``.

    Args:
      tx: the optimizer.
      abstract_params / param_specs: shapes and logical specs of the trained parameters.
      abstract_frozen / frozen_specs: the same for frozen parameters (or None).
    """
    abstract_opt, opt_specs = opt_state_specs(tx, abstract_params, param_specs)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=abstract_params,
        opt_state=abstract_opt,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
        frozen=abstract_frozen,
    )
    rep = replicated(mesh)
    shardings = TrainState(
        step=rep,
        params=logical_to_sharding(param_specs, abstract_params, mesh),
        opt_state=logical_to_sharding(opt_specs, abstract_opt, mesh),
        rng=rep,
        frozen=None
        if abstract_frozen is None
        else logical_to_sharding(frozen_specs, abstract_frozen, mesh),
    )
    with_shardings = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return with_shardings, shardings


def init_train_state(
    init_params_fn, tx, shardings: TrainState, seed: int, frozen: Any = None
) -> TrainState:
    """Create the state on its devices: ``init_params_fn(rng) -> params`` runs sharded."""

    def init(rng):
        return _fresh_state(init_params_fn(rng), tx, rng)

    out = shardings.replace(frozen=None)
    state = jax.jit(init, out_shardings=out)(jax.random.PRNGKey(seed))
    return state.replace(frozen=frozen)


def state_from_params(
    params, tx, shardings: TrainState, seed: int, frozen: Any = None
) -> TrainState:
    """A fresh optimizer around given (e.g. converted) parameters, placed on the mesh."""
    params = jax.device_put(params, shardings.params)
    out = shardings.replace(frozen=None)
    state = jax.jit(functools.partial(_fresh_state, tx=tx), out_shardings=out)(
        params, rng=jax.random.PRNGKey(seed)
    )
    return state.replace(frozen=frozen)


def _fresh_state(params, tx, rng) -> TrainState:
    """Step 0: ``params`` with a new optimizer state (frozen parameters are added after
    the jit, so they are never copied)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng
    )
