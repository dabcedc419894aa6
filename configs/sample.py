"""Sampling from a trained or converted model.

Run (a neox_jax checkpoint, a training run directory or a Hugging Face folder):

  python -m neox_jax.sample --config=configs/sample.py --config.checkpoint=PATH \
      --config.prompt="The capital of France is"

Presets after the colon: ``configs/sample.py:greedy`` (deterministic argmax) and
``configs/sample.py:beam`` (beam search, 4 beams); the default samples with
temperature 0.8 and top-p 0.95. Other modes:

  --config.prompt_file=prompts.txt   one prompt per line (or .jsonl with "prompt"),
                                     batched; one JSON result per line on stdout
                                     (or --config.output_file=)
  --config.interactive=True          read prompts from stdin, stream each reply

Lists use Python syntax: ``--config.stop_strings="('\\n\\n',)"``.
"""

import runpy
from pathlib import Path

import ml_collections

# configs/ is not a package: the shared blocks come from the file beside this one.
COMMON = runpy.run_path(str(Path(__file__).with_name("common.py")))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The sampling config; ``arg`` picks a preset: "" (sample), "greedy" or "beam"."""
    c = ml_collections.ConfigDict()
    COMMON["add_model_source"](c)  # checkpoint, tokenizer, dtype, attention_impl, RoPE
    # Fixed KV-cache size (one compile for every request that fits); 0 = sized per request.
    c.max_cache_len = 0

    # ---------------------------------------------------------------- devices
    # Tensor parallelism: attention heads, MLP and vocabulary split over this many devices.
    c.tensor_parallel = 1
    # Pipeline parallelism: the layers split over this many devices (stages).
    c.pipeline_stages = 1
    # Microbatches the pipeline cuts a batch into; 0 = one per stage.
    c.pipeline_microbatches = 0

    # ------------------------------------------------------------------ input
    # One prompt; its continuation is streamed to stdout.
    c.prompt = ""
    # A file of prompts: one per line, or JSON lines with a "prompt" field (.jsonl).
    c.prompt_file = ""
    # Read prompts from stdin in a loop (an empty line or EOF ends it).
    c.interactive = False
    # Prompts per device batch in prompt_file mode.
    c.batch_size = 16
    # Write prompt_file results (JSON lines) here instead of stdout.
    c.output_file = ""
    # Stream single-prompt and interactive output token by token (else print at the end).
    c.stream = True
    # Print the prompt before its continuation (single prompt and interactive modes).
    c.echo_prompt = False
    # Chat mode: each prompt is a user turn, formatted with the chat template the SFT
    # fine-tuning used (neox_jax.finetune.chat); interactive mode keeps the conversation.
    c.chat = False
    # The chat template: a Jinja file, an inline template, or "" for the default one.
    c.chat_template = ""
    # Tool calling in chat mode: a JSON file of tool schemas (OpenAI's / transformers'
    # {"type": "function", "function": {...}}), rendered by the chat template; replies are
    # parsed for calls, printed as {"tool_calls": [...]}. "" = no tools.
    c.tools_file = ""
    # How replies are parsed for calls: "auto" (from the template), "qwen" or "mistral".
    c.tool_call_format = "auto"

    # --------------------------------------------------------------- sampling
    # Tokens to generate at most per prompt (prompt + this must fit the context).
    c.max_new_tokens = 128
    # Softmax temperature; 0 = greedy decoding.
    c.temperature = 0.8
    # Keep only the k most likely tokens; 0 = off.
    c.top_k = 0
    # Nucleus sampling: keep the smallest set of tokens with probability >= top_p; 1.0 = off.
    c.top_p = 0.95
    # Penalise tokens already in the prompt or output (transformers' semantics); 1.0 = off.
    c.repetition_penalty = 1.0
    # OpenAI's penalties, -2 to 2, 0 = off: a token's logit loses presence_penalty once if
    # the output holds it, frequency_penalty for every time it does (the prompt not counted).
    c.presence_penalty = 0.0
    c.frequency_penalty = 0.0
    # Seed of the sampler: the same seed and prompt give the same output.
    c.seed = 0
    # Token ids that end generation, besides the tokenizer's eos, e.g. "(187,)".
    c.stop_token_ids = ()
    # Strings that end generation; the output is cut before them, e.g. "('\n\n',)".
    c.stop_strings = ()
    # Keep generating past the eos token.
    c.ignore_eos = False
    # Drop tokens from the left of a prompt too long for the context, instead of failing.
    c.truncate_prompt = False
    # Beam width; 1 = no beam search (beam search needs temperature=0, top_k=0, top_p=1).
    c.num_beams = 1
    # Beam score = sum of log-probs / generated_length ** length_penalty.
    c.length_penalty = 1.0
    # Beam stop rule, as transformers: "false" (heuristic), "true" (once num_beams
    # hypotheses finished) or "never" (exact, scores at the longest possible length).
    c.early_stopping = "false"

    if arg == "greedy":
        c.temperature, c.top_p = 0.0, 1.0
    elif arg == "beam":
        c.temperature, c.top_p, c.num_beams = 0.0, 1.0, 4
    elif arg:
        raise ValueError(f"Unknown preset {arg!r}; choose '', 'greedy' or 'beam'.")
    return c
