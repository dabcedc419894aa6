"""``Generator``: text in, text out, on top of the jitted prefill / decode / beam search.

One object per loaded model, shared by every caller (the CLI, a notebook, retrieval,
evaluation). It tokenizes, validates, sorts prompts by length into sub-batches,
left-pads them to bucketed shapes (so compiled programs are reused), runs the device
loop, and turns tokens into ``GenerationResult``s. Stop strings and streaming run the
loop in chunks and look at the text on the host between chunks; everything else runs
it once, to the end, without returning to Python.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.inference import generate as gen
from neox_jax.inference.beam_search import beam_search
from neox_jax.inference.sampling import NO_VOCAB_LIMIT, SamplingParams
from neox_jax.inference.step import BatchLayouts
from neox_jax.inference.text import TextTracker
from neox_jax.loading import tokenizer_for
from neox_jax.model import ModelConfig
from neox_jax.parallel.placement import shard_params
from neox_jax.parallel.rules import mesh_context


@dataclasses.dataclass
class GenerationResult:
    """One continuation.

    Attributes:
      token_ids: generated ids, up to and including the token that ended generation (the
        eos or stop id, or the token that completed a stop string).
      text: the decoded continuation without special tokens, the stop id or the stop
        string (None without a tokenizer).
      finish_reason: "eos", "stop" (stop id or stop string) or "length".
      prompt_token_ids: the prompt as it was fed (after any truncation).
      score: beam search only: the length-penalised log-probability.
    """

    token_ids: list[int]
    text: str | None
    finish_reason: str
    prompt_token_ids: list[int]
    score: float | None = None


class Generator:
    """Generates from one model; reuse it, compiled programs are cached per shape.

    Args:
      config: the model config.
      params: its parameters.
      tokenizer: a ``neox_jax.data.tokenizer.Tokenizer``; a path to one or to a model
        folder beside which one lies (as ``load_model`` takes it: a run directory, a
        checkpoint, a Hugging Face folder); or None (then prompts must be token ids and
        results carry no text).
      max_cache_len: a fixed KV-cache size (one compile serves every request that fits),
        or None to size the cache per request in multiples of 64.
      eos_token_ids: ids that end generation; default the tokenizer's ``eos_ids`` (every
        ``eos_token_id`` of the model folder's generation_config.json, else its eos).
      max_batch_size: prompts per device batch; longer lists run in several batches.
      stop_check_interval: decode steps between host checks for stop strings.
      stream_interval: decode steps per streamed increment.
      split_layers: keep a per-layer copy of the layer weights (``step.split_params``) so
        the decode loop reads them in place; about 1.5x faster decoding on CPU, at the
        cost of holding the layer weights twice while the caller keeps ``params``. On
        CPU a plain GPT-NeoX layer is kept as two fused products (``inference.fused``),
        built on first use in the layout of the batch size decoded (``step.BatchLayouts``:
        a Generator that decodes both one row and several holds the weights whose
        blocks differ twice, e.g. the out products of pythia-160m, 142 MB).
      mesh: run on this mesh (``neox_jax.parallel.create_mesh``): parameters and KV
        cache are sharded by the rules table, heads and MLP over ``tensor`` (tensor
        parallel); with a ``stage`` axis > 1 the layers are split over the stages and
        run as a pipeline (``parallel.pipeline``); batches split over ``data``/``fsdp``.
      pipeline_microbatches: microbatches of the pipeline (default: the stage count;
        fewer when they do not divide the batch).
    """

    def __init__(
        self,
        config: ModelConfig,
        params,
        tokenizer=None,
        *,
        max_cache_len: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        max_batch_size: int = 32,
        stop_check_interval: int = 16,
        stream_interval: int = 1,
        split_layers: bool = True,
        mesh: jax.sharding.Mesh | None = None,
        pipeline_microbatches: int | None = None,
    ):
        if isinstance(tokenizer, str | os.PathLike):  # a tokenizer, or a model folder
            tokenizer = tokenizer_for(tokenizer)
        if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{config.vocab_size}: they do not belong together; pass the model's tokenizer."
            )
        if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len < 2):
            raise ValueError(f"max_cache_len must be an int >= 2 or None, got {max_cache_len!r}.")
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("stop_check_interval", stop_check_interval),
            ("stream_interval", stream_interval),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if eos_token_ids is None:
            eos_token_ids = () if tokenizer is None else tokenizer.eos_ids
        self.config, self.params, self.tokenizer = config, params, tokenizer
        # A model vocabulary padded past the tokenizer's (for speed): never draw those ids.
        self.vocab_limit = None if tokenizer is None else tokenizer.vocab_size
        self.mesh = mesh
        stages = 1 if mesh is None else mesh.shape.get("stage", 1)
        if pipeline_microbatches is not None and (
            not isinstance(pipeline_microbatches, int) or pipeline_microbatches < 1
        ):
            raise ValueError(
                f"pipeline_microbatches must be a positive integer, got {pipeline_microbatches!r}."
            )
        self._pipeline = (pipeline_microbatches or stages) if stages > 1 else 0
        if mesh is not None:
            params = shard_params(config, params, mesh)
        # What the jitted loops read: separate per-layer buffers (see inference/step.py),
        # on CPU fused weights laid out for each batch size met (built on first use);
        # the pipeline needs the stacked layers (split over ``stage``).
        split = split_layers and not self._pipeline
        self._layouts = BatchLayouts(params, config) if split else (lambda batch, **_: params)
        self.max_cache_len = max_cache_len
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.max_batch_size = max_batch_size
        self.stop_check_interval = stop_check_interval
        self.stream_interval = stream_interval
        self.context_length = gen.context_length(config)

    # ------------------------------------------------- the jitted programs
    def _context(self):
        """The mesh and rules table every jitted call runs under (nothing without a mesh)."""
        return mesh_context(self.mesh)

    def _prefill(self, *args, **kwargs):
        with self._context():
            return gen.prefill(*args, pipeline=self._pipeline, **kwargs)

    def _decode(self, *args, **kwargs):
        with self._context():
            return gen.decode_program(args[1])(*args, pipeline=self._pipeline, **kwargs)

    def _beam_search(self, *args, **kwargs):
        with self._context():
            return beam_search(*args, pipeline=self._pipeline, **kwargs)

    # ------------------------------------------------------------------ input
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt (a string needs the tokenizer); validates ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids or a tokenizer.")
            # As transformers' tokenizer(prompt): with the bos a Llama-style tokenizer adds.
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = [int(i) for i in np.asarray(prompt, np.int64).reshape(-1)]
        if not ids:
            raise ValueError("empty prompt: give at least one token (or non-empty text).")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            vocab = self.config.vocab_size
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab}).")
        return ids

    def _requests(self, prompts, sampling) -> list[tuple[list[int], SamplingParams]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(p, int | np.integer) for p in prompts):
            raise TypeError("prompts is a flat list of ints; pass [ids] for one tokenized prompt.")
        sampling = SamplingParams() if sampling is None else sampling
        rows = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(rows) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(rows)} SamplingParams.")
        return [self._fit(self.encode(p), s) for p, s in zip(prompts, rows, strict=True)]

    def _fit(self, ids: list[int], p: SamplingParams) -> tuple[list[int], SamplingParams]:
        room = self.context_length - p.max_new_tokens
        if self.max_cache_len is not None:
            room = min(room, self.max_cache_len - p.max_new_tokens + 1)
        if room < 1:
            raise ValueError(
                f"max_new_tokens={p.max_new_tokens} leaves no room for a prompt in the "
                f"context ({self.context_length}) or cache ({self.max_cache_len}); lower it."
            )
        if len(ids) > room and p.truncate_prompt:
            ids = ids[-room:]  # keep the end of the prompt: it conditions the continuation
        gen.plan_cache(self.config, len(ids), p.max_new_tokens, self.max_cache_len)
        return ids, p

    # ------------------------------------------------------------- generation
    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Continue every prompt.

        Args:
          prompts: texts (needs a tokenizer) or token-id lists; a single string is one prompt.
          sampling: one ``SamplingParams`` for all, or one per prompt (default: greedy, 64
            tokens). Beam search needs the same ``SamplingParams`` for the whole call.

        Returns:
          One ``GenerationResult`` per prompt, in order.
        """
        requests = self._requests(prompts, sampling)
        order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
        results: list[GenerationResult | None] = [None] * len(requests)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            batch = [requests[i] for i in chunk]
            if batch[0][1].num_beams > 1:
                out = self._beam_batch(batch)
            else:
                out = self._sample_batch(batch, chunk)
            for i, r in zip(chunk, out, strict=True):
                results[i] = r
        return results

    def _sample_batch(self, batch, row_ids) -> list[GenerationResult]:
        if any(p.num_beams > 1 for _, p in batch):
            raise ValueError("mix of beam search and sampling in one call; split the requests.")
        n = len(batch)
        # Pad the batch to a power of two with 1-token rows that stop after one step.
        filler = ([0], SamplingParams(max_new_tokens=1, ignore_eos=True))
        batch = batch + [filler] * (gen.bucket_batch(n) - n)
        prompts, params = [b[0] for b in batch], [b[1] for b in batch]
        max_new = max(p.max_new_tokens for p in params)
        plen, cache_len = gen.plan_cache(
            self.config, max(map(len, prompts)), max_new, self.max_cache_len
        )
        ids, mask = gen.left_pad(prompts, plen)
        keys = gen.row_keys([p.seed for p in params], list(row_ids) + [0] * (len(batch) - n))
        controls, mode = gen.make_controls(params, self.eos_token_ids, self.vocab_limit)
        trackers = [self._tracker(p) for p in params[:n]]
        weights = self._layouts(len(batch))
        state = self._prefill(
            self.config, weights, ids, mask, keys,
            cache_len=cache_len, track_seen=mode.repetition_penalty,
            track_counts=mode.presence_frequency,
        )  # fmt: skip
        if not any(p.stop_strings for p in params):
            state = self._decode(self.config, weights, state, controls, max_new, mode=mode)
            tokens, lengths, finish = jax.device_get((state.tokens, state.lengths, state.finish))
        else:  # chunks, looking for stop strings on the host in between
            until, fed = 0, [0] * n
            while True:
                until = min(until + self.stop_check_interval, max_new)
                state = self._decode(self.config, weights, state, controls, until, mode=mode)
                tokens, lengths, finish = jax.device_get(
                    (state.tokens, state.lengths, state.finish)
                )
                finish = finish.copy()
                for row, t in enumerate(trackers):
                    if t.stop_strings and not t.stopped:
                        t.feed(tokens[row, fed[row] : _text_len(lengths[row], finish[row])])
                        fed[row] = lengths[row]
                        finish[row] = gen.STOP if t.stopped else finish[row]
                if (finish[:n] != gen.RUNNING).all() or until >= max_new:
                    break
                state = state.replace(finish=jnp.asarray(finish))
        return [
            self._result(prompts[r], tokens[r], lengths[r], finish[r], trackers[r])
            for r in range(n)
        ]

    def _beam_batch(self, batch) -> list[GenerationResult]:
        p = batch[0][1]
        if any(q != p for _, q in batch):
            raise ValueError("beam search needs one SamplingParams for all prompts of a call.")
        n = len(batch)
        prompts = [b[0] for b in batch] + [[0]] * (gen.bucket_batch(n) - n)
        plen, cache_len = gen.plan_cache(
            self.config, max(map(len, prompts)), p.max_new_tokens, self.max_cache_len
        )
        ids, mask = gen.left_pad(prompts, plen)
        eos = () if p.ignore_eos else self.eos_token_ids
        eos_t = gen.id_table([eos] * len(prompts))
        stop_t = gen.id_table([p.stop_token_ids] * len(prompts))
        n_stop = len(set(eos) | set(p.stop_token_ids))
        # Beams are rows; beam search's program keeps YNNPACK's dots (no input-major).
        weights = self._layouts(len(prompts) * p.num_beams, xla_dots=False)
        out = self._beam_search(
            self.config, weights, ids, mask, jnp.int32(p.max_new_tokens),
            stop_t, eos_t, jnp.float32(p.length_penalty), jnp.float32(p.repetition_penalty),
            jnp.int32(NO_VOCAB_LIMIT if self.vocab_limit is None else self.vocab_limit),
            num_beams=p.num_beams, num_candidates=max(2, 1 + n_stop) * p.num_beams,
            cache_len=cache_len, early_stopping=p.early_stopping,
        )  # fmt: skip
        tokens, lengths, scores, finish = jax.device_get(
            (out.tokens[:, 0], out.lengths[:, 0], out.scores[:, 0], out.finish)
        )
        results = []
        for r in range(n):
            tracker = self._tracker(p)
            if tracker is not None and p.stop_strings:
                tracker.feed(tokens[r, : _text_len(lengths[r], finish[r])])
            res = self._result(prompts[r], tokens[r], lengths[r], finish[r], tracker)
            results.append(dataclasses.replace(res, score=float(scores[r])))
        return results

    def _tracker(self, p: SamplingParams) -> TextTracker | None:
        if self.tokenizer is None:
            if p.stop_strings:
                raise ValueError("stop_strings need a tokenizer; use stop_token_ids instead.")
            return None
        return TextTracker(self.tokenizer, p.stop_strings)

    def _result(self, prompt, tokens, length, finish, tracker) -> GenerationResult:
        length, finish = int(length), int(finish)
        if tracker is not None and tracker.stopped:
            length, finish = tracker.num_tokens, gen.STOP
        ids = [int(t) for t in tokens[:length]]
        text = None
        if tracker is not None:
            if not tracker.stopped:
                tracker.feed(ids[tracker.num_tokens : _text_len(length, finish)])
                tracker.finish()
                if tracker.stopped:  # a stop string completed by the last bytes
                    finish = gen.STOP
            text = tracker.text
        return GenerationResult(ids, text, gen.FINISH_REASONS[finish], list(prompt))

    # --------------------------------------------------------------- streaming
    def stream(
        self, prompt: str | Sequence[int], sampling: SamplingParams | None = None
    ) -> Iterator[str]:
        """Yield the continuation of one prompt as text increments while it is generated.

        Increments never split a character and never include text that a stop string
        later cuts, so ``"".join(stream(...))`` equals ``generate(...)[0].text``.
        Generation stops as soon as a stop string appears. Beam search yields the
        final text once. The generator's return value is the ``GenerationResult``.

        Args:
          prompt: a text or token ids.
          sampling: the ``SamplingParams`` (default greedy, 64 tokens).

        Yields:
          Text increments (non-empty strings).
        """
        if self.tokenizer is None:
            raise ValueError("stream needs a tokenizer; use generate() for token ids.")
        ids, p = self._requests([prompt], sampling)[0]
        if p.num_beams > 1:
            result = self._beam_batch([(ids, p)])[0]
            if result.text:
                yield result.text
            return result
        plen, cache_len = gen.plan_cache(
            self.config, len(ids), p.max_new_tokens, self.max_cache_len
        )
        tok, mask = gen.left_pad([ids], plen)
        controls, mode = gen.make_controls([p], self.eos_token_ids, self.vocab_limit)
        weights = self._layouts(1)
        state = self._prefill(
            self.config, weights, tok, mask, gen.row_keys([p.seed]),
            cache_len=cache_len, track_seen=mode.repetition_penalty,
            track_counts=mode.presence_frequency,
        )  # fmt: skip
        tracker, until = TextTracker(self.tokenizer, p.stop_strings), 0
        while True:
            until = min(until + self.stream_interval, p.max_new_tokens)
            state = self._decode(self.config, weights, state, controls, until, mode=mode)
            tokens, length, finish = jax.device_get((state.tokens[0], state.lengths, state.finish))
            length, finish = int(length[0]), int(finish[0])
            tracker.feed(tokens[tracker.num_tokens : _text_len(length, finish)])
            if tracker.stopped or finish != gen.RUNNING or until >= p.max_new_tokens:
                break
            if piece := tracker.release():
                yield piece
        result = self._result(ids, tokens, length, finish, tracker)
        if piece := tracker.release():
            yield piece
        return result


def _text_len(length: int, finish: int) -> int:
    """Generated tokens that belong to the text: all but a final eos / stop id."""
    return int(length) - (1 if finish in (gen.EOS, gen.STOP) else 0)
