"""GPT-NeoX native (DeepSpeed pipeline) checkpoints -> our params
(neox_jax/neox_compat/checkpoint.py, through neox_jax.loading.load_model).

The checkpoints are written here in GPT-NeoX's layout (one ``layer_XX-model_YY`` file
per layer and tensor-parallel rank, split as GPT-NeoX's ParallelLinear layers split
them) from a random tiny Hugging Face model, the independent reference.
"""

import numpy as np
import pytest
import torch
import yaml
from helpers.hf_reference import assert_logits_close, hf_logits, make_hf_model

from neox_jax.errors import UserError
from neox_jax.loading import artifact_kind, load_model, peek_config
from neox_jax.model import GPTNeoX

LAYERS = 2
ROTARY_PCT = 0.25  # given to make_hf_model (transformers 5 keeps it in rope_parameters)


class _Ranks:
    """Writes per-rank layer files as GPT-NeoX's pipeline saves them, and splits tensors
    as its ParallelLinear layers hold them on ``tp`` ranks."""

    def __init__(self, folder, tp):
        self.folder, self.tp = folder, tp
        folder.mkdir(parents=True)

    def save(self, layer, per_rank):
        for rank in range(self.tp):
            state = {k: v[rank].contiguous() for k, v in per_rank.items()}
            name = f"layer_{layer:02d}-model_{rank:02d}-model_states.pt"
            torch.save(state, self.folder / name)

    def rows(self, t):  # column-parallel outputs
        return torch.chunk(t, self.tp, dim=0)

    def cols(self, t):  # row-parallel inputs
        return torch.chunk(t, self.tp, dim=1)

    def same(self, t):  # replicated
        return [t] * self.tp


def write_neox_checkpoint(model, folder, tp, *, new_mlp_names=False):
    """``model``'s weights as GPT-NeoX saves them with tensor-parallel degree ``tp``."""
    cfg = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ranks = _Ranks(folder, tp)
    save, rows, cols, same = ranks.save, ranks.rows, ranks.cols, ranks.same
    # Parallel residual: each rank adds its bias copy before the one all-reduce, so each
    # holds bias / tp; sequential: the bias is added once after it, every rank holds it.
    row_bias = (lambda t: [t / tp] * tp) if cfg.use_parallel_residual else same
    save(0, {"word_embeddings.weight": rows(sd["gpt_neox.embed_in.weight"])})
    up, down = ("linear1", "linear2") if new_mlp_names else ("dense_h_to_4h", "dense_4h_to_h")
    for i in range(cfg.num_hidden_layers):
        p = f"gpt_neox.layers.{i}."
        save(i + 2, {
            "input_layernorm.weight": same(sd[p + "input_layernorm.weight"]),
            "input_layernorm.bias": same(sd[p + "input_layernorm.bias"]),
            "post_attention_layernorm.weight": same(sd[p + "post_attention_layernorm.weight"]),
            "post_attention_layernorm.bias": same(sd[p + "post_attention_layernorm.bias"]),
            "attention.query_key_value.weight": rows(sd[p + "attention.query_key_value.weight"]),
            "attention.query_key_value.bias": rows(sd[p + "attention.query_key_value.bias"]),
            "attention.dense.weight": cols(sd[p + "attention.dense.weight"]),
            "attention.dense.bias": row_bias(sd[p + "attention.dense.bias"]),
            "attention.rotary_emb.inv_freq": same(torch.ones(4)),  # a buffer, not a param
            f"mlp.{up}.weight": rows(sd[p + "mlp.dense_h_to_4h.weight"]),
            f"mlp.{up}.bias": rows(sd[p + "mlp.dense_h_to_4h.bias"]),
            f"mlp.{down}.weight": cols(sd[p + "mlp.dense_4h_to_h.weight"]),
            f"mlp.{down}.bias": row_bias(sd[p + "mlp.dense_4h_to_h.bias"]),
        })  # fmt: skip
    n = cfg.num_hidden_layers
    save(n + 3, {"norm.weight": same(sd["gpt_neox.final_layer_norm.weight"]),
                 "norm.bias": same(sd["gpt_neox.final_layer_norm.bias"])})  # fmt: skip
    if not cfg.tie_word_embeddings:
        save(
            n + 4,
            {"final_linear.weight": rows(sd.get("embed_out.weight", sd.get("lm_head.weight")))},
        )
    (folder / "configs").mkdir()
    neox_yml = {
        "num-layers": n, "hidden-size": cfg.hidden_size,
        "num-attention-heads": cfg.num_attention_heads, "seq-length": 64,
        "max-position-embeddings": cfg.max_position_embeddings, "pos-emb": "rotary",
        "rotary-pct": ROTARY_PCT, "no-weight-tying": not cfg.tie_word_embeddings,
        "gpt-j-residual": cfg.use_parallel_residual, "model-parallel-size": tp,
        "intermediate_size": cfg.intermediate_size, "zero_optimization": {"stage": 1},
    }  # fmt: skip
    (folder / "configs" / "model.yml").write_text(yaml.safe_dump(neox_yml))


