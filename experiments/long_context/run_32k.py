"""A 32,768-token forward and train step of a tiny Qwen3-style model on CPU, with YaRN or
llama3 RoPE scaling and the flash kernels (Pallas interpret mode on CPU).

    JAX_PLATFORMS=cpu python experiments/long_context/run_32k.py

Checks, per scaling type: the loss and gradients are finite; the first 4,096 logits of
the 32k forward equal an XLA-path forward of those 4,096 tokens alone (causal, so they
depend only on earlier tokens; the XLA path at 32k would need [heads, T, T] = 8 GiB of
scores); and a train step lowers the loss on the same batch. Prints one JSON line per
type; the README beside this file records a run.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.model import GPTNeoX, ModelConfig, init_params

LENGTH, CHECK = 32768, 4096
SCALINGS = {
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
    "llama3": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 4096},
}  # fmt: skip


def config(scaling) -> ModelConfig:
    return ModelConfig(
        model_type="qwen3", vocab_size=256, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim_override=16,
        intermediate_size=64, rotary_pct=1.0, rotary_emb_base=1e6,
        max_position_embeddings=8192, norm_type="rmsnorm", gated_mlp=True, mlp_bias=False,
        fused_qkv=False, attention_bias=False, use_parallel_residual=False,
        hidden_act="silu", qk_norm=True, rope_scaling=scaling, attention_impl="pallas",
    )  # fmt: skip


def main() -> None:
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, LENGTH + 1)), jnp.int32)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    for name, scaling in SCALINGS.items():
        cfg = config(scaling)
        params = init_params(cfg, jax.random.key(0))

        def loss_fn(p, cfg=cfg):
            logits = GPTNeoX(cfg).apply({"params": p}, inputs)
            logp = jax.nn.log_softmax(logits, -1)
            return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

        start = time.perf_counter()
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
        loss = float(loss)
        step_s = time.perf_counter() - start
        finite = bool(all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads)))
        new = jax.tree.map(lambda p, g: p - 1.0 * g, params, grads)
        after = float(jax.jit(loss_fn)(new))
        full = jax.jit(lambda p, cfg=cfg: GPTNeoX(cfg).apply({"params": p}, inputs))(params)
        xla = cfg.replace(attention_impl="xla")
        head = GPTNeoX(xla).apply({"params": params}, inputs[:, :CHECK])
        err = float(jnp.abs(full[:, :CHECK] - head).max() / jnp.abs(head).max())
        print(json.dumps({
            "rope": name, "tokens": LENGTH, "loss": loss, "loss_after_step": after,
            "grads_finite": finite, "first_4096_rel_err_vs_xla": err,
            "forward_backward_s": round(step_s, 1),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
