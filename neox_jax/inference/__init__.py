"""Inference: prefill/decode with a static KV cache, samplers, beam search, streaming.

The public API:

* ``SamplingParams`` — how to continue a prompt (validated, frozen).
* ``Generator(config, params, tokenizer)`` — ``.generate(prompts, sampling)`` returns
  ``GenerationResult``s; ``.stream(prompt, sampling)`` yields text increments.
* ``generate_tokens(config, params, prompt_ids, prompt_mask, sampling, rng)`` — the
  functional core on token ids, no tokenizer needed; ``beam_search`` likewise.
* ``sampling`` — the pure logits processors and samplers; ``step`` — the cached forward
  pass the loops run (``split_params`` makes it read each layer's weights in place).
"""

from neox_jax.inference.beam_search import BeamOutput, beam_search
from neox_jax.inference.generate import (
    FINISH_REASONS,
    DecodeState,
    TokenOutput,
    bucket_length,
    decode,
    generate_tokens,
    greedy_generate,
    left_pad,
    prefill,
)
from neox_jax.inference.generator import GenerationResult, Generator
from neox_jax.inference.sampling import SamplingParams
from neox_jax.inference.step import split_params
from neox_jax.inference.text import IncrementalDetokenizer, TextTracker

__all__ = [
    "FINISH_REASONS",
    "BeamOutput",
    "DecodeState",
    "GenerationResult",
    "Generator",
    "IncrementalDetokenizer",
    "SamplingParams",
    "TextTracker",
    "TokenOutput",
    "beam_search",
    "bucket_length",
    "decode",
    "generate_tokens",
    "greedy_generate",
    "left_pad",
    "prefill",
    "split_params",
]