@pytest.mark.parametrize(
    "tp, overrides",
    [
        (1, {}),
        (2, {}),
        (2, {"use_parallel_residual": False, "tie_word_embeddings": True}),
    ],
)
def test_neox_checkpoint_logits_equal_hf(tmp_path, tp, overrides):
    ref = make_hf_model(
        num_hidden_layers=LAYERS, intermediate_size=256, rotary_pct=ROTARY_PCT, **overrides
    )
    step = tmp_path / "save" / "global_step10"
    write_neox_checkpoint(ref, step, tp, new_mlp_names=tp == 2)
    (tmp_path / "save" / "latest").write_text("global_step10")

    for path in (step, tmp_path / "save"):  # the step folder, or the save folder + latest
        assert artifact_kind(path) == "neox"
        config, params = load_model(path)
        assert peek_config(path) == config
        assert config.vocab_size == ref.config.vocab_size
        assert config.use_parallel_residual == ref.config.use_parallel_residual
        ids = np.random.default_rng(0).integers(0, ref.config.vocab_size, (2, 11))
        ours = GPTNeoX(config).apply({"params": params}, ids)
        # fp32 on both sides; see assert_logits_close for why 1e-5 of the logit scale.
        assert_logits_close(ours, hf_logits(ref, ids))


def test_missing_layer_file_is_named(tmp_path):
    ref = make_hf_model(num_hidden_layers=LAYERS, intermediate_size=256, rotary_pct=ROTARY_PCT)
    write_neox_checkpoint(ref, tmp_path / "ckpt", 2)
    (tmp_path / "ckpt" / "layer_03-model_01-model_states.pt").unlink()
    with pytest.raises(UserError, match="layer_03-model_01-model_states.pt.*layer 1"):
        load_model(tmp_path / "ckpt")


def test_transformer_engine_layers_are_named(tmp_path):
    ref = make_hf_model(num_hidden_layers=LAYERS, intermediate_size=256, rotary_pct=ROTARY_PCT)
    write_neox_checkpoint(ref, tmp_path / "ckpt", 1)
    file = tmp_path / "ckpt" / "layer_02-model_00-model_states.pt"
    state = torch.load(file)  # TE's names for the same weights (convert_neox_to_hf.py's table)
    state["attention.qkv.weight"] = state.pop("attention.query_key_value.weight")
    torch.save(state, file)
    with pytest.raises(UserError, match="layer_02-model_00.*Transformer Engine"):
        load_model(tmp_path / "ckpt")


def test_folder_without_configs_asks_for_one(tmp_path):
    from neox_jax.model import ModelConfig
    from neox_jax.neox_compat.checkpoint import load_neox_checkpoint

    ref = make_hf_model(num_hidden_layers=LAYERS, intermediate_size=256, rotary_pct=ROTARY_PCT)
    write_neox_checkpoint(ref, tmp_path / "ckpt", 1)
    for f in (tmp_path / "ckpt" / "configs").iterdir():
        f.unlink()
    with pytest.raises(UserError, match="no configs/"):
        load_model(tmp_path / "ckpt")
    explicit = ModelConfig(vocab_size=96, hidden_size=64, num_hidden_layers=LAYERS,
                           num_attention_heads=4, intermediate_size=256,
                           max_position_embeddings=128)  # fmt: skip
    config, params = load_neox_checkpoint(tmp_path / "ckpt", config=explicit)
    ids = np.arange(10)[None] % 96
    assert_logits_close(GPTNeoX(config).apply({"params": params}, ids), hf_logits(ref, ids))


def to_sequential(folder, tp):
    """The same weights as a run without pipeline parallelism saves them: every layer in
    each rank's mp_rank_YY_model_states.pt under module["sequential.<layer>.<key>"], next
    to GPT-NeoX's client state (iteration, args, the Python/NumPy/torch RNG states)."""
    import random

    for rank in range(tp):
        module = {}
        for file in sorted(folder.glob(f"layer_*-model_{rank:02d}-model_states.pt")):
            layer = int(file.name[6:8])
            module.update({f"sequential.{layer}.{k}": v for k, v in torch.load(file).items()})
            file.unlink()
        state = {"module": module, "iteration": 10, "args": {"num_layers": LAYERS},
                 "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),  # noqa: NPY002
                 "torch_rng_state": torch.get_rng_state(), "ds_version": "0.9"}  # fmt: skip
        torch.save(state, folder / f"mp_rank_{rank:02d}_model_states.pt")


