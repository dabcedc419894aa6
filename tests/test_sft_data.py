"""SFT data: exact loss masks, chat templates, packing, determinism, truncation, bad input."""

import json

import jax
import numpy as np
import pytest
import transformers
from helpers.finetune import CHAT, CHATML, EOS, char_ids, write_char_tokenizer, write_jsonl
from helpers.hf_reference import assert_logits_close

from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.finetune.chat import ChatFormatError, ChatTemplate, encode_chat, format_chat
from neox_jax.finetune.sft_data import SFTDataError, SFTSource, load_examples, pack_rows
from neox_jax.model import GPTNeoX, ModelConfig, init_params


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_char_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def _expected(tok, pieces):
    """Independent construction: ids char by char (eos spelled out as its id), mask by hand."""
    ids, mask = [], []
    for text, trained in pieces:
        for part in text.split(EOS):
            ids += char_ids(tok, part)
            mask += [int(trained)] * len(part)
            ids.append(tok.eos_id)
            mask.append(int(trained))
        ids.pop(), mask.pop()  # one eos too many per piece
    return ids, mask


def _load(tmp_path, tok, records, **kw):
    path = write_jsonl(tmp_path / "d.jsonl", records, kw.pop("extra_lines", ()))
    return load_examples(path, tok, max_len=kw.pop("max_len", 512), **kw)


def test_prompt_completion_mask_is_exactly_the_completion_and_eos(tmp_path, tok):
    (ex,), stats = _load(tmp_path, tok, [{"prompt": "Q: 2+3?\nA:", "completion": " 5"}])
    ids, mask = _expected(tok, [("Q: 2+3?\nA:", False), (" 5" + EOS, True)])
    assert ex[0].tolist() == ids and ex[1].tolist() == mask
    assert stats.target_tokens == 3 and not stats.lossy


def test_default_chat_template_masks_every_assistant_turn(tmp_path, tok):
    (ex,), _ = _load(tmp_path, tok, [{"messages": CHAT}])
    ids, mask = _expected(
        tok,
        [
            ("<|system|>\nBe brief.\n<|user|>\n2+3?\n<|assistant|>\n", False),
            ("5" + EOS, True),
            ("<|user|>\nReverse abc\n<|assistant|>\n", False),
            ("cba" + EOS, True),
        ],
    )
    assert ex[0].tolist() == ids and ex[1].tolist() == mask
    decoded = tok.decode(ex[0][ex[1] == 1])
    assert decoded == "5" + EOS + "cba" + EOS


def test_hf_chat_template_renders_and_masks_like_transformers(tmp_path, tok, tok_dir):
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg_path.write_text(json.dumps({"chat_template": CHATML}))
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tok_dir / "tokenizer.json"), chat_template=CHATML
    )
    ours = ChatTemplate.for_tokenizer(tok, str(cfg_path))
    for gen in (False, True):
        want = hf.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=gen)
        assert ours.render(CHAT[:4], add_generation_prompt=gen) == want
    ref = hf.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    (ex,), _ = _load(tmp_path, tok, [{"messages": CHAT}], chat_template=str(cfg_path))
    assert ex[0].tolist() == list(ref["input_ids"])
    assert ex[1].tolist() == list(ref["assistant_masks"])
    prompt = format_chat(CHAT[:4], tok, CHATML)
    assert prompt.endswith("<|im_start|>assistant\n")
    # The generation prompt tokenizes as the training prefix of the last answer did.
    last_answer = int(np.nonzero(np.diff(ex[1]) == 1)[0][-1]) + 1
    assert encode_chat(CHAT[:4], tok, CHATML) == ex[0][:last_answer].tolist()


def test_template_that_is_not_prefix_consistent_is_refused(tok):
    bad = ChatTemplate.for_tokenizer(
        tok,
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ '#' + messages|length|string }}",
    )
    with pytest.raises(ChatFormatError, match="not prefix-consistent at message 1"):
        bad.segments(CHAT[1:])


def test_packed_rows_do_not_attend_across_examples(tmp_path, tok):
    records = [
        {"prompt": p, "completion": c} for p, c in [("ab", "c"), ("hello ", "x"), ("1+1=", "2")]
    ]
    examples, _ = _load(tmp_path, tok, records)
    src = SFTSource(examples, 31, 1, shuffle=False)
    row = src.samples(np.array([0]))
    assert src.rows_per_epoch == 1
    assert row["segment_ids"][0].tolist() == [1] * 4 + [2] * 8 + [3] * 6 + [0] * 14
    assert row["positions"][0].tolist()[4:12] == list(range(8))
    config = ModelConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64)  # fmt: skip
    params = init_params(config, jax.random.key(0))
    # Row 0 is the packed row; row k runs example k alone (padding after it has segment 0
    # and is never attended), all in one batch so one program serves every case.
    tokens, positions, segments = [row["tokens"][0]], [row["positions"][0]], [row["segment_ids"][0]]
    for ids, _ in examples:
        pad = 32 - len(ids)
        tokens.append(np.concatenate([ids, np.zeros(pad, np.int32)]))
        positions.append(np.concatenate([np.arange(len(ids)), np.zeros(pad, np.int32)]))
        segments.append(np.concatenate([np.ones(len(ids), np.int32), np.zeros(pad, np.int32)]))
    logits = jax.jit(GPTNeoX(config).apply)(
        {"params": params}, np.stack(tokens), np.stack(positions), np.stack(segments)
    )
    start = 0
    for k, (ids, _) in enumerate(examples, start=1):
        # Same arithmetic, other rows of the score matrix masked: fp32 round-off at most
        # (hf_reference's bound, 1e-5 of the largest logit).
        assert_logits_close(logits[0, start : start + len(ids)], logits[k, : len(ids)])
        start += len(ids)


