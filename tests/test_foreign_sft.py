"""SFT records in the formats other tools write: OpenAI, ShareGPT, Alpaca, TRL.

The reference for ids and loss mask is transformers' ``apply_chat_template(...,
return_assistant_tokens_mask=True)`` on the conversation written out by hand in the
test, with a ChatML template whose ``{% generation %}`` block covers what the assistant
writes (its content and the end of its turn).
"""

import json

import datasets
import pytest
import transformers
from helpers.finetune import CHAT, CHATML, write_char_tokenizer, write_jsonl

from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.finetune.sft_data import SFTDataError, load_examples


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_char_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def hf(tok):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok.path), chat_template=CHATML)


def _ours(tmp_path, tok, records, **kw):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    examples, _ = load_examples(path, tok, max_len=1024, chat_template=CHATML, **kw)
    return [(ids.tolist(), mask.tolist()) for ids, mask in examples]


def _reference(hf, messages):
    ref = hf.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    return list(ref["input_ids"]), list(ref["assistant_masks"])


OPENAI = {
    "messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "name": "ann", "content": [
            {"type": "text", "text": "2+3?"}, {"type": "text", "text": "Say it."}]},
        {"role": "assistant", "content": "5"},
        {"role": "developer", "content": "Now terse."},
        {"role": "user", "content": "Reverse abc"},
        {"role": "assistant", "content": [{"type": "text", "text": "cba"}]},
    ]
}  # fmt: skip
# The same conversation as transformers takes it: parts joined by newlines (as the server
# joins them), "developer" as "system", the name passed to the template.
OPENAI_AS_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "name": "ann", "content": "2+3?\nSay it."},
    {"role": "assistant", "content": "5"},
    {"role": "system", "content": "Now terse."},
    {"role": "user", "content": "Reverse abc"},
    {"role": "assistant", "content": "cba"},
]
SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "2+3?"},
        {"from": "gpt", "value": "5"},
        {"from": "human", "value": "Reverse abc"},
        {"from": "gpt", "value": "cba"},
    ]
}
SHAREGPT_AS_MESSAGES = CHAT
ALPACA = [
    {"instruction": "Reverse the word.", "input": "abc", "output": "cba"},
    {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be kind."},
]
ALPACA_AS_MESSAGES = [
    [
        {"role": "user", "content": "Reverse the word.\n\nabc"},
        {"role": "assistant", "content": "cba"},
    ],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"},
    ],
]
# Databricks Dolly's fields; LLaMA-Factory's ShareGPT with the system prompt beside the turns.
DOLLY = {"instruction": "Reverse the word.", "context": "abc", "response": "cba",
         "category": "open_qa"}  # fmt: skip
LLAMA_FACTORY = {"conversations": SHAREGPT["conversations"][1:], "system": "Be brief."}
TRL = {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}],
    "completion": [{"role": "assistant", "content": "5"}],
}


@pytest.mark.parametrize(
    ("record", "messages"),
    [
        (OPENAI, OPENAI_AS_MESSAGES),
        (SHAREGPT, SHAREGPT_AS_MESSAGES),
        (ALPACA[0], ALPACA_AS_MESSAGES[0]),
        (ALPACA[1], ALPACA_AS_MESSAGES[1]),
        (TRL, SHAREGPT_AS_MESSAGES[:3]),
        (DOLLY, ALPACA_AS_MESSAGES[0]),
        (LLAMA_FACTORY, SHAREGPT_AS_MESSAGES),
    ],
    ids=[
        "openai",
        "sharegpt",
        "alpaca",
        "alpaca_system",
        "trl_conversational",
        "dolly",
        "llama_factory_sharegpt",
    ],  # fmt: skip
)
def test_loss_mask_is_the_assistant_tokens_as_transformers_finds_them(
    tmp_path, tok, hf, record, messages
):
    (got,) = _ours(tmp_path, tok, [record])
    assert got == _reference(hf, messages)
    assert sum(got[1]) > 0


