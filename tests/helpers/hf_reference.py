"""Random tiny Hugging Face GPT-NeoX models: the independent reference for our tests."""

import numpy as np
import torch
import transformers


def make_hf_model(path=None, *, seed=0, **overrides):
    """A random ``GPTNeoXForCausalLM`` whose activations are O(1).

    With transformers' default ``initializer_range=0.02`` a tiny model's activations are
    ~1e-2 and, e.g., a wrong GELU variant moves logits by only ~1e-5, slipping through a
    parity test. So weights are drawn with std 0.3 / sqrt-ish scaling and LayerNorm
    parameters and biases are made non-trivial, so every term is exercised.
    """
    kwargs = dict(
        vocab_size=96,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=192,
        max_position_embeddings=128,
        rotary_pct=0.25,
        hidden_act="gelu",
        use_parallel_residual=True,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )
    kwargs.update(overrides)
    config = transformers.GPTNeoXConfig(**kwargs)
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    if path is not None:
        model.save_pretrained(path)
    return model


def random_causal_lm(config, path=None, *, seed=0):
    """A random transformers causal LM for ``config`` (any family) whose activations are
    O(1): norm weights near 1 and biases non-trivial, as ``make_hf_model`` does."""
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    if path is not None:
        model.save_pretrained(path)
    return model


def hf_logits(model, input_ids, attention_mask=None):
    with torch.no_grad():
        ids = torch.tensor(np.asarray(input_ids), dtype=torch.long)
        mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask))
        return model(ids, attention_mask=mask).logits.numpy()


def assert_logits_close(ours, ref, rel=1e-5):
    """max |ours - ref| <= rel * max |ref|.

    Both sides compute in fp32 with different kernels and summation orders, so they
    differ by accumulated round-off (~1e-6 of the logit scale for these sizes); 1e-5 of
    the largest logit leaves headroom for that while any formula difference (a GELU
    variant, a rotary convention, a LayerNorm detail) is orders of magnitude larger.
    """
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = np.max(np.abs(ours - ref))
    scale = np.max(np.abs(ref))
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} * {scale:.3g}"


def train_byte_level_bpe(
    directory, texts, vocab_size, tokenizer_config, special_tokens=("<|endoftext|>", "<|padding|>")
):
    """A GPT-NeoX-style byte-level BPE (<|endoftext|> = 0, <|padding|> = 1, or the given
    ``special_tokens`` from id 0) trained on ``texts`` and saved in ``directory`` with
    ``tokenizer_config.json``; returns it loaded."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from neox_jax.data.tokenizer import load_tokenizer

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer)
    raw.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return load_tokenizer(directory)


def random_peft_model(model, lora_config, *, seed=0):
    """``peft.get_peft_model(model, lora_config)`` with every ``lora_B`` drawn N(0, 0.3^2)
    (peft starts B at zero, an adapter that changes nothing), in eval mode."""
    import peft

    model = peft.get_peft_model(model, lora_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()
