"""Where the generation config comes from, as transformers decides it.

* A Hugging Face folder without ``generation_config.json``: transformers' ``generate``
  stops at the ``eos_token_id`` of ``config.json`` (an int or a list;
  ``GenerationConfig.from_pretrained(folder, config_file_name="config.json")``), not at
  the tokenizer's eos.
* A tokenizer from another folder: the generation config still belongs to the model, so
  the model folder's ``generation_config.json`` decides the eos ids and the server's
  sampling defaults.

The reference is transformers' greedy ``generate`` on the model folder (a tiny random
Llama and a real byte-level BPE written by transformers; see
``test_bos_and_generation_config``).
"""

import json
import shutil

import pytest
import transformers
from helpers.hf_reference import train_byte_level_bpe
from ml_collections import ConfigDict
from test_bos_and_generation_config import CORPUS, EOS, _hf_greedy, _llama_folder

from neox_jax.convert import save_hf
from neox_jax.convert.checkpoint import save_checkpoint
from neox_jax.data.generation_config import GENERATION_FILE, read_generation_config
from neox_jax.data.tokenizer import copy_tokenizer, load_tokenizer
from neox_jax.inference import Generator, SamplingParams
from neox_jax.loading import load_from_config, load_model, load_model_and_tokenizer
from neox_jax.serve import sampling_defaults

