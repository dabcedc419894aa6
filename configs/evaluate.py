"""Evaluation: perplexity and lm-evaluation-harness tasks, from one loaded model.

  python -m neox_jax.evaluate --config=configs/evaluate.py --config.checkpoint=PATH \
      --config.perplexity.text_file=held_out.txt --config.perplexity.stride=512

  python -m neox_jax.evaluate --config=configs/evaluate.py --config.checkpoint=PATH \
      --config.harness.tasks=lambada_openai,hellaswag --config.harness.limit=100

  # local tasks: a folder of lm-eval YAML files (dataset_path: json + data_files)
  python -m neox_jax.evaluate --config=configs/evaluate.py --config.checkpoint=PATH \
      --config.harness.include_path=my_tasks/ --config.harness.tasks=my_task \
      --config.harness.include_defaults=False

The preset ``configs/evaluate.py:quick`` limits every harness task to 50 documents and
perplexity to 50 sequences (a smoke test). Results are printed as JSON (and written to
``--config.output_file=``).
"""

import runpy
from pathlib import Path

import ml_collections

# configs/ is not a package: the shared blocks come from the file beside this one.
COMMON = runpy.run_path(str(Path(__file__).with_name("common.py")))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The evaluation config; ``arg``: "" (full) or "quick"."""
    c = ml_collections.ConfigDict()
    COMMON["add_model_source"](c)  # checkpoint, tokenizer, dtype, attention_impl, RoPE
    # Rows per device batch (rounded up to a multiple of the device count).
    c.batch_size = 8
    # Longest model input in tokens; 0 = the model's context (times the RoPE factor).
    c.max_length = 0
    # Also write the results (JSON) here.
    c.output_file = ""

    # ------------------------------------------------------------- perplexity
    c.perplexity = ml_collections.ConfigDict()
    # A UTF-8 text file, scored as one token sequence (the Hugging Face recipe); a .jsonl,
    # .json or .parquet file (wikitext as datasets exports it): its records' "text" joined
    # by blank lines, as the recipe joins them. Compressed files are read through.
    c.perplexity.text_file = ""
    # A Megatron indexed dataset prefix (<prefix>.bin/.idx); each sequence on its own.
    c.perplexity.indexed_dataset = ""
    # Tokens scored per window after the first; each sees >= max_length - stride + 1
    # tokens of context. 0 = max_length (disjoint windows, lm-eval's rolling convention).
    c.perplexity.stride = 0
    # Put the tokenizer's EOS in front of each sequence so its first token is scored too.
    c.perplexity.prefix_eos = True
    # Indexed dataset: score only the first N sequences (0 = all).
    c.perplexity.max_sequences = 0

    # ---------------------------------------------------------------- harness
    c.harness = ml_collections.ConfigDict()
    # Comma-separated lm-eval task names (or paths to task YAML files); "" = none.
    c.harness.tasks = ""
    # Comma-separated folders of task YAML files to add to lm-eval's registry.
    c.harness.include_path = ""
    # Index lm-eval's built-in tasks too (takes ~15 s; False for local tasks only).
    c.harness.include_defaults = True
    # Shots per task; -1 = each task's default.
    c.harness.num_fewshot = -1
    # Documents per task: 0 = all, >= 1 a count, < 1 a fraction.
    c.harness.limit = 0.0
    # Default generation budget of generate_until tasks that set none.
    c.harness.max_gen_toks = 256
    # Bootstrap resamples for standard errors (0 = skip, fast).
    c.harness.bootstrap_iters = 0
    # Seeds lm-eval's few-shot sampling and shuffling.
    c.harness.seed = 1234

    if arg == "quick":
        c.harness.limit = 50.0
        c.perplexity.max_sequences = 50
    elif arg:
        raise ValueError(f"Unknown preset {arg!r}; choose '' or 'quick'.")
    return c
