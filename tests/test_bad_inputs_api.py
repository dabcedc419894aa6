"""Library functions fed bad input: the right exception type, a key phrase, and an error
the command-line convention counts as the user's (``cli.is_user_error``). The rows are
listed for users in docs/errors.md (tests/test_bad_inputs.py writes it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import bad_inputs

from neox_jax import cli, config_checks, errors

REPO = Path(__file__).resolve().parents[1]
art = bad_inputs.art  # the module fixture: tiny artifacts every row points at


def _api_load_model(art):
    """`load_model` of a missing path"""
    from neox_jax.loading import load_model

    load_model(art["missing"])


def _api_read_prompts(art):
    """`read_prompts` of a non-UTF-8 file"""
    from neox_jax.inference.cli import read_prompts

    read_prompts(art["latin1_txt"])


def _api_load_json(art):
    """`errors.load_json` of a broken config.json"""
    errors.load_json(art["bad_json_cfg"] / "config.json", "model config")


def _api_sampling(art):
    """`SamplingParams(temperature=-1)`"""
    from neox_jax.inference import SamplingParams

    SamplingParams(temperature=-1.0)


def _api_preprocess_empty(art):
    """`preprocess` of documents that are all empty"""
    from neox_jax.data.preprocess import preprocess

    preprocess([str(art["empty_docs_jsonl"])], str(art["tok"]), str(art["new"]), progress=False)


def _api_indexed_dataset(art):
    """`IndexedDataset` of a missing prefix"""
    from neox_jax.data.indexed_dataset import IndexedDataset

    IndexedDataset(str(art["missing"]))


def _api_load_tokenizer(art):
    """`load_tokenizer` of a missing path"""
    from neox_jax.data.tokenizer import load_tokenizer

    load_tokenizer(art["missing"])


def _dataset(art, name, docs):
    import numpy as np

    from neox_jax.data.indexed_dataset import IndexedDatasetBuilder

    prefix = str(art["root"] / name)
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for doc in docs:
            builder.add_document(np.asarray(doc, np.uint16))
    return prefix


def _api_blend_weights(art):
    """`make_sources` with `data.weights=1,abc`"""
    from neox_jax.training.data import make_sources

    prefix = _dataset(art, "blend", [[5, 6, 7, 8]] * 8)
    data = _load_pretrain_config().data
    data.update(source="indexed", weights="1,abc", seq_len=2)
    make_sources(data, [prefix, prefix], None, 2)


def _api_no_tokens(art):
    """`PretrainSource` of a dataset whose documents are all empty"""
    from neox_jax.data.pretrain_data import PretrainSource

    PretrainSource(_dataset(art, "hollow", [[], []]), 4, 1)


def _load_pretrain_config():
    from configs.pretrain import get_config

    return get_config("tiny")


def _api_choice(art):
    """`config_checks.quantize` with `bits=5`"""
    config_checks.quantize(_load_config("quantize", bits=5))


def _load_config(name, **overrides):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_cfg", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(None)
    config.update(src="a", dst="b", **overrides)
    return config


# (function, exception type, key phrase)
API_CASES = [
    (_api_load_model, Exception, "missing"),
    (_api_read_prompts, errors.UserError, "not UTF-8"),
    (_api_load_json, errors.UserError, "config.json is not valid JSON"),
    (_api_sampling, ValueError, "temperature"),
    (_api_preprocess_empty, ValueError, "empty corpus"),
    (_api_indexed_dataset, Exception, "missing"),
    (_api_load_tokenizer, Exception, "missing"),
    (_api_choice, errors.UserError, "--config.bits=5"),
    (_api_blend_weights, errors.UserError, "data.weights='1,abc'"),
    (_api_no_tokens, errors.UserError, "hollow.*holds no tokens"),
]


@pytest.mark.parametrize("fn,kind,phrase", API_CASES, ids=[c[0].__name__ for c in API_CASES])
def test_bad_api_input(art, fn, kind, phrase):
    with pytest.raises(kind, match=phrase) as info:
        fn(art)
    assert cli.is_user_error(info.value), repr(info.value)
