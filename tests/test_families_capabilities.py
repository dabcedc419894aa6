"""Every capability on a tiny model of each family (Llama, Mistral, Qwen2, Qwen3),
against transformers/PEFT or a property that does not depend on our code path.

The models are ``test_families.make_family_model``'s (O(1) activations). Tolerances:
fp32 logits within 1e-5 of the largest (``assert_logits_close``: only summation order
differs); quantized logits as ``tests/test_quant.py`` reasons them (int8 3e-2, int4 0.3
of the largest logit against float; the quantized dispatch equals the float model on
dequantized weights to 1e-5).
"""

from __future__ import annotations

import importlib.util
import io
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from helpers.finetune import write_char_tokenizer
from helpers.hf_reference import assert_logits_close, hf_logits, random_peft_model
from helpers.quant import o1_params
from test_families import _greedy_both, _ids, make_family_model

from neox_jax.convert import load_hf
from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.evaluation import LogLikelihoodScorer
from neox_jax.finetune.lora import LoraConfig, LoraError, init_adapters, lora_apply_fn
from neox_jax.finetune.peft_format import load_peft_adapter, save_peft_adapter
from neox_jax.inference import Generator, SamplingParams
from neox_jax.inference import cli as sample_cli
from neox_jax.model import GPTNeoX
from neox_jax.quant import QuantConfig, dequantize_params, quantize_params
from neox_jax.retrieval import Embedder

_spec = importlib.util.spec_from_file_location(
    "sample_config", Path(__file__).resolve().parents[1] / "configs" / "sample.py"
)
sample_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample_config)

# One tiny model per family, each with its distinguishing options.
FAMILIES = {
    "llama": dict(num_key_value_heads=1),
    "mistral": dict(sliding_window=6),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=24),
}
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = make_family_model(request.param, path, **FAMILIES[request.param])
    config, params = load_hf(path)
    return path, ref, config, params


def _logits(config, params, ids, mask=None):
    return np.asarray(jax.jit(GPTNeoX(config).apply)({"params": params}, ids, None, mask))


def test_lora_adapter_loads_in_peft_with_the_same_logits(family, tmp_path):
    path, _, config, params = family
    lora = LoraConfig(targets=ALL_TARGETS, rank=4, alpha=8.0)
    keys = iter(jax.random.split(jax.random.key(1), 32))
    adapters = jax.tree.map(  # non-zero B: a wrong name, transpose or scale shows
        lambda x: np.asarray(0.2 * jax.random.normal(next(keys), x.shape)),
        init_adapters(config, lora, jax.random.key(0)),
    )
    save_peft_adapter(
        config, adapters, lora, tmp_path / "adapter", base_model_name_or_path=str(path)
    )
    ids = _ids(config.vocab_size, seed=2)
    apply = jax.jit(lora_apply_fn(config, lora, deterministic=True))
    ours = np.asarray(apply(adapters, params, ids, None, None, None))
    assert np.abs(ours - _logits(config, params, ids)).max() > 1e-2 * np.abs(ours).max()
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(base.eval(), tmp_path / "adapter").eval()
    assert_logits_close(ours, hf_logits(theirs, ids))
    back, back_adapters = load_peft_adapter(tmp_path / "adapter", config)
    assert back.targets == ALL_TARGETS
    jax.tree.map(np.testing.assert_array_equal, back_adapters, adapters)
    with pytest.raises(LoraError, match="not layers of this .* model; its targets are q_proj"):
        init_adapters(config, LoraConfig(targets=("query_key_value",)), jax.random.key(0))


def test_peft_made_adapter_imports(family, tmp_path):
    path, ref, config, params = family
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    model = random_peft_model(ref, cfg)
    model.save_pretrained(tmp_path / "theirs")
    ids = _ids(config.vocab_size, seed=3)
    expected = hf_logits(model.eval(), ids)
    lora, adapters = load_peft_adapter(tmp_path / "theirs", config)
    assert lora.targets == ("q_proj", "v_proj", "down_proj")
    apply = jax.jit(lora_apply_fn(config, lora, deterministic=True))
    assert_logits_close(np.asarray(apply(adapters, params, ids, None, None, None)), expected)
    model.unload()  # the fixture's reference model is shared: take PEFT's layers out again


# int8 on Llama (the plain q/k/v + SwiGLU layout), int4 on Qwen3 (plus QK-norm and a
# head_dim of its own); each costs tens of seconds of compiles on 2 cores.
QUANT = {
    "llama": (QuantConfig(bits=8, embed_out=True), 3e-2),
    "qwen3": (QuantConfig(bits=4, group_size=16, symmetric=False), 0.3),
}


def test_quantized_logits(family):
    """On ``o1_params`` (weights N(0, 1/fan_in)), the regime test_quant's bounds are
    derived for; the family's layer names and shapes are what is new here."""
    config = family[2]
    if config.model_type not in QUANT:
        pytest.skip("the quantized layers are the same on Mistral/Qwen2 as on Llama")
    params = o1_params(config)
    qconfig, rel = QUANT[config.model_type]
    qparams = quantize_params(config, params, qconfig)
    names = set(qparams["layers"]["attention"]) | set(qparams["layers"]["mlp"])
    assert {"q_proj", "k_proj", "v_proj", "dense", "gate_proj", "up_proj"} <= names
    assert hasattr(qparams["layers"]["mlp"]["gate_proj"]["kernel"], "dequantize")
    ids = _ids(config.vocab_size, seed=4)
    ours, full = _logits(config, qparams, ids), _logits(config, params, ids)
    np.testing.assert_allclose(
        ours, _logits(config, dequantize_params(qparams), ids), atol=1e-5 * np.abs(full).max()
    )
    assert np.abs(ours - full).max() <= rel * np.abs(full).max()


