"""Config blocks shared by several configs, each field defined and commented once.

The other config files load this one by path (``configs/`` is not a package):

    COMMON = runpy.run_path(str(Path(__file__).with_name("common.py")))
    COMMON["add_model_source"](c)
"""

import ml_collections


def add_model_source(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The model to load and its load-time overrides (sample, serve, evaluate, rag + embed).

    Read by one function, ``neox_jax.loading.load_from_config``.
    """
    # ------------------------------------------------------------------ model
    # The model: a neox_jax checkpoint (float or quantized), a training run directory (its
    # latest complete step), a LoRA run directory (the base with the adapters merged) or a
    # Hugging Face GPT-NeoX folder. Required.
    c.checkpoint = ""
    # Tokenizer file or folder; "" = the one found at or beside the checkpoint.
    c.tokenizer = ""
    # Compute dtype override: "" keeps the checkpoint's; "float32" or "bfloat16".
    c.dtype = ""
    # Attention implementation override: "" keeps the checkpoint's; "xla" or "pallas".
    c.attention_impl = ""
    # RoPE scaling at load time: "" keeps the checkpoint's, "linear" (position
    # interpolation) or "ntk" (NTK-aware base scaling) with a factor >= 1 (the context
    # becomes max_position_embeddings * factor), "none" removes a stored one.
    c.rope_scaling_type = ""
    c.rope_scaling_factor = 1.0
    return c
