"""Llama/Mistral-style Hugging Face folders: a tokenizer that adds BOS, and a
generation_config.json that lists several eos ids, read as transformers reads them.

The folder is written by transformers itself: a tiny random ``LlamaForCausalLM`` and a
real ``tokenizers`` byte-level BPE saved through ``PreTrainedTokenizerFast(...,
add_bos_token=True)``, whose tokenizer.json post_processor then prepends ``<s>``. The
references are transformers on the same folder: ``AutoTokenizer.from_pretrained(folder)
(text).input_ids`` for every text we encode for a model, greedy ``generate`` (which stops at
every id of the folder's generation config) for the Generator and the serving engine,
and the model's own loss for perplexity. A GPT-NeoX/Pythia-style tokenizer must keep
adding nothing.
"""

import json

import pytest
import torch
import transformers
from fastapi.testclient import TestClient
from helpers.hf_reference import train_byte_level_bpe
from test_families import make_family_model
from test_serving_tools import ScriptedEngine

from neox_jax.convert import save_hf
from neox_jax.convert.checkpoint import save_checkpoint
from neox_jax.data.generation_config import read_generation_config
from neox_jax.data.tokenizer import copy_tokenizer, load_tokenizer
from neox_jax.errors import UserError
from neox_jax.evaluation.fewshot import encode_pair
from neox_jax.evaluation.perplexity import perplexity_of_text
from neox_jax.evaluation.scoring import LogLikelihoodScorer
from neox_jax.finetune.chat import encode_chat
from neox_jax.inference import Generator, SamplingParams
from neox_jax.loading import load_model, load_model_and_tokenizer
from neox_jax.quant import QuantConfig
from neox_jax.quantize import quantize_checkpoint
from neox_jax.serve import sampling_defaults
from neox_jax.serving import Collector, Engine, Request
from neox_jax.serving.api import create_app

CORPUS = ["the quick brown fox jumps over the lazy dog", "a model reads tokens, then more"] * 20
TEXTS = ["the quick fox", " lazy dog!", "tokens\n\nthen", "x", "<s> the dog", "fox</s>"]
VOCAB = 320  # the model's; the tokenizer has 300 (a padded model vocabulary)
BOS, EOS = 1, 2  # "<unk>", "<s>", "</s>" are the first three tokens


def _llama_folder(path):
    make_family_model("llama", path, vocab_size=VOCAB)
    train_byte_level_bpe(path, CORPUS, 300, {}, special_tokens=("<unk>", "<s>", "</s>"))
    transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", add_bos_token=True,
    ).save_pretrained(path)  # fmt: skip
    return path


def _write_generation_config(path, **fields):
    (path / "generation_config.json").write_text(json.dumps(fields))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _llama_folder(tmp_path_factory.mktemp("llama"))


# ------------------------------------------------------------------ BOS
def test_text_for_a_model_is_encoded_as_transformers_tokenizer_encodes_it(llama):
    ours, theirs = load_tokenizer(llama), transformers.AutoTokenizer.from_pretrained(llama)
    assert ours.add_bos_token and ours.special_prefix == (BOS,) and not ours.special_suffix
    for text in TEXTS:
        ref = theirs(text).input_ids
        if text.startswith("<s>"):  # transformers adds a second bos; we never do
            assert ref[:2] == [BOS, BOS]
            ref = ref[1:]
        assert ours.encode(text, add_special_tokens=True) == ref, text
        assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids, text
    batch = ours.encode_batch(TEXTS[:3], add_special_tokens=True, padding=None)
    assert batch == [theirs(t).input_ids for t in TEXTS[:3]]


def test_gpt_neox_tokenizer_still_adds_nothing(tmp_path):
    config = {"tokenizer_class": "GPTNeoXTokenizer", "eos_token": "<|endoftext|>",
              "bos_token": "<|endoftext|>", "add_bos_token": False}  # as Pythia's  # fmt: skip
    ours = train_byte_level_bpe(tmp_path, CORPUS, 300, config)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert not ours.add_bos_token and ours.special_prefix == ours.special_suffix == ()
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=True) == theirs(text).input_ids, text
        assert ours.encode(text, add_special_tokens=True) == ours.encode(text)


def test_chat_template_prompt_has_one_bos(llama):
    """The template writes "<s>" itself; rendering encodes without added special tokens,
    as ``apply_chat_template(tokenize=True)`` does."""
    template = "<s>{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    messages = [{"role": "user", "content": "the quick fox"}]
    ours = encode_chat(messages, load_tokenizer(llama), template)
    theirs = transformers.AutoTokenizer.from_pretrained(llama)
    ref = theirs.apply_chat_template(messages, chat_template=template, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict | transformers.BatchEncoding) else ref
    assert ours == list(ref) and ours.count(BOS) == 1 and ours[0] == BOS


