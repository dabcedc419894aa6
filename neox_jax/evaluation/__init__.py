"""Evaluation: perplexity, few-shot prompting, pass@k, and the lm-evaluation-harness model.

* ``LogLikelihoodScorer`` — batched, bucketed log-likelihood of continuations.
* ``perplexity`` — sliding-window perplexity of texts, files and indexed datasets.
* ``fewshot`` — k-shot prompt builder within a token budget; multiple-choice scoring.
* ``passk`` — code-completion stop sequences, a sandboxed pass@k harness, problems.
* ``lm_eval_adapter`` — ``NeoxLM``, registered with lm-eval as ``neox_jax`` when that
  module is imported (it needs lm-eval, so it is not imported here).

CLI: ``python -m neox_jax.evaluate --config=configs/evaluate.py --config.checkpoint=...``.
"""

from neox_jax.evaluation.fewshot import (
    ChoiceScores,
    FewShotPrompt,
    FewShotPromptBuilder,
    PromptTemplate,
    load_examples,
    score_choices,
)
from neox_jax.evaluation.passk import CODE_STOP_SEQUENCES, PROBLEMS, Problem, pass_at_k
from neox_jax.evaluation.perplexity import (
    PerplexityResult,
    perplexity_of_ids,
    perplexity_of_indexed_dataset,
    perplexity_of_text,
    perplexity_of_text_file,
    sliding_windows,
)
from neox_jax.evaluation.scoring import LogLikelihoodScorer

__all__ = [
    "CODE_STOP_SEQUENCES",
    "PROBLEMS",
    "ChoiceScores",
    "FewShotPrompt",
    "FewShotPromptBuilder",
    "LogLikelihoodScorer",
    "PerplexityResult",
    "Problem",
    "PromptTemplate",
    "load_examples",
    "pass_at_k",
    "perplexity_of_ids",
    "perplexity_of_indexed_dataset",
    "perplexity_of_text",
    "perplexity_of_text_file",
    "score_choices",
    "sliding_windows",
]