@pytest.mark.parametrize("tp", [1, 2])
def test_sequential_checkpoint_in_mp_rank_files_equals_hf(tmp_path, tp):
    ref = make_hf_model(num_hidden_layers=LAYERS, intermediate_size=256, rotary_pct=ROTARY_PCT)
    write_neox_checkpoint(ref, tmp_path / "ckpt", tp)
    to_sequential(tmp_path / "ckpt", tp)
    assert artifact_kind(tmp_path / "ckpt") == "neox"
    config, params = load_model(tmp_path / "ckpt")
    ids = np.random.default_rng(1).integers(0, ref.config.vocab_size, (2, 9))
    # fp32 on both sides; see assert_logits_close for why 1e-5 of the logit scale.
    assert_logits_close(GPTNeoX(config).apply({"params": params}, ids), hf_logits(ref, ids))


def test_pipeline_run_mp_rank_files_without_weights_are_not_read_for_them(tmp_path):
    ref = make_hf_model(num_hidden_layers=LAYERS, intermediate_size=256, rotary_pct=ROTARY_PCT)
    write_neox_checkpoint(ref, tmp_path / "ckpt", 1)
    torch.save({"module": None, "iteration": 10}, tmp_path / "ckpt" / "mp_rank_00_model_states.pt")
    config, params = load_model(tmp_path / "ckpt")  # the layer files are used
    ids = np.arange(8)[None]
    assert_logits_close(GPTNeoX(config).apply({"params": params}, ids), hf_logits(ref, ids))
    for f in (tmp_path / "ckpt").glob("layer_*"):
        f.unlink()
    with pytest.raises(UserError, match="mp_rank_00_model_states.pt holds no weights"):
        load_model(tmp_path / "ckpt")