def test_perplexity_scores_the_ids_transformers_scores(llama):
    """The HF perplexity recipe: ``tokenizer(text)`` (with the bos) and the model's mean
    loss over every token after the first."""
    text = "the quick brown fox jumps over the lazy dog"
    config, params, tok = load_model_and_tokenizer(llama)
    res = perplexity_of_text(LogLikelihoodScorer(config, params), tok, text)
    ids = transformers.AutoTokenizer.from_pretrained(llama)(text, return_tensors="pt").input_ids
    model = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    with torch.no_grad():
        loss = float(model(ids, labels=ids).loss)
    assert res.num_tokens == ids.shape[1] - 1
    # Both fp32 sums of ~10 log-probabilities of O(1) logits: round-off ~1e-6.
    assert res.nll / res.num_tokens == pytest.approx(loss, rel=1e-5)


# --------------------------------------------------------- generation_config
def _hf_greedy(folder, prompt, max_new):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False)
    return ids[0].tolist(), out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def stopping(llama):
    """The folder with generation_config.json listing ``[absent, stop]``: ``stop`` is the
    first token of the free continuation that did not occur before it (the second entry of
    the list ends generation), ``absent`` one never generated."""
    config, params, tok = load_model_and_tokenizer(llama)
    free = Generator(config, params, tok).generate(
        ["the quick fox"], SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    )[0]
    seq = free.token_ids
    k = next(i for i in range(3, len(seq)) if seq[i] not in seq[:i])
    absent = next(i for i in range(3, VOCAB) if i not in seq)
    _write_generation_config(
        llama, eos_token_id=[absent, seq[k]], bos_token_id=BOS, pad_token_id=0,
        do_sample=True, temperature=0.6, top_p=0.9,
    )  # fmt: skip
    return llama, seq, k


def test_generator_stops_at_every_eos_of_the_generation_config(stopping):
    folder, free, k = stopping
    prompt_ids, ref = _hf_greedy(folder, "the quick fox", 16)
    assert ref == free[: k + 1]  # transformers stopped at the list's second id
    config, params, tok = load_model_and_tokenizer(folder)
    assert tok.eos_ids == (read_generation_config(folder).eos_token_ids)
    gen = Generator(config, params, tok)
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    out = gen.generate(["the quick fox"], greedy)[0]
    assert out.prompt_token_ids == prompt_ids and prompt_ids[0] == BOS
    assert (out.token_ids, out.finish_reason) == (ref, "eos")
    # ignore_eos ignores every one of them; a request's stop id ends it earlier.
    assert gen.generate(["the quick fox"], SamplingParams(
        max_new_tokens=16, temperature=0.0, ignore_eos=True))[0].token_ids == free  # fmt: skip
    early = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=(free[1],))
    assert gen.generate(["the quick fox"], early)[0].finish_reason == "stop"


def test_serving_engine_stops_at_every_eos_of_the_generation_config(stopping):
    folder, free, k = stopping
    prompt_ids, ref = _hf_greedy(folder, "the quick fox", 16)
    config, params, tok = load_model_and_tokenizer(folder)
    engine = Engine(config, params, tok, num_slots=2, max_len=64, prefill_buckets=(16,))
    cases = [
        (SamplingParams(max_new_tokens=16, temperature=0.0), ref, "stop"),  # OpenAI: eos = stop
        (SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True), free, "length"),
    ]
    sinks = [Collector() for _ in cases]
    pairs = zip(cases, sinks, strict=True)
    engine.submit_many([Request(prompt_ids, s, c) for (s, _, _), c in pairs])
    while engine.free_slots < engine.num_slots or engine.queue_length:
        engine.step()
    for (_, want, reason), c in zip(cases, sinks, strict=True):
        ids, _, got = c.result(timeout=0)
        assert (ids, got) == (want, reason)
    with pytest.raises(UserError, match="max_stop_ids"):
        Engine(config, params, tok, num_slots=1, max_len=64, stop_width=1)


class _Recording(ScriptedEngine):
    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.samplings = []

    def submit_many(self, requests):
        self.samplings += [r.sampling for r in requests]
        super().submit_many(requests)


