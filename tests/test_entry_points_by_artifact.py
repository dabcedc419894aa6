"""Every entry point on every kind of model folder (issue #14, items 1 and 5).

One tiny model is written once per module as each kind of artifact the loader reads: a
Hugging Face folder, our checkpoint, a run directory, a LoRA run, a PEFT adapter folder (on
the Hugging Face folder, without a tokenizer of its own), int8 and int4 quantized
checkpoints. Each entry point reads it by path, the way a user's command does (sampling's
``load_generator``, ``Generator(config, params, model_path)``, ``evaluate``'s perplexity,
the lm-eval adapter ``NeoxLM``, ``embed``, the server's engine), and its output is
compared with the same feature run on reference float parameters built in memory,
without the loader:

* HF folder, checkpoint, run directory: the very parameters that were written;
* LoRA run, PEFT adapter: the base with ``W + scale * A @ B`` folded in
  (``finetune.lora.merge``);
* int8 / int4: the quantized parameters dequantized to float32 (what the quantized
  model computes, up to float32 round-off), plus a loose check against the float model.
"""

import io
import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

from neox_jax.convert import save_checkpoint, save_hf
from neox_jax.convert.checkpoint import MODEL_CONFIG, PARAMS, save_items
from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.evaluation import perplexity as ppl
from neox_jax.evaluation.scoring import LogLikelihoodScorer
from neox_jax.finetune.lora import LoraConfig, init_adapters, merge
from neox_jax.finetune.peft_format import save_peft_adapter
from neox_jax.inference import Generator, SamplingParams
from neox_jax.model import ModelConfig, init_params
from neox_jax.quant import QuantConfig, dequantize_params, quantize_params, save_quantized

