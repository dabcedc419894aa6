"""The lm-evaluation-harness model ``neox_jax``.

Importing this module registers ``NeoxLM`` under the name ``neox_jax`` in lm-eval's
model registry. lm-eval 0.4 finds models only by import, not by entry point, so its own
``lm_eval`` command does not know ``neox_jax``; the ``neox-lm-eval`` console script
(``neox_jax/evaluation/lm_eval_cli.py``) imports this module first. Ways in:

    # 1. our CLI, from a config (perplexity and harness tasks):
    python -m neox_jax.evaluate --config=configs/evaluate.py --config.checkpoint=PATH \
        --config.harness.tasks=lambada_openai

    # 2. lm-eval's CLI with the model registered (same arguments as `lm_eval`; without
    #    installing: `python -m neox_jax.evaluation.lm_eval_cli`):
    neox-lm-eval --model neox_jax --model_args checkpoint=PATH,batch_size=16 \
        --tasks lambada_openai

    # 3. Python:
    import lm_eval
    from neox_jax.evaluation.lm_eval_adapter import NeoxLM
    lm_eval.simple_evaluate(model=NeoxLM(checkpoint=PATH), tasks=["lambada_openai"])
    # or by name: simple_evaluate(model="neox_jax",
    #     model_args="checkpoint=PATH,batch_size=16", tasks=[...])

Scoring goes through ``LogLikelihoodScorer`` (batched, bucketed, split over devices);
``loglikelihood_rolling`` uses the perplexity module's windows with ``stride =
max_length`` and the EOT token in front, as lm-eval's Hugging Face model does; and
``generate_until`` runs the project's ``Generator`` with the requests' stop strings.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import lm_eval.models  # noqa: F401  (registers lm-eval's own models before ours; see below)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from neox_jax.evaluation.perplexity import score_sequences
from neox_jax.evaluation.scoring import LogLikelihoodScorer
from neox_jax.inference import Generator, SamplingParams
from neox_jax.loading import load_model_and_tokenizer, tokenizer_for
from neox_jax.model import ModelConfig

# lm-eval's get_model() imports lm_eval.models (its built-in "hf", "vllm", ...) only when
# the registry is empty; registering ours into an empty registry would hide them.

log = logging.getLogger(__name__)


@register_model("neox_jax")
class NeoxLM(TemplateLM):
    """A neox_jax model as an lm-eval ``LM``.

    Args:
      checkpoint: model path (see ``load_model_and_tokenizer``); or pass ``config`` and ``params``.
      tokenizer: a path, or a ``neox_jax.data.tokenizer.Tokenizer`` object.
      batch_size: rows per device batch ("auto" is not supported and falls back to 8).
      max_length: longest model input; default the model's context (times RoPE factor).
      max_gen_toks: default generation budget when a task does not set one.
      dtype, attention_impl, rope_scaling_type, rope_scaling_factor: load-time overrides.
      config, params: an already loaded model (Python API).
      mesh: optional device mesh for scoring.
      **kwargs: lm-eval's generic arguments (``device``, ``max_batch_size``) are ignored.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        tokenizer=None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str | None = None,
        attention_impl: str | None = None,
        rope_scaling_type: str | None = None,
        rope_scaling_factor: float | None = None,
        *,
        config: ModelConfig | None = None,
        params=None,
        mesh=None,
        **kwargs,
    ):
        super().__init__()
        unknown = set(kwargs) - {"device", "max_batch_size", "trust_remote_code"}
        if unknown:
            raise TypeError(f"NeoxLM got unknown model_args {sorted(unknown)}.")
        if config is None:
            if checkpoint is None:
                raise ValueError("NeoxLM needs checkpoint=PATH (or config= and params=).")
            given = None if isinstance(tokenizer, str | os.PathLike) else tokenizer
            config, params, tokenizer = load_model_and_tokenizer(
                checkpoint,
                tokenizer if given is None else None,
                dtype=dtype,
                attention_impl=attention_impl,
                rope_scaling_type=rope_scaling_type,
                rope_scaling_factor=rope_scaling_factor,
            )
            tokenizer = given or tokenizer  # a Tokenizer object passed in wins
        elif isinstance(tokenizer, str | os.PathLike):  # a tokenizer, or a model folder
            tokenizer = tokenizer_for(tokenizer)
        if tokenizer is None:
            raise ValueError("NeoxLM needs a tokenizer (a path or a Tokenizer object).")
        if isinstance(batch_size, str):
            if not batch_size.isdigit():
                log.warning("batch_size=%r is not supported; using 8.", batch_size)
            batch_size = int(batch_size) if batch_size.isdigit() else 8
        self.tok = tokenizer
        self.scorer = LogLikelihoodScorer(
            config, params, batch_size=batch_size, max_length=max_length, mesh=mesh
        )
        self.config = config
        self.max_length = self.scorer.max_length
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = self.scorer.batch_size
        self.generator = Generator(
            config, self.scorer.placement.params, tokenizer, max_batch_size=self.batch_size
        )

    # ---------------------------------------------------------- construction
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lm-eval's CLI path; ``--model_args`` win over its generic ``--batch_size``."""
        from lm_eval.utils import simple_parse_args_string  # lm_eval's own parser, as its CLI uses

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """As lm-eval's, but a key in both dicts is not an error: ``arg_dict`` wins (lm-eval's
        CLI always passes ``batch_size``, so ``batch_size=`` in model_args would clash)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    # --------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        eos = self.tok.eos_id
        if eos is None:
            raise ValueError(f"{self.tok} has no eos token; set eos_token in its config.")
        return eos

    @property
    def prefix_token_id(self) -> int:
        """What an empty context / a rolling window starts from: bos, else eos (lm-eval's
        Hugging Face model's rule; the same id for GPT-NeoX/Pythia)."""
        return self.eot_token_id if self.tok.bos_id is None else self.tok.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        # As lm-eval's Hugging Face model: None adds what the tokenizer adds (a Llama bos,
        # nothing for GPT-NeoX/Pythia) unless the text starts with the bos text already.
        return self.tok.encode(string, add_special_tokens=add_special_tokens is not False)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tok, "path", "neox_jax")).replace("/", "__")

    # -------------------------------------------------------------- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """Score ``((context, continuation), context_ids, continuation_ids)`` triples."""
        results = self.scorer.score([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), answer in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-probability of each text: disjoint ``max_length`` windows, bos/eos first."""
        texts = [req.args[0] for req in requests]
        scored = score_sequences(
            self.scorer,
            [self.tok_encode(t) for t in texts],
            stride=self.max_length,
            prefix_token_id=self.prefix_token_id,
        )
        results = [lp for lp, _ in scored]
        for text, lp in zip(texts, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), lp)
        return results

    # ----------------------------------------------------------- generation
    def _sampling(self, gen_kwargs: dict[str, Any]) -> SamplingParams:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None)
        if until is None:
            until = [self.tok.decode([self.eot_token_id])]
        until = (until,) if isinstance(until, str) else tuple(u for u in until if u)
        max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if kwargs.pop("do_sample", None) is False:
            temperature = 0.0
        knobs = ("top_k", "top_p", "seed", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")  # fmt: skip
        extra = {k: kwargs.pop(k) for k in knobs if k in kwargs}
        if kwargs:
            log.warning("ignoring unsupported generation arguments %s", sorted(kwargs))
        return SamplingParams(
            max_new_tokens=max_new, temperature=temperature, stop_strings=until, **extra
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations cut at the first ``until`` string."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            sampling = self._sampling(requests[indices[0]].args[1])
            room = self.max_length - sampling.max_new_tokens
            if room < 1:
                raise ValueError(
                    f"max_gen_toks={sampling.max_new_tokens} leaves no room for a prompt in "
                    f"max_length={self.max_length}; lower max_gen_toks."
                )
            # Keep the end of a long prompt, as lm-eval's Hugging Face model does.
            prompts = [
                self.tok_encode(requests[i].args[0])[-room:] or [self.eot_token_id] for i in indices
            ]
            for i, result in zip(indices, self.generator.generate(prompts, sampling), strict=True):
                out[i] = result.text
                self.cache_hook.add_partial("generate_until", requests[i].args, result.text)
        return out
