"""A forward and a train step at 32,768 tokens on CPU: a tiny Qwen3-style model with
YaRN scaling (factor 8 over 4,096 positions) and the flash kernels (interpreted on CPU).

    JAX_PLATFORMS=cpu python experiments/long_context/run_32k.py [--length=32768]

Checks, printed with the wall times (compile included):
* the logits of the first 2,048 positions equal the XLA path's forward on those 2,048
  tokens alone (causality: later tokens cannot change them), within 1e-5 of the largest
  logit (fp32 on both sides, only the summation order differs);
* the logits at all 32k positions and the train step's loss and gradient norm are
  finite, the step counts every next-token target (32,767).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from neox_jax.model import GPTNeoX, ModelConfig, init_params
from neox_jax.training.step import TrainState, make_train_step, model_apply_fn

CONFIG = ModelConfig(
    model_type="qwen3", vocab_size=64, hidden_size=32, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, head_dim_override=16,
    intermediate_size=48, rotary_pct=1.0, max_position_embeddings=4096,
    norm_type="rmsnorm", gated_mlp=True, mlp_bias=False, fused_qkv=False,
    attention_bias=False, use_parallel_residual=False, hidden_act="silu", qk_norm=True,
    rotary_emb_base=1000000, attention_impl="pallas",
    rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096},
)  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=32768)
    args = parser.parse_args(argv)
    params = init_params(CONFIG, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, args.length)), jnp.int32)

    start = time.perf_counter()
    forward = lambda cfg: jax.jit(lambda p, x: GPTNeoX(cfg).apply({"params": p}, x))  # noqa: E731
    logits = np.asarray(forward(CONFIG)(params, tokens))
    seconds = time.perf_counter() - start
    head = np.asarray(forward(CONFIG.replace(attention_impl="xla"))(params, tokens[:, :2048]))
    err = np.abs(logits[:, :2048] - head).max() / np.abs(head).max()
    assert np.isfinite(logits).all() and err <= 1e-5, err
    print(f"forward {args.length} tokens: {seconds:.1f} s; first 2048 vs XLA: {err:.2e} rel")

    tx = optax.adamw(1e-3)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.key(0))
    step = jax.jit(make_train_step(tx, model_apply_fn(CONFIG)))
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(step(state, {"tokens": tokens}))
    seconds = time.perf_counter() - start
    loss, norm, count = (float(metrics[k]) for k in ("loss", "grad_norm", "tokens"))
    assert np.isfinite([loss, norm]).all() and count == args.length - 1, metrics
    print(
        f"train step {args.length} tokens: {seconds:.1f} s; loss {loss:.4f}, grad norm {norm:.4f}"
    )


if __name__ == "__main__":
    main()