def test_packing_is_deterministic_complete_and_reshuffled_per_epoch(tmp_path, tok):
    records = [{"prompt": "p" * (i % 7), "completion": "c" * (1 + i % 5)} for i in range(40)]
    examples, _ = _load(tmp_path, tok, records)
    src = SFTSource(examples, 23, 4, seed=3)
    again = SFTSource(examples, 23, 4, seed=3)
    rows0, rows1 = src.epoch_rows(0), src.epoch_rows(1)
    assert sorted(i for r in rows0 for i in r) == list(range(40))
    assert all(sum(len(examples[i][0]) for i in r) <= 24 for r in rows0)
    assert rows0 != rows1  # another order in the next epoch
    idx = np.array([0, 5, len(rows0) + 2, 3 * len(rows0)])
    for k, v in src.samples(idx).items():
        np.testing.assert_array_equal(v, again.samples(idx[::-1])[k][::-1])  # pure in the index
    assert pack_rows(np.array([5, 5, 3]), np.arange(3), 8) == [[0, 2], [1]]


def test_eval_source_covers_each_example_once_then_pads(tmp_path, tok):
    records = [{"prompt": "q", "completion": "a" * (1 + i)} for i in range(6)]
    examples, _ = _load(tmp_path, tok, records)
    src = SFTSource(examples, 15, 2, shuffle=False, repeat=False)
    rows = src.samples(np.arange(src.rows_per_epoch + 2))
    assert rows["loss_mask"].sum() == sum(int(m.sum()) for _, m in examples)
    assert not rows["segment_ids"][-2:].any()


@pytest.mark.parametrize("policy", ["left", "right", "drop"])
def test_truncation_is_counted_and_keeps_the_chosen_side(tmp_path, tok, policy):
    records = [{"prompt": "0123456789", "completion": "abcdef"}, {"prompt": "x", "completion": "y"}]
    examples, stats = _load(tmp_path, tok, records, max_len=12, truncation=policy)
    full = char_ids(tok, "0123456789abcdef") + [tok.eos_id]
    if policy == "drop":
        assert len(examples) == 1 and stats.dropped_too_long == 1
    else:
        kept = full[-12:] if policy == "left" else full[:12]
        assert examples[0][0].tolist() == kept
        assert stats.truncated == 1 and stats.tokens_removed == len(full) - 12
    assert stats.lossy and ("truncated" in stats.summary() or "too long" in stats.summary())


def test_bad_lines_are_listed_by_number_or_skipped_and_counted(tmp_path, tok):
    good = {"prompt": "a", "completion": "b"}
    extra = ['{"prompt": "a", ', '{"messages": [{"role": "bot", "content": "hi"}]}', '{"text": 1}']
    with pytest.raises(
        SFTDataError, match=r"3 malformed lines(.|\n)*d.jsonl:2:(.|\n)*:3: .*unknown role 'bot'"
    ):
        _load(tmp_path, tok, [good], extra_lines=extra)
    examples, stats = _load(tmp_path, tok, [good], extra_lines=extra, bad_lines="skip")
    assert len(examples) == 1 and [n for n, _ in stats.bad_lines] == [2, 3, 4]
    assert "3 bad lines skipped (lines 2, 3, 4)" in stats.summary()


def test_examples_without_trained_tokens_are_dropped_and_counted(tmp_path, tok):
    records = [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"prompt": "a", "completion": "b"},
    ]
    examples, stats = _load(tmp_path, tok, records)
    assert len(examples) == 1 and stats.dropped_no_target == 1
    with pytest.raises(SFTDataError, match="no usable example"):
        _load(tmp_path, tok, records[:1])


def test_start_up_reports_epochs_per_step_and_warns_on_repetition(tmp_path, tok_dir, capsys):
    # #14 item 4: 60 short examples pack into a couple of rows; a batch of 32 rows then
    # holds the whole dataset many times over, which used to pass without a word.
    from configs import finetune
    from neox_jax.finetune.sft_data import make_sft_sources

    records = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(60)]
    config = finetune.get_config("sft-full")
    config.data.sft_path = str(write_jsonl(tmp_path / "d.jsonl", records))
    config.data.eval_fraction = 0.0
    config.data.seq_len = 127
    train, _ = make_sft_sources(config.data, str(tok_dir), global_batch=32)
    rows = len(train.epoch_rows(0))  # independent count of the packed rows
    out = capsys.readouterr().out
    assert f"60 train examples pack into {rows} rows of 128 tokens" in out
    assert f"is {32 / rows:.3g} epochs" in out
    assert f"warning: SFT: every step repeats the data {32 / rows:.3g} times" in out
    train, _ = make_sft_sources(config.data, str(tok_dir), global_batch=rows)
    assert "warning" not in capsys.readouterr().out


def test_hf_dataset_gives_the_examples_of_the_same_jsonl(tmp_path, tok):
    # data.sft_path=hf:NAME[:SPLIT] streams a Hugging Face dataset (here a local folder that
    # datasets.load_dataset reads) with the jsonl's fields; the examples must be identical.
    records = [{"messages": CHAT}, {"prompt": "1+1=", "completion": "2"}] * 3
    folder = tmp_path / "ds"
    folder.mkdir()
    path = write_jsonl(folder / "train.jsonl", records)
    direct, _ = load_examples(path, tok, max_len=512)
    via_hf, stats = load_examples(f"hf:{folder}:train", tok, max_len=512)
    assert stats.examples == len(direct) == 6
    for (a_ids, a_mask), (b_ids, b_mask) in zip(direct, via_hf, strict=True):
        np.testing.assert_array_equal(a_ids, b_ids)
        np.testing.assert_array_equal(a_mask, b_mask)