def test_same_examples_from_a_parquet_dataset(tmp_path, tok):
    # datasets writes every record with every field: a message without "name" gets a null
    # one, and a ShareGPT record null "messages". Both must read as in the jsonl.
    records = [OPENAI_AS_MESSAGES, SHAREGPT_AS_MESSAGES]
    rows = [{"messages": m, "conversations": None} for m in records]
    rows.append({"messages": None, "conversations": SHAREGPT["conversations"]})
    folder = tmp_path / "ds"
    folder.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    via_hf, _ = load_examples(f"hf:{folder}", tok, max_len=1024, chat_template=CHATML)
    direct = _ours(tmp_path, tok, [{"messages": m} for m in records] + [SHAREGPT])
    assert [(i.tolist(), m.tolist()) for i, m in via_hf] == direct


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                       {"role": "assistant", "content": "a cat"}]},
         "content\\[0\\] is a 'image_url' part; SFT trains on text only"),
        ({"conversations": [{"from": "human", "value": "x"},
                            {"from": "function_call", "value": "{}"}]},
         "ShareGPT conversations\\[1\\] is from 'function_call'"),
        ({"prompt": "x", "chosen": "a", "rejected": "b"}, "preference pair .*DPO"),
        ({"text": "plain"}, "fields \\['text'\\] is in no SFT format.*ShareGPT.*Alpaca"),
        ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
          "completion": [{"role": "assistant", "content": "c"}]}, "prompt with assistant turns"),
        ({"instruction": "a", "output": "b", "history": [["q", "r"]]}, "'history'"),
    ],
    ids=["image_part", "sharegpt_speaker", "preference", "text", "trl_assistant_in_prompt",
         "alpaca_history"],
)  # fmt: skip
def test_unsupported_formats_are_named(tmp_path, tok, record, message):
    with pytest.raises(SFTDataError, match=message):
        _ours(tmp_path, tok, [record])


def test_sft_files_as_other_tools_write_them(tmp_path, tok):
    # Stanford Alpaca's alpaca_data.json is one indented JSON array (here pandas writes it);
    # ShareGPT dumps come as .jsonl.gz (datasets); parquet without the hf: prefix.
    import pandas as pd

    pd.DataFrame(ALPACA).to_json(tmp_path / "alpaca_data.json", orient="records", indent=4)
    datasets.Dataset.from_list([SHAREGPT] * 2).to_json(
        str(tmp_path / "sharegpt.jsonl.gz"), compression="gzip"
    )
    datasets.Dataset.from_list([SHAREGPT] * 2).to_parquet(str(tmp_path / "sharegpt.parquet"))
    expected = {
        "alpaca_data.json": _ours(tmp_path, tok, ALPACA),
        "sharegpt.jsonl.gz": _ours(tmp_path, tok, [SHAREGPT] * 2),
        "sharegpt.parquet": _ours(tmp_path, tok, [SHAREGPT] * 2),
    }
    for name, want in expected.items():
        got, _ = load_examples(str(tmp_path / name), tok, max_len=1024, chat_template=CHATML)
        assert [(i.tolist(), m.tolist()) for i, m in got] == want, name


@pytest.mark.parametrize("form", ["openai", "sharegpt"])
def test_weight_zero_keeps_an_answer_out_of_the_loss(tmp_path, tok, hf, form):
    # OpenAI's fine-tuning format (and axolotl's ShareGPT) mark an assistant message
    # "weight": 0 to keep it out of the loss. Reference: transformers' assistant mask with
    # the first answer's run of ones cleared.
    if form == "openai":
        messages = [dict(m) for m in CHAT]
        messages[2]["weight"] = 0
        record = {"messages": messages}
    else:
        turns = [dict(t) for t in SHAREGPT["conversations"]]
        turns[2]["weight"] = 0
        record = {"conversations": turns}
    (got,) = _ours(tmp_path, tok, [record])
    ids, mask = _reference(hf, CHAT)
    first = mask.index(1)
    end = first + mask[first:].index(0)
    mask[first:end] = [0] * (end - first)
    assert got == (ids, mask)
    with pytest.raises(SFTDataError, match="weight must be 0 or 1"):
        _ours(tmp_path, tok, [{"messages": [{**CHAT[1], "weight": 0.5}, CHAT[2]]}])


def test_llama_factory_tools_string_is_parsed():
    from neox_jax.finetune.sft_formats import normalize_record

    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    rec = {"conversations": SHAREGPT["conversations"], "tools": json.dumps(tools)}
    assert normalize_record(rec)["tools"] == tools
