"""Few-shot prompts within a token budget, and multiple-choice scoring by log-likelihood.

Choice scores are checked against log-probabilities from the torch model's logits;
sums over a few tokens agree to ~1e-5 (fp32 versus float64 log_softmax), atol 2e-4.
"""

import json

import numpy as np
import pytest
from helpers.evaluation import hf_token_logprobs, tiny_model

from neox_jax.evaluation import (
    FewShotPromptBuilder,
    LogLikelihoodScorer,
    PromptTemplate,
    load_examples,
    score_choices,
)
from neox_jax.evaluation.fewshot import encode_pair

TEMPLATE = PromptTemplate(
    input="Question: {question}\nAnswer:", target=" {answer}", instruction="Answer briefly.\n\n"
)
EXAMPLES = [
    {"question": f"what is item {i} of the river list", "answer": f"value {i}"} for i in range(12)
]


def test_load_examples(tmp_path):
    path = tmp_path / "ex.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES[:3]) + "\n")
    assert load_examples(path) == EXAMPLES[:3]
    path.write_text(json.dumps(EXAMPLES[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match="ex.jsonl:2: not valid JSON"):
        load_examples(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_examples(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no examples"):
        load_examples(path)


def test_templates():
    assert (
        TEMPLATE.render_shot(EXAMPLES[1]) == "Question: what is item 1 of the river list\n"
        "Answer: value 1"
    )
    with pytest.raises(ValueError, match="field 'answer' is not in the example"):
        TEMPLATE.render_target({"question": "q"})
    with pytest.raises(ValueError, match="template input"):
        PromptTemplate(input="Question: {question")


def test_k_shot_prompt_structure_and_determinism():
    tok = tiny_model()[4]
    builder = FewShotPromptBuilder(EXAMPLES, TEMPLATE, tok, max_tokens=10_000, seed=1)
    query = EXAMPLES[4]
    prompt = builder.build(query, k=3)
    assert len(prompt.shots) == 3 and prompt.dropped == 0 and 4 not in prompt.shots
    expected = (
        TEMPLATE.instruction
        + "".join(TEMPLATE.render_shot(EXAMPLES[i]) + "\n\n" for i in prompt.shots)
        + TEMPLATE.render_input(query)
    )
    assert prompt.text == expected and prompt.num_tokens == len(tok.encode(expected))
    assert builder.build(query, k=3) == prompt  # same seed, same shots
    zero = builder.build(query, k=0)
    assert zero.shots == () and zero.text == TEMPLATE.instruction + TEMPLATE.render_input(query)
    assert len(builder.build(query, k=50).shots) == 11  # the pool minus the query


def test_budget_drops_shots_never_the_query():
    """Property over many budgets: the prompt fits, ends with the whole query, and uses
    as many shots as fit; a query that cannot fit on its own raises."""
    tok = tiny_model()[4]
    query = EXAMPLES[0]
    query_tokens = len(tok.encode(TEMPLATE.instruction + TEMPLATE.render_input(query)))
    unbounded = FewShotPromptBuilder(EXAMPLES, TEMPLATE, tok, max_tokens=10**6)
    all_shots = unbounded.build(query, k=5).shots  # the sampled order (seed 0)
    rng = np.random.default_rng(0)
    for budget in rng.integers(1, 250, 60):
        budget, reserve = int(budget), int(rng.integers(0, 10))
        builder = FewShotPromptBuilder(EXAMPLES, TEMPLATE, tok, max_tokens=budget)
        if query_tokens > budget - reserve:
            with pytest.raises(ValueError, match="never truncated"):
                builder.build(query, k=5, reserve_tokens=reserve)
            continue
        prompt = builder.build(query, k=5, reserve_tokens=reserve)
        assert prompt.num_tokens <= budget - reserve
        assert prompt.text.endswith(TEMPLATE.render_input(query))
        assert len(prompt.shots) + prompt.dropped == 5
        if prompt.dropped:  # one more of the sampled shots would not have fit
            more = builder._text(all_shots[: len(prompt.shots) + 1], query)
            assert len(tok.encode(more)) > budget - reserve


def test_encode_pair_moves_trailing_space():
    tok = tiny_model()[4]
    ctx, cont = encode_pair(tok, "Answer: ", "value")
    assert ctx == tok.encode("Answer:") and ctx + cont == tok.encode("Answer: value")
    assert encode_pair(tok, "", "value") == ([0], tok.encode("value"))


def test_multiple_choice_scores_match_reference():
    _, ref, config, params, tok = tiny_model()
    scorer = LogLikelihoodScorer(config, params, batch_size=4)
    items = [
        ("Question: which river\nAnswer:", [" alpha", " beta gamma", " delta river ocean"]),
        ("The capital is", [" castle", " harbor"]),
    ]
    scores = score_choices(scorer, tok, items)
    for (context, options), s in zip(items, scores, strict=True):
        for j, option in enumerate(options):
            ctx, cont = encode_pair(tok, context, option)
            expected = hf_token_logprobs(ref, ctx + cont)[-len(cont) :].sum()
            assert s.logprobs[j] == pytest.approx(expected, abs=2e-4)
            assert s.num_tokens[j] == len(cont) and s.num_bytes[j] == len(option.encode())
        assert s.prediction("none") == int(np.argmax(s.logprobs))
        assert s.prediction("token") == int(np.argmax(np.array(s.logprobs) / s.num_tokens))
        assert s.prediction("byte") == int(np.argmax(np.array(s.logprobs) / s.num_bytes))
    with pytest.raises(ValueError, match="normalization"):
        scores[0].prediction("words")
    with pytest.raises(ValueError, match="no options"):
        score_choices(scorer, tok, [("ctx", [])])
