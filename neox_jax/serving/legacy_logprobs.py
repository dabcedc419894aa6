"""The ``logprobs`` object of ``/v1/completions`` (OpenAI's legacy format), which
lm-eval's ``local-completions`` reads to score continuations: per token its text, its
logprob (None for the first prompt token, which has no context), its likeliest
alternatives and its character offset in the choice's text."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class LegacyLogprobs:
    """Builds the objects for ``k`` alternatives per token; ``token_str(id)`` is a token's
    text."""

    def __init__(self, token_str: Callable[[int], str], k: int):
        self.token_str, self.k = token_str, k

    def top(self, token: str, lp) -> dict | None:
        """The ``k`` likeliest alternatives and, always, the chosen token (OpenAI's
        legacy API: up to ``logprobs + 1`` entries)."""
        if not lp:
            return None
        alternatives = {self.token_str(i): v for i, v in lp[1][: self.k]}
        alternatives[token] = lp[0]  # also where another id decodes to the same text
        return alternatives

    def obj(self, ids: Sequence[int], lps: Sequence, offset: int = 0) -> dict:
        """The object for tokens ``ids`` whose text starts at character ``offset`` of the
        choice (``lps``: per token ``(logprob, [(id, logprob)] * k)`` or None)."""
        tokens = [self.token_str(i) for i in ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp[0] if lp else None for lp in lps],
            "top_logprobs": [self.top(t, lp) for t, lp in zip(tokens, lps, strict=True)],
            "text_offset": offsets,
        }


def end(obj: dict | None) -> int:
    """The character offset just after ``obj``'s last token (0 for none)."""
    if not obj or not obj["tokens"]:
        return 0
    return obj["text_offset"][-1] + len(obj["tokens"][-1])


def merge(a: dict | None, b: dict | None) -> dict | None:
    """``a`` then ``b`` (whose offsets were counted from ``end(a)``) as one object."""
    if a is None or b is None:
        return a or b
    return {key: a[key] + b[key] for key in a}