def write_neox_llama_checkpoint(model, folder, tp, *, window=None, row_output=False,
                                legacy=False):  # fmt: skip
    """A transformers Llama/Mistral ``model`` as GPT-NeoX saves its Llama-style models
    (norm: rmsnorm, activation: swiglu): RMSNorm ``scale``s, one ``query_key_value`` whose
    rows are, per rank, its heads' [q, k, v] interleaved (every head has its own k/v) or
    [q heads | k heads | v heads] (num_kv_heads), ``linear1`` = per rank [up | gate] (its
    Gated_Activation's ``x, gate = chunk(2)``), ``linear2`` row-parallel. ``legacy``: the
    older ``mlp_type: llama`` (LLaMAParallelMLP's column-parallel w1 = gate, w3 = up, w2)."""
    cfg = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // heads
    ranks = _Ranks(folder, tp)  # sequential residual: row-parallel biases whole on each rank
    save, rows, cols, same = ranks.save, ranks.rows, ranks.cols, ranks.same

    def qkv(p, what):
        q, k, v = (sd[f"{p}self_attn.{n}_proj.{what}"] for n in "qkv")
        if kv_heads == heads:  # [heads, 3, head_dim, ...] in GPT-NeoX's strided layout
            fused = torch.stack([t.reshape(heads, hd, *t.shape[1:]) for t in (q, k, v)], 1)
            return rows(fused.reshape(3 * cfg.hidden_size, *q.shape[1:]))
        return [torch.cat(parts) for parts in zip(rows(q), rows(k), rows(v), strict=True)]

    def linear1(p, what):
        up, gate = sd[f"{p}mlp.up_proj.{what}"], sd[f"{p}mlp.gate_proj.{what}"]
        return [torch.cat(parts) for parts in zip(rows(up), rows(gate), strict=True)]

    save(0, {"word_embeddings.weight": rows(sd["model.embed_tokens.weight"])})
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        state = {
            "input_layernorm.scale": same(sd[p + "input_layernorm.weight"]),
            "post_attention_layernorm.scale": same(sd[p + "post_attention_layernorm.weight"]),
            "attention.query_key_value.weight": qkv(p, "weight"),
            "attention.dense.weight": cols(sd[p + "self_attn.o_proj.weight"]),
            "mlp.linear1.weight": linear1(p, "weight"),
            "mlp.linear2.weight": cols(sd[p + "mlp.down_proj.weight"]),
        }
        if legacy:
            del state["mlp.linear1.weight"], state["mlp.linear2.weight"]
            state["mlp.w1.weight"] = rows(sd[p + "mlp.gate_proj.weight"])
            state["mlp.w3.weight"] = rows(sd[p + "mlp.up_proj.weight"])
            state["mlp.w2.weight"] = cols(sd[p + "mlp.down_proj.weight"])
        if getattr(cfg, "attention_bias", False):
            state["attention.query_key_value.bias"] = qkv(p, "bias")
            state["attention.dense.bias"] = same(sd[p + "self_attn.o_proj.bias"])
        if getattr(cfg, "mlp_bias", False):
            state["mlp.linear1.bias"] = linear1(p, "bias")
            state["mlp.linear2.bias"] = same(sd[p + "mlp.down_proj.bias"])
        save(i + 2, state)
    n = cfg.num_hidden_layers
    save(n + 3, {"norm.scale": same(sd["model.norm.weight"])})
    if not cfg.tie_word_embeddings:
        head = sd["lm_head.weight"]
        save(n + 4, {"final_linear.weight": cols(head) if row_output else rows(head)})
    (folder / "configs").mkdir()
    neox_yml = {
        "num_layers": n, "hidden_size": cfg.hidden_size, "num_attention_heads": heads,
        "seq_length": 64, "max_position_embeddings": cfg.max_position_embeddings,
        "pos_emb": "rotary", "rotary_pct": 1, "no_weight_tying": not cfg.tie_word_embeddings,
        "gpt_j_residual": False, "norm": "rmsnorm", "rms_norm_epsilon": cfg.rms_norm_eps,
        "activation": "swiglu", "intermediate_size": 3 * cfg.intermediate_size,
        "use_bias_in_attn_linear": getattr(cfg, "attention_bias", False),
        "use_bias_in_mlp": getattr(cfg, "mlp_bias", False),
        "use_bias_in_norms": False, "model_parallel_size": tp,
        "output_layer_parallelism": "row" if row_output else "column",
        "optimizer": {"type": "Lion", "params": {"lr": 1e-4}},  # not the model's business
    }  # fmt: skip
    if kv_heads != heads:
        neox_yml["num_kv_heads"] = kv_heads
    if legacy:  # GPT-NeoX before #1212
        neox_yml.update(mlp_type="llama", activation="silu",
                        intermediate_size=cfg.intermediate_size)  # fmt: skip
    if window is not None:  # GPT-NeoX applies it in flash attention only
        neox_yml["sliding_window_width"] = window
        neox_yml["attention_config"] = [[["flash"], n]]
    (folder / "configs" / "llama.yml").write_text(yaml.safe_dump(neox_yml))


@pytest.mark.parametrize(
    "tp, kv_heads, biases, tied, window, row_output, legacy",
    [
        (1, 4, False, False, None, False, False),
        (2, 4, True, True, None, False, False),
        (2, 2, False, False, 4, True, False),  # GQA + sliding window, row-parallel output
        (2, 4, False, False, None, False, True),  # the older mlp_type: llama (w1/w3/w2)
    ],
)
def test_neox_llama_checkpoint_logits_equal_hf(tmp_path, tp, kv_heads, biases, tied, window,
                                               row_output, legacy):  # fmt: skip
    import transformers
    from helpers.hf_reference import random_causal_lm

    kind = transformers.MistralConfig if window else transformers.LlamaConfig
    extra = {"sliding_window": window + 1} if window else {"mlp_bias": biases}
    # flash_attn's window_size=(w, -1) lets a query see itself and w keys before it:
    # transformers' sliding_window counts the query too, so w + 1.
    ref = random_causal_lm(kind(
        vocab_size=96, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=kv_heads, intermediate_size=96, max_position_embeddings=128,
        attention_bias=biases, tie_word_embeddings=tied, rms_norm_eps=1e-5, **extra,
    ), seed=tp)  # fmt: skip
    write_neox_llama_checkpoint(
        ref, tmp_path / "ckpt", tp, window=window, row_output=row_output, legacy=legacy
    )
    config, params = load_model(tmp_path / "ckpt")
    assert config.model_type == ("mistral" if window else "llama")
    assert config.kv_heads == kv_heads
    ids = np.random.default_rng(2).integers(0, 96, (2, 13))  # longer than the window
    # fp32 on both sides; see assert_logits_close for why 1e-5 of the logit scale.
    assert_logits_close(GPTNeoX(config).apply({"params": params}, ids), hf_logits(ref, ids))