def test_server_encodes_text_prompts_with_bos_and_takes_sampling_defaults(stopping):
    folder, _, _ = stopping
    tok, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    engine = _Recording(tok)
    engine.replies = ["fox", "dog", "x"]
    defaults = sampling_defaults("auto", tok)
    assert defaults == {"temperature": 0.6, "top_p": 0.9}
    app = create_app(engine, model_name="m", chat_template="<s>{{ messages[0]['content'] }}",
                     sampling_defaults=defaults)  # fmt: skip
    with TestClient(app) as client:
        body = {"prompt": "the quick fox", "max_tokens": 4}
        assert client.post("/v1/completions", json=body).status_code == 200
        chat = {"messages": [{"role": "user", "content": "the dog"}], "temperature": 0.0}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        tokens = client.post("/tokenize", json={"prompt": "the quick fox"}).json()["tokens"]
        assert client.post("/v1/completions", json={**body, "top_p": 0.5}).status_code == 200
        info = client.get("/tokenizer_info").json()
    assert engine.prompts[0] == tokens == theirs("the quick fox").input_ids
    assert engine.prompts[1] == [BOS, *tok.encode("the dog")]  # the template's bos only
    assert info["add_bos_token"] is True
    first, chat_s, last = engine.samplings
    assert (first.temperature, first.top_p) == (0.6, 0.9)  # unset: generation_config's
    assert (chat_s.temperature, chat_s.top_p) == (0.0, 0.9)
    assert (last.temperature, last.top_p) == (0.6, 0.5)  # a request's own value wins
    assert sampling_defaults("none", tok) is None


def test_greedy_generation_config_and_bad_files(tmp_path):
    _write_generation_config(tmp_path, do_sample=False, temperature=0.7, top_k=20)
    assert read_generation_config(tmp_path).sampling_defaults() == {
        "temperature": 0.0,  # do_sample=false: transformers decodes greedily
        "top_k": 20,
    }
    for bad, field in (({"eos_token_id": "2"}, "eos_token_id"), ({"top_k": 0.5}, "top_k"),
                       ({"pad_token_id": [0, 1]}, "pad_token_id")):  # fmt: skip
        _write_generation_config(tmp_path, **bad)
        with pytest.raises(UserError, match=f"generation_config.json: {field}"):
            read_generation_config(tmp_path)


def test_generation_config_travels_into_checkpoints_and_exports(stopping, tmp_path):
    folder, _, _ = stopping
    want = read_generation_config(folder).eos_token_ids
    config, params = load_model(folder)
    ckpt = save_checkpoint(config, params, tmp_path / "ckpt", tokenizer_dir=folder)
    _, _, tok = load_model_and_tokenizer(ckpt)
    assert tok.eos_ids == want and tok.add_bos_token
    copy_tokenizer(folder / "tokenizer.json", tmp_path / "copied")  # a run's data.tokenizer
    assert load_tokenizer(tmp_path / "copied").eos_ids == want
    quantized = quantize_checkpoint(
        str(folder), str(tmp_path / "q"), QuantConfig(bits=8), log=lambda *a: None
    )
    assert load_model_and_tokenizer(quantized)[2].eos_ids == want
    out = save_hf(config, params, tmp_path / "hf", tokenizer_dir=ckpt / "tokenizer")
    ref = transformers.GenerationConfig.from_pretrained(out)
    assert ref.eos_token_id == list(want) and ref.temperature == 0.6
    text = "the quick fox"
    assert transformers.AutoTokenizer.from_pretrained(out)(text).input_ids == tok.encode(
        text, add_special_tokens=True
    )