def test_beam_search_and_samplers_match_transformers(family):
    _, ref, config, params = family
    if config.model_type not in ("mistral", "qwen3"):  # a window under beam search; QK-norm
        pytest.skip("generation is family-independent code; two families keep it fast")
    prompts = [[int(t) for t in row] for row in _ids(config.vocab_size, 2, 7, seed=6)]
    prompts[1] = prompts[1][:3]
    width = 7
    from neox_jax.inference.generate import left_pad

    ids, mask = left_pad(prompts, width)
    kw = dict(num_beams=3, length_penalty=1.0, early_stopping=False)
    with torch.no_grad():
        theirs = ref.generate(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
            do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0,
            eos_token_id=None, **kw,
        ).numpy()[:, width:]  # fmt: skip
    gen = Generator(config, params)
    ours = gen.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True, **kw))
    assert [r.token_ids for r in ours] == [list(row) for row in theirs]
    # Repetition penalty (a transformers logits processor) token for token.
    with torch.no_grad():
        penalised = ref.generate(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
            do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0,
            eos_token_id=None, repetition_penalty=1.8,
        ).numpy()[:, width:]  # fmt: skip
    sampling = SamplingParams(max_new_tokens=8, ignore_eos=True, repetition_penalty=1.8)
    assert [r.token_ids for r in gen.generate(prompts, sampling)] == penalised.tolist()
    # Sampling: top_k=1 at any temperature is greedy; top_p keeps a seed's draw fixed.
    greedy = _greedy_both(ref, config, params, prompts, new=8)[0]
    top1 = SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=1.5, top_k=1, seed=3)
    assert [r.token_ids for r in gen.generate(prompts, top1)] == greedy
    nucleus = SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=0.9, top_p=0.9, seed=7)
    first, again = gen.generate(prompts, nucleus), gen.generate(prompts, nucleus)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]


def test_embeddings_match_transformers_hidden_states(family):
    _, ref, config, params = family
    seqs = [list(map(int, _ids(config.vocab_size, 1, n, seed=n)[0])) for n in (3, 9, 6)]

    class _Tok:  # the Embedder only needs ids here; embed_ids skips the tokenizer
        vocab_size = config.vocab_size

    embedder = Embedder(
        config, params, _Tok(), layer=-1, pooling="mean", normalize=False, batch_size=2
    )
    ours = embedder.embed_ids(seqs)
    rows = []
    for s in seqs:
        with torch.no_grad():
            out = ref(torch.tensor([s]), output_hidden_states=True)
        rows.append(out.hidden_states[-1][0].numpy().mean(0))
    expected = np.stack(rows)
    assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()
    assert jnp.asarray(ours).shape == (3, config.hidden_size)


def test_loglikelihood_scoring_matches_transformers(family):
    """lm-eval style scoring; sums of <= 12 token log-probs, atol 2e-4 as test_evaluation."""
    _, ref, config, params = family
    rng = np.random.default_rng(0)
    requests = [
        (rng.integers(0, config.vocab_size, a).tolist(), rng.integers(0, 96, b).tolist())
        for a, b in [(1, 2), (7, 3), (12, 5)]
    ]
    for (ctx, cont), (logprob, _) in zip(
        requests, LogLikelihoodScorer(config, params, batch_size=2).score(requests), strict=True
    ):
        with torch.no_grad():
            logits = ref(torch.tensor([ctx + cont])).logits[0].double()
        logp = torch.log_softmax(logits, -1).numpy()
        expected = sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))
        assert logprob == pytest.approx(expected, abs=2e-4)


def test_sampling_cli_on_a_family_checkpoint(family, tmp_path):
    """``python -m neox_jax.sample``'s run on the hub folder (plus a tokenizer): the text
    is the tokenizer's decoding of transformers' greedy continuation (restricted, as
    the CLI restricts it, to the tokenizer's ids when the model's vocabulary is padded)."""
    path, ref, config, _ = family
    folder = tmp_path / "model"
    shutil.copytree(path, folder)
    write_char_tokenizer(folder)
    tok = load_tokenizer(folder)
    prompt = "Hello there, "
    ids = tok.encode(prompt)
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False, max_new_tokens=10, min_new_tokens=10, pad_token_id=0,
            eos_token_id=None,  # the CLI samples only ids the tokenizer has (84 of 96):
            suppress_tokens=list(range(tok.vocab_size, config.vocab_size)),
        )[0, len(ids):].tolist()  # fmt: skip
    config_dict = sample_config.get_config("greedy")
    config_dict.update(checkpoint=str(folder), prompt=prompt, max_new_tokens=10, ignore_eos=True)
    stdout = io.StringIO()
    sample_cli.run(config_dict, io.StringIO(""), stdout)
    assert stdout.getvalue() == tok.decode(out, skip_special_tokens=True) + "\n"
