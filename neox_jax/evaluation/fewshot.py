"""Few-/zero-shot prompts and multiple-choice scoring by log-likelihood.

A ``PromptTemplate`` renders an example as ``input`` (what the model reads) and
``target`` (the answer), with Python ``str.format`` fields (``{question}``; write ``{{``
for a literal brace). A k-shot prompt is

    instruction + (input(shot) + target(shot) + separator) * k + input(query)

``FewShotPromptBuilder`` picks the shots (seeded, never the query itself) and drops shots
until the whole prompt fits the token budget; the query is never truncated, and a query
that does not fit on its own is an error.

``score_choices`` scores every option of a multiple-choice item as a continuation of
the prompt (``LogLikelihoodScorer``): the summed log-probability, and two length
normalisations, per token and per UTF-8 byte (the latter is lm-eval's ``acc_norm``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neox_jax.errors import read_utf8
from neox_jax.evaluation.scoring import LogLikelihoodScorer


def load_examples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Examples from a JSON-lines file (one object per non-empty line).

    Raises:
      FileNotFoundError: no such file. ValueError: a line that is not a JSON object, or
      no examples at all (the message names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"examples file {path} does not exist.")
    examples = []
    for n, line in enumerate(read_utf8(path, "examples file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}).") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}.")
        examples.append(record)
    if not examples:
        raise ValueError(f"{path} holds no examples.")
    return examples


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """How an example becomes text.

    Attributes:
      input: the part the model reads, e.g. ``"Question: {question}\\nAnswer:"``.
      target: the answer, e.g. ``" {answer}"`` (the leading space belongs here).
      separator: between consecutive shots (and before the query).
      instruction: text before the first shot ("" for none).
    """

    input: str
    target: str = ""
    separator: str = "\n\n"
    instruction: str = ""

    def __post_init__(self):
        for name in ("input", "target", "instruction"):
            try:  # fail on a malformed template now, not on the thousandth example
                list(string.Formatter().parse(getattr(self, name)))
            except ValueError as e:
                raise ValueError(f"template {name} {getattr(self, name)!r}: {e}.") from None

    @staticmethod
    def _render(template: str, example: Mapping[str, Any]) -> str:
        try:
            return template.format(**example)
        except KeyError as e:
            raise ValueError(
                f"template field {e.args[0]!r} is not in the example (fields: {sorted(example)})."
            ) from None

    def render_input(self, example: Mapping[str, Any]) -> str:
        return self._render(self.input, example)

    def render_target(self, example: Mapping[str, Any]) -> str:
        return self._render(self.target, example)

    def render_shot(self, example: Mapping[str, Any]) -> str:
        return self.render_input(example) + self.render_target(example)


@dataclasses.dataclass(frozen=True)
class FewShotPrompt:
    """A built prompt: its text and token count, the shots used (indices into the
    builder's examples, in prompt order) and how many were dropped for the budget."""

    text: str
    num_tokens: int
    shots: tuple[int, ...]
    dropped: int


class FewShotPromptBuilder:
    """Builds k-shot prompts from a pool of examples within a token budget.

    Args:
      examples: the shot pool (dicts with the template's fields).
      template: the ``PromptTemplate``.
      tokenizer: counts tokens (``encode``).
      max_tokens: the budget for the prompt (e.g. the context minus the answer's room).
      seed: seeds shot sampling; the same query, k and seed give the same prompt.
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Any]],
        template: PromptTemplate,
        tokenizer,
        *,
        max_tokens: int,
        seed: int = 0,
    ):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
        self.examples = list(examples)
        self.template, self.tokenizer = template, tokenizer
        self.max_tokens, self.seed = max_tokens, seed

    def _text(self, shots: Sequence[int], query: Mapping[str, Any]) -> str:
        t = self.template
        parts = [self.template.render_shot(self.examples[i]) for i in shots]
        return t.instruction + "".join(p + t.separator for p in parts) + t.render_input(query)

    def build(self, query: Mapping[str, Any], k: int, *, reserve_tokens: int = 0) -> FewShotPrompt:
        """The k-shot prompt for ``query``.

        Args:
          query: the example to answer (its target is not rendered).
          k: shots wanted (0 = zero-shot); fewer are used when the pool is smaller or the
            budget is tight.
          reserve_tokens: room kept free inside ``max_tokens`` (e.g. the answer).

        Returns:
          A ``FewShotPrompt`` with at most ``max_tokens - reserve_tokens`` tokens.

        Raises:
          ValueError: ``k < 0``, or the query alone exceeds the budget.
        """
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}.")
        budget = self.max_tokens - reserve_tokens
        pool = [i for i, ex in enumerate(self.examples) if ex != query]
        # Seed from the query's text too: each query gets its own, reproducible shots.
        rng = random.Random(f"{self.seed}:{self.template.render_input(query)}")
        chosen = rng.sample(pool, min(k, len(pool)))
        base = len(self.tokenizer.encode(self._text([], query), add_special_tokens=True))
        if base > budget:
            raise ValueError(
                f"the query alone is {base} tokens, over the budget of {budget} "
                f"(max_tokens={self.max_tokens} - reserve_tokens={reserve_tokens}); queries are "
                "never truncated: shorten it or raise the budget."
            )
        for n in range(len(chosen), -1, -1):  # drop shots until the prompt fits
            text = self._text(chosen[:n], query)
            num = base if n == 0 else len(self.tokenizer.encode(text, add_special_tokens=True))
            if num <= budget:
                return FewShotPrompt(text, num, tuple(chosen[:n]), len(chosen) - n)
        raise AssertionError("unreachable: the zero-shot prompt fits")


@dataclasses.dataclass(frozen=True)
class ChoiceScores:
    """Log-likelihood of each option of one multiple-choice item.

    Attributes:
      logprobs: summed log-probability of each option's tokens.
      num_tokens: tokens per option; num_bytes: UTF-8 bytes per option.
    """

    logprobs: tuple[float, ...]
    num_tokens: tuple[int, ...]
    num_bytes: tuple[int, ...]

    @property
    def per_token(self) -> tuple[float, ...]:
        return tuple(lp / n for lp, n in zip(self.logprobs, self.num_tokens, strict=True))

    @property
    def per_byte(self) -> tuple[float, ...]:
        return tuple(lp / max(b, 1) for lp, b in zip(self.logprobs, self.num_bytes, strict=True))

    def prediction(self, normalization: str = "none") -> int:
        """Index of the best option by "none" (sum), "token" or "byte" normalisation."""
        table = {"none": self.logprobs, "token": self.per_token, "byte": self.per_byte}
        if normalization not in table:
            raise ValueError(
                f"normalization must be one of {sorted(table)}, got {normalization!r}."
            )
        return int(np.argmax(table[normalization]))


def encode_pair(tokenizer, context: str, continuation: str, prefix_token_id: int | None = None):
    """``(context_ids, continuation_ids)`` as lm-eval splits them.

    Trailing spaces of the context move to the continuation; the pair is encoded as one
    text and split where the context's tokens end, so the continuation's tokens are those
    the model would see; both start with the special tokens the tokenizer adds (a Llama
    bos), as lm-eval's Hugging Face model encodes them. An empty context becomes
    ``[prefix_token_id]`` (by default bos, else eos, as lm-eval's ``prefix_token_id``).
    """
    if not context:
        prefix = prefix_token_id
        if prefix is None:
            prefix = tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id
        if prefix is None:
            raise ValueError("an empty context needs a prefix token; the tokenizer has no bos/eos.")
        return [prefix], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=True)
    ctx = tokenizer.encode(context, add_special_tokens=True)
    return ctx, whole[len(ctx) :]


def score_choices(
    scorer: LogLikelihoodScorer,
    tokenizer,
    items: Sequence[tuple[str, Sequence[str]]],
) -> list[ChoiceScores]:
    """Score the options of many multiple-choice items in one batched pass.

    Args:
      scorer: the model's ``LogLikelihoodScorer``.
      tokenizer: the model's tokenizer.
      items: ``(context, options)`` pairs; each option is scored as a continuation.

    Returns:
      One ``ChoiceScores`` per item.
    """
    requests, spans, sizes = [], [], []
    for context, options in items:
        if not options:
            raise ValueError(f"an item has no options (context {context[:40]!r}...).")
        start = len(requests)
        for option in options:
            ctx, cont = encode_pair(tokenizer, context, option)
            if not cont:
                raise ValueError(f"option {option!r} encodes to no tokens after its context.")
            requests.append((ctx, cont))
            sizes.append((len(cont), len(option.encode("utf-8"))))
        spans.append((start, len(requests)))
    scores = scorer.score(requests)
    return [
        ChoiceScores(
            tuple(lp for lp, _ in scores[a:b]),
            tuple(n for n, _ in sizes[a:b]),
            tuple(nb for _, nb in sizes[a:b]),
        )
        for a, b in spans
    ]