ROOT = Path(__file__).parents[1]
CHARS = " abcdefghijklmnopqrstuvwxyz.,"
CONFIG = ModelConfig(
    vocab_size=40,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
TEXT = "the quick brown fox jumps over the lazy dog. a cat sat on the mat, then ran."
KINDS = ["hf", "checkpoint", "run", "lora_run", "peft", "int8", "int4"]
# Same float32 arrays through the same program: only summation order may differ.
EXACT = dict(rtol=1e-5, atol=1e-5)
# Quantized weights against their dequantized float copy: the int -> float conversion is
# fused into the matmul, reordering float32 sums over 32-64 terms.
DEQUANT = dict(rtol=1e-4, atol=1e-4)


def _config(name: str, **fields):
    """``configs/<name>.py``'s default config with ``fields`` set (dotted keys nest)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_cfg", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(None)
    for key, value in fields.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def _write_tokenizer(directory: Path) -> Path:
    """One token per character (ids 0 and 1 are <eos> and <pad>)."""
    directory.mkdir(parents=True)
    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<eos>", "<pad>"])
    tok.save(str(directory / "tokenizer.json"))
    special = {"eos_token": "<eos>", "pad_token": "<pad>", "bos_token": None}
    (directory / "tokenizer_config.json").write_text(json.dumps(special))
    return directory


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """``{kind: (path, reference config, reference float params)}`` and the float params."""
    root = tmp_path_factory.mktemp("artifacts")
    tok = _write_tokenizer(root / "tok")
    params = jax.device_get(init_params(CONFIG, jax.random.PRNGKey(0)))
    out = {}
    save_hf(CONFIG, params, root / "hf", tokenizer_dir=tok)
    out["hf"] = (root / "hf", CONFIG, params)
    save_checkpoint(CONFIG, params, root / "ckpt", tokenizer_dir=tok)
    out["checkpoint"] = (root / "ckpt", CONFIG, params)
    # A run directory: step directories are model checkpoints; the tokenizer sits in the run.
    save_checkpoint(CONFIG, params, root / "run" / "checkpoints" / "7")
    _write_tokenizer(root / "run" / "tokenizer")
    out["run"] = (root / "run", CONFIG, params)
    # A LoRA run over the checkpoint, with nonzero adapters (B starts at zero in training).
    lora = LoraConfig(rank=4, alpha=8.0, targets=("query_key_value", "dense_4h_to_h"))
    adapters = init_adapters(CONFIG, lora, jax.random.PRNGKey(1))
    keys = iter(jax.random.split(jax.random.PRNGKey(2), len(jax.tree.leaves(adapters))))
    adapters = jax.tree.map(lambda a: 0.1 * jax.random.normal(next(keys), a.shape), adapters)
    # The trainer's step directory of a LoRA run: the adapters are its params item.
    items = {
        PARAMS: ocp.args.StandardSave(adapters),
        MODEL_CONFIG: ocp.args.JsonSave(CONFIG.to_dict()),
    }
    save_items(items, root / "lora" / "checkpoints" / "3")
    _write_tokenizer(root / "lora" / "tokenizer")
    record = {
        "init_from": str(root / "ckpt"),
        "lora": lora.to_dict(),
        "quantize_bits": 0,
        "seed": 0,
        "model_config": CONFIG.to_dict(),
    }
    (root / "lora" / "lora.json").write_text(json.dumps(record))
    merged = jax.device_get(merge(params, adapters, lora))
    out["lora_run"] = (root / "lora", CONFIG, merged)
    # The same adapters in PEFT's format on the HF folder: load_model merges them onto it.
    save_peft_adapter(
        CONFIG, adapters, lora, root / "peft", base_model_name_or_path=str(root / "hf")
    )
    out["peft"] = (root / "peft", CONFIG, merged)
    for bits, group in ((8, None), (4, 16)):
        qconfig = QuantConfig(bits=bits, group_size=group)
        qparams = quantize_params(CONFIG, params, qconfig)
        save_quantized(CONFIG, qconfig, qparams, root / f"int{bits}", tokenizer_dir=tok)
        reference = jax.device_get(dequantize_params(qparams, "float32"))
        out[f"int{bits}"] = (root / f"int{bits}", CONFIG, reference)
    return out, params, load_tokenizer(tok)


def _tol(kind):
    return DEQUANT if kind.startswith("int") else EXACT


_REFERENCE: dict = {}


def reference(what: str, params, compute):
    """``compute()`` once per entry point and reference parameters (the HF folder, the
    checkpoint and the run directory share theirs): the suite stays fast."""
    key = (what, id(params))
    if key not in _REFERENCE:
        _REFERENCE[key] = compute()
    return _REFERENCE[key]


@pytest.mark.parametrize("kind", KINDS)
def test_sampling(artifacts, kind):
    from neox_jax.inference.cli import load_generator

    arts, _, tok = artifacts
    path, ref_config, ref_params = arts[kind]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, seed=0)
    want = reference(
        "sample",
        ref_params,
        lambda: Generator(ref_config, ref_params, tok).generate(["the cat"], greedy)[0].token_ids,
    )
    generator = load_generator(_config("sample", checkpoint=str(path)))  # the CLI's loader
    assert generator.generate(["the cat"], greedy)[0].token_ids == want
    # Generator(config, params, model_path) finds the tokenizer as load_model finds weights.
    by_path = Generator(generator.config, generator.params, str(path))
    assert by_path.tokenizer.encode(TEXT) == tok.encode(TEXT)


@pytest.mark.parametrize("kind", KINDS)
def test_serving_engine(artifacts, kind):
    """``python -m neox_jax.serve``'s loader and engine (``serve.build``, as the server
    runs them) on each kind: greedy tokens equal the ``Generator`` on the reference."""
    from neox_jax.serve import build

    arts, _, tok = artifacts
    path, ref_config, ref_params = arts[kind]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, seed=0)
    want = reference(
        "sample",
        ref_params,
        lambda: Generator(ref_config, ref_params, tok).generate(["the cat"], greedy)[0].token_ids,
    )
    config = _config(
        "serve", checkpoint=str(path), num_slots=2, max_len=32, prefill_buckets=(16,),
        warmup=False,
    )  # fmt: skip
    engine, _ = build(config, progress=lambda _: None)
    [(ids, _, _)] = engine.generate([tok.encode("the cat")], greedy)
    assert ids == want


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_perplexity(artifacts, kind, tmp_path):
    from neox_jax.evaluation.runner import run

    arts, params, tok = artifacts
    path, ref_config, ref_params = arts[kind]
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT * 2)
    config = _config("evaluate", checkpoint=str(path), **{"perplexity.text_file": str(text)})
    got = run(config, out=io.StringIO())["perplexity"]["text_file"]["perplexity"]

    def perplexity(p):
        scorer = LogLikelihoodScorer(ref_config, p, batch_size=config.batch_size)
        return ppl.perplexity_of_text_file(scorer, tok, text, prefix_token_id=tok.eos_id).perplexity

    want = reference("perplexity", ref_params, lambda: perplexity(ref_params))
    np.testing.assert_allclose(got, want, **_tol(kind))
    if kind.startswith("int"):  # near the float model: int8 within 1%, int4 within 10%
        float_ppl = reference("perplexity", params, lambda: perplexity(params))
        np.testing.assert_allclose(got, float_ppl, rtol=0.01 if kind == "int8" else 0.1)


@pytest.mark.parametrize("kind", KINDS)
def test_lm_eval_adapter(artifacts, kind):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from neox_jax.evaluation.lm_eval_adapter import NeoxLM

    arts, _, tok = artifacts
    path, ref_config, ref_params = arts[kind]
    requests = [
        Instance("loglikelihood", {}, ("the quick brown", " fox"), 0),
        Instance("loglikelihood", {}, ("a cat sat on", " the mat."), 1),
    ]
    got = NeoxLM(checkpoint=str(path), batch_size=2).loglikelihood(requests)
    want = reference(
        "lm_eval",
        ref_params,
        lambda: NeoxLM(config=ref_config, params=ref_params, tokenizer=tok).loglikelihood(requests),
    )
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], **_tol(kind))
    assert [g[1] for g in got] == [w[1] for w in want]  # greedy or not


@pytest.mark.parametrize("kind", KINDS)
def test_embed(artifacts, kind, tmp_path):
    pytest.importorskip("faiss")
    from neox_jax.retrieval.cli import _embedder, build_from_config
    from neox_jax.retrieval.rag import embed_corpus, read_corpus

    arts, _, tok = artifacts
    path, ref_config, ref_params = arts[kind]
    corpus = tmp_path / "docs.jsonl"
    docs = [{"id": str(i), "text": TEXT[i * 7 :]} for i in range(4)]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    config = _config(
        "rag",
        checkpoint=str(path),
        corpus=str(corpus),
        index_dir=str(tmp_path / "index"),
        chunk_tokens=32,
        chunk_overlap=4,
    )
    build_from_config(config, out=io.StringIO())  # what `python -m neox_jax.embed` runs
    got = np.load(tmp_path / "index" / "embeddings.npy")
    want = reference(
        "embed",
        ref_params,
        lambda: embed_corpus(
            _embedder(config, ref_config, ref_params, tok),
            read_corpus(corpus),
            chunk_tokens=32,
            overlap=4,
        )[1],
    )
    assert got.shape == want.shape and got.shape[0] >= 4
    np.testing.assert_allclose(got, want, **_tol(kind))