PROMPT = "the quick fox"
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``(folder, free, k, absent)``: the folder with no generation_config.json; ``free``
    the greedy continuation ignoring every eos, ``free[k]`` its first token not seen
    before it (what we make the eos), ``absent`` an id never generated."""
    path = _llama_folder(tmp_path_factory.mktemp("llama"))
    (path / GENERATION_FILE).unlink(missing_ok=True)  # save_pretrained may write one
    config, params, tok = load_model_and_tokenizer(path)
    free = Generator(config, params, tok).generate(
        [PROMPT], SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    )[0].token_ids
    k = next(i for i in range(3, len(free)) if free[i] not in free[:i])
    absent = next(i for i in range(3, 300) if i not in free)
    assert EOS not in free[: k + 1]  # the tokenizer's eos would not stop it there
    return path, free, k, absent


def _set_config_eos(path, eos):
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = eos
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("as_list", [False, True], ids=["int", "list"])
def test_config_json_eos_ends_generation_without_a_generation_config(folder, as_list):
    path, free, k, absent = folder
    _set_config_eos(path, [absent, free[k]] if as_list else free[k])
    assert not (path / GENERATION_FILE).exists()
    prompt_ids, ref = _hf_greedy(path, PROMPT, 16)
    assert ref == free[: k + 1]  # transformers stopped at config.json's eos
    config, params, tok = load_model_and_tokenizer(path)
    assert tok.eos_id == EOS and tok.eos_ids == ((absent, free[k]) if as_list else (free[k],))
    out = Generator(config, params, tok).generate([PROMPT], GREEDY)[0]
    assert (out.prompt_token_ids, out.token_ids, out.finish_reason) == (prompt_ids, ref, "eos")


def test_config_json_eos_travels_into_checkpoints_and_exports(folder, tmp_path):
    path, free, k, absent = folder
    _set_config_eos(path, [absent, free[k]])
    want = transformers.AutoModelForCausalLM.from_pretrained(path).generation_config
    config, params = load_model(path)
    ckpt = save_checkpoint(config, params, tmp_path / "ckpt", tokenizer_dir=path)
    assert load_model_and_tokenizer(ckpt)[2].eos_ids == (absent, free[k])
    copy_tokenizer(path / "tokenizer.json", tmp_path / "copied")  # a run's data.tokenizer
    assert load_tokenizer(tmp_path / "copied").eos_ids == (absent, free[k])
    out = save_hf(config, params, tmp_path / "hf", tokenizer_dir=ckpt / "tokenizer")
    ref = transformers.GenerationConfig.from_pretrained(out)
    assert ref.eos_token_id == want.eos_token_id == [absent, free[k]]
    assert ref.bos_token_id == want.bos_token_id


def test_model_config_placeholders_are_not_ids(tmp_path):
    """Old Llama ports wrote ``pad_token_id: -1``; transformers loads them, so must we."""
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5, "pad_token_id": -1}))
    gen = read_generation_config(tmp_path)
    assert (gen.eos_token_ids, gen.pad_token_id, gen.sampling) == ((5,), None, {})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "top_k": 2}))
    assert read_generation_config(tmp_path) is None  # an MoE's top_k is no sampling default


# config.json of composite models, which nest the language model's ids (shapes as on the
# hub: Gemma-3 and Llama-4 name them only in text_config; Qwen2-VL at both levels).
COMPOSITE = {
    "gemma3": {"text_config": {"eos_token_id": [1, 106], "bos_token_id": 2, "pad_token_id": 0}},
    "llama4": {"text_config": {"eos_token_id": [7, 8, 9], "bos_token_id": 6}},
    "qwen2_vl": {"eos_token_id": 5, "text_config": {"eos_token_id": 9, "pad_token_id": 4}},
    "decoder_first": {"decoder": {"bos_token_id": 3}, "text_config": {"bos_token_id": 4}},
    "empty_decoder": {"decoder": {}, "text_config": {"eos_token_id": 11}},
}


@pytest.mark.parametrize("name", COMPOSITE)
def test_nested_text_config_ids_as_transformers_reads_them(tmp_path, name):
    """The reference: transformers' fallback for a folder without generation_config.json
    (``GenerationConfig.from_pretrained(..., config_file_name="config.json",
    _from_model_config=True)``, i.e. ``from_model_config`` on the file's dict)."""
    config = {"model_type": name, "architectures": ["X"], **COMPOSITE[name]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ref = transformers.GenerationConfig.from_pretrained(
        tmp_path, config_file_name="config.json", _from_model_config=True
    )
    gen = read_generation_config(tmp_path)
    eos = ref.eos_token_id if isinstance(ref.eos_token_id, list) else [ref.eos_token_id]
    assert gen.eos_token_ids == tuple(e for e in eos if e is not None)
    assert (gen.bos_token_id, gen.pad_token_id) == (ref.bos_token_id, ref.pad_token_id)


def test_a_composite_models_tokenizer_folder_stops_at_its_text_config_eos(tmp_path):
    """A Gemma-3-style tokenizer folder as data.tokenizer: its eos ids, which only the
    nested text_config names, reach the tokenizer and travel with copies of it."""
    folder = tmp_path / "gemma3"
    folder.mkdir()
    train_byte_level_bpe(folder, CORPUS, 300, {}, special_tokens=("<unk>", "<s>", "</s>"))
    nested = {"eos_token_id": [2, 7], "bos_token_id": 1}
    config = {"model_type": "gemma3", "text_config": nested}
    (folder / "config.json").write_text(json.dumps(config))
    assert load_tokenizer(folder).eos_ids == (2, 7)
    copy_tokenizer(folder / "tokenizer.json", tmp_path / "copied")
    assert load_tokenizer(tmp_path / "copied").eos_ids == (2, 7)
    copied = transformers.GenerationConfig.from_pretrained(tmp_path / "copied")
    assert (copied.eos_token_id, copied.bos_token_id) == ([2, 7], 1)


def test_the_model_folder_decides_when_the_tokenizer_is_elsewhere(folder, tmp_path):
    path, free, k, absent = folder
    _set_config_eos(path, EOS)
    elsewhere = tmp_path / "tok"
    copy_tokenizer(path, elsewhere)
    # The tokenizer's folder says something else; the model's folder decides.
    (elsewhere / GENERATION_FILE).write_text(json.dumps({"eos_token_id": absent, "top_k": 3}))
    model_gen = {"eos_token_id": [absent, free[k]], "temperature": 0.6}
    (path / GENERATION_FILE).write_text(json.dumps(model_gen))
    try:
        prompt_ids, ref = _hf_greedy(path, PROMPT, 16)
        assert ref == free[: k + 1]
        common = dict(dtype="", attention_impl="", rope_scaling_type="", rope_scaling_factor=None)
        for tokenizer in (elsewhere, elsewhere / "tokenizer.json"):
            cli = ConfigDict(dict(checkpoint=str(path), tokenizer=str(tokenizer), **common))
            config, params, tok = load_from_config(cli)  # what sample and serve load
            assert tok.eos_ids == (absent, free[k])
            assert sampling_defaults("auto", tok) == {"temperature": 0.6}
        out = Generator(config, params, tok).generate([PROMPT], GREEDY)[0]
        assert (out.prompt_token_ids, out.token_ids) == (prompt_ids, ref)
        # Our checkpoint keeps the model's generation config with its tokenizer files.
        ckpt = save_checkpoint(config, params, tmp_path / "ckpt", tokenizer_dir=path)
        tok = load_model_and_tokenizer(ckpt, elsewhere)[2]
        assert tok.eos_ids == (absent, free[k])
        # A model that names nothing keeps the tokenizer folder's.
        bare = tmp_path / "bare"
        shutil.copytree(ckpt, bare)
        (bare / "tokenizer" / GENERATION_FILE).unlink()
        assert load_model_and_tokenizer(bare, elsewhere)[2].eos_ids == (absent,)
    finally:
        (path / GENERATION_FILE).unlink()
