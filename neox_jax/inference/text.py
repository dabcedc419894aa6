"""Host-side text for generation: incremental detokenization and stop strings.

Byte-level BPE (GPT-NeoX's tokenizer) spells a multi-byte character over several
tokens, so decoding a prefix of the output can end in half a character, which a
lossy decoder shows as U+FFFD. ``IncrementalDetokenizer`` only releases text once it
no longer ends in such a replacement character, and decodes a short window of recent
tokens rather than the whole output (linear, not quadratic, in the output length).
The window starts one emission back so that tokenizers whose decoding of a token
depends on its left neighbour (sentencepiece's leading space) stay exact: the same
approach as vLLM's ``detokenize_incrementally``.

``TextTracker`` adds stop strings on top: it finds the token at which a stop string
first appears, and holds back a tail of text that could still grow into one, so a
stream never shows text that is later cut.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text increments, never splitting a character.

    Args:
      tokenizer: anything with ``decode(ids, skip_special_tokens=...) -> str``.
      skip_special_tokens: drop special tokens (eos, padding) from the text.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything released so far
        self._prefix = 0  # window start: context for the next decode
        self._read = 0  # tokens already turned into released text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, ids: Iterable[int]) -> str:
        """Appends token ids; returns the newly complete text (possibly "")."""
        self.ids.extend(int(i) for i in ids)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        # A trailing U+FFFD is (almost always) a character whose bytes are still coming.
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The text not yet released (e.g. a genuinely invalid trailing byte); call at the end."""
        full = self._decode(self.ids)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        self._prefix = self._read = len(self.ids)
        return delta


def find_stop(text: str, stop_strings: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest occurrence of any stop string in ``text[start:]``, or None."""
    hits = [i for s in stop_strings if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def partial_stop_len(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextTracker:
    """The text of one generated row: detokenized incrementally, cut at stop strings.

    Feed the generated ids (without the eos/stop token that ended the row) with
    ``feed``; ``release`` returns the text that is safe to show. Once a stop string
    appears, ``stopped`` is True, ``num_tokens`` is the number of tokens up to the one
    that completed it, and the text ends before the stop string.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop_strings = tuple(stop_strings)
        self._longest = max((len(s) for s in self.stop_strings), default=0)
        self.stop_at: int | None = None  # char index of the stop string in the text
        self.num_tokens = 0
        self._released = 0
        self._done = False

    @property
    def stopped(self) -> bool:
        return self.stop_at is not None

    @property
    def text(self) -> str:
        text = self.detok.text
        return text if self.stop_at is None else text[: self.stop_at]

    def feed(self, ids: Iterable[int]) -> bool:
        """Adds ids one at a time (to locate a stop exactly); returns ``stopped``."""
        for i in ids:
            if self.stopped:
                break
            before = len(self.detok.text)
            self.num_tokens += 1
            if self.detok.add([i]) and self.stop_strings:
                # Only the new text (and a stop string straddling its start) can match.
                self.stop_at = find_stop(
                    self.detok.text, self.stop_strings, max(0, before - self._longest + 1)
                )
        return self.stopped

    def finish(self) -> None:
        """The row has ended: release trailing bytes and check the stop strings once more."""
        if not self.stopped:
            before = len(self.detok.text)
            self.detok.flush()
            if self.stop_strings:
                start = max(0, before - self._longest + 1)
                self.stop_at = find_stop(self.detok.text, self.stop_strings, start)
        self._done = True

    def release(self) -> str:
        """Text not yet returned that can no longer change or be cut by a stop string."""
        text = self.text
        end = len(text)
        if not self._done and not self.stopped:
            end -= partial_stop_len(text, self.stop_strings)
        piece = text[self._released : end]
        self._released = max(self._released, end)
        return piece