def test_a_family_export_names_its_tokenizers_ids_not_the_class_defaults(llama, tmp_path):
    """transformers' ``generate`` falls back to config.json's ids without a
    generation_config.json: a Llama export with a tokenizer of other ids (pad 0, eos 1,
    bos 2; LlamaConfig's defaults are bos 1, eos 2, no pad) must name the tokenizer's.
    A generation config transformers derived from a model config (``_from_model_config``,
    as a folder converted from Hugging Face carries it) is that config's ids, unset ones
    included, so the export's config.json says exactly those."""
    config, params = load_model(llama)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    config_json = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    tok = train_byte_level_bpe(tok_dir, CORPUS, 300, config_json, ("<pad>", "</s>", "<s>"))
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.generation) == (0, 1, 2, None)
    out = save_hf(config, params, tmp_path / "fresh", tokenizer_dir=tok_dir)
    hf_config = transformers.AutoConfig.from_pretrained(out)
    assert (hf_config.bos_token_id, hf_config.eos_token_id, hf_config.pad_token_id) == (2, 1, 0)
    ref = transformers.GenerationConfig.from_model_config(hf_config)
    assert (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (2, 1, 0)

    _write_generation_config(tok_dir, _from_model_config=True, eos_token_id=[1, 2])
    out = save_hf(config, params, tmp_path / "mirrored", tokenizer_dir=tok_dir)
    hf_config = transformers.AutoConfig.from_pretrained(out)
    assert (hf_config.bos_token_id, hf_config.eos_token_id, hf_config.pad_token_id) == (
        None, [1, 2], None,
    )  # fmt: skip
    _write_generation_config(tok_dir, eos_token_id=2)  # the model's own file: it, then tok
    out = save_hf(config, params, tmp_path / "own", tokenizer_dir=tok_dir)
    hf_config = transformers.AutoConfig.from_pretrained(out)
    assert (hf_config.bos_token_id, hf_config.eos_token_id, hf_config.pad_token_id) == (2, 2, 0)


def test_lm_eval_adapter_scores_as_lm_evals_hf_model(llama):
    """lm-eval's own Hugging Face model on the folder is the reference: the same ids
    (its ``tok_encode`` adds what the tokenizer adds, bos as the empty-context and rolling
    prefix) and the same log-likelihoods."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from neox_jax.evaluation.lm_eval_adapter import NeoxLM

    ref = HFLM(pretrained=str(llama), device="cpu", batch_size=1, dtype="float32")
    config, params, tok = load_model_and_tokenizer(llama)
    ours = NeoxLM(config=config, params=params, tokenizer=tok, batch_size=2, max_length=64)
    assert ours.prefix_token_id == ref.prefix_token_id == BOS
    for text in ("the quick fox", "<s> the dog"):
        assert ours.tok_encode(text) == ref.tok_encode(text), text
        plain = ours.tok_encode(text, add_special_tokens=False)
        assert plain == ref.tok_encode(text, add_special_tokens=False), text
    pairs = [("the quick", " fox"), ("the lazy ", "dog"), ("", "tokens then")]
    for context, continuation in pairs[:2]:  # our few-shot runner splits pairs the same way
        want = tuple(map(list, ref._encode_pair(context, continuation)))
        assert encode_pair(tok, context, continuation) == want
    assert encode_pair(tok, "", "dog") == ([BOS], tok.encode("dog"))  # lm-eval's prefix
    for kind, args in (("loglikelihood", pairs), ("loglikelihood_rolling", [(CORPUS[0],)])):
        reqs = [Instance(kind, {}, a, i) for i, a in enumerate(args)]
        got, want = getattr(ours, kind)(reqs), getattr(ref, kind)(reqs)
        # fp32 on both sides, sums of ~10 log-probs of O(1) logits: round-off ~1e-5.
        got = [g[0] if isinstance(g, tuple) else g for g in got]
        want = [w[0] if isinstance(w, tuple) else w for w in want]
        assert got == pytest.approx(want, abs=2e-4), kind


def test_sft_raw_prompt_starts_with_the_bos_and_chat_examples_keep_one(llama):
    """TRL's prompt-completion encoding: ``tokenizer(prompt)`` (with the bos), the
    completion without special tokens, then eos; a chat example's bos is its template's."""
    from neox_jax.finetune.chat import ChatTemplate
    from neox_jax.finetune.sft_data import tokenize_record

    tok, theirs = load_tokenizer(llama), transformers.AutoTokenizer.from_pretrained(llama)
    chat = ChatTemplate.for_tokenizer(
        tok, "<s>{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    ids, mask = tokenize_record({"prompt": "the quick", "completion": " fox"}, tok, chat)
    prompt = theirs("the quick").input_ids
    completion = theirs(" fox", add_special_tokens=False).input_ids + [EOS]
    assert (ids, mask) == (prompt + completion, [0] * len(prompt) + [1] * len(completion))
    turns = [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": " x"}]
    ids, _ = tokenize_record({"messages": turns}, tok, chat)
    assert ids[:2] != [BOS, BOS] and ids[0] == BOS and ids.count(BOS) == 1


def test_embeddings_and_rag_chunks_start_with_the_bos(llama):
    """``embed(text)`` pools transformers' final hidden states of ``tokenizer(text)``
    (with the bos), and a corpus chunk is embedded the same way as a query of its text."""
    from neox_jax.retrieval import Embedder
    from neox_jax.retrieval.rag import embed_corpus

    config, params, tok = load_model_and_tokenizer(llama)
    embedder = Embedder(config, params, tok, normalize=False, batch_size=2)
    text = "the quick brown fox"
    ids = transformers.AutoTokenizer.from_pretrained(llama)(text, return_tensors="pt").input_ids
    model = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states[-1][0]
    ref = states.mean(0).numpy()
    # fp32 on both sides, O(1) states: round-off ~1e-6 of the scale.
    assert embedder.embed([text])[0] == pytest.approx(ref, abs=float(1e-4 * abs(ref).max()))
    chunks, vectors = embed_corpus(
        embedder, [{"id": "d", "text": text}], chunk_tokens=16, overlap=4
    )
    assert len(chunks) == 1 and list(chunks[0].token_ids) == tok.encode(text)
    assert vectors[0] == pytest.approx(ref, abs=float(1e-4 * abs(ref).max()))
