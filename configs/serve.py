"""Serving a model over an OpenAI-compatible HTTP API with continuous batching.

Run (a neox_jax checkpoint, a training run directory, a LoRA run or a Hugging Face folder):

  python -m neox_jax.serve --config=configs/serve.py --config.checkpoint=PATH

then talk to it with any OpenAI client at http://127.0.0.1:8000/v1 (see README.md,
"Serving"). Every field below can be overridden with --config.FIELD=VALUE.
"""

import runpy
from pathlib import Path

import ml_collections

# configs/ is not a package: the shared blocks come from the file beside this one.
COMMON = runpy.run_path(str(Path(__file__).with_name("common.py")))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The serving config (``arg`` is unused: there are no presets)."""
    if arg:
        raise ValueError(f"configs/serve.py has no presets, got {arg!r}.")
    c = ml_collections.ConfigDict()
    COMMON["add_model_source"](c)  # checkpoint, tokenizer, dtype, attention_impl, RoPE
    # The model id clients send ("model" field); "" = the checkpoint folder's name.
    c.model_name = ""
    # Chat template for /v1/chat/completions: a Jinja file, inline text, or "" for the
    # default (neox_jax.finetune.chat.DEFAULT_CHAT_TEMPLATE, the one SFT trains with).
    c.chat_template = ""
    # How chat replies are parsed for tool calls when a request gives tools: "auto" (the
    # format the chat template writes calls in), "qwen" (<tool_call> JSON) or "mistral"
    # ([TOOL_CALLS]); see neox_jax.serving.tools.
    c.tool_call_format = "auto"
    # Sampling defaults for request fields left unset (temperature, top_p, top_k,
    # repetition_penalty): "auto" = the model folder's generation_config.json (as vLLM's
    # --generation-config auto; do_sample=false there means greedy), "none" = OpenAI's
    # (temperature 1, no top-p/top-k). Its eos ids always end requests.
    c.generation_config = "auto"

    # ----------------------------------------------------------------- engine
    # Decode slots: requests generated at once (continuous batching).
    c.num_slots = 8
    # Tokens per request (prompt + generated) = KV-cache columns per slot; 0 = the
    # model's context. Cache memory is num_slots x max_len x (bytes per token).
    c.max_len = 0
    # Padded prompt lengths, compiled at start-up, e.g. "(64, 256, 1024)"; () = powers of
    # two from 16 up to max_len.
    c.prefill_buckets = ()
    # Prompts longer than this are prefilled in chunks of this many tokens, one chunk
    # between two decode steps, so a long prompt never stalls the running requests for
    # long; must divide max_len. 0 = off (every prompt in one prefill).
    c.prefill_chunk = 0
    # While requests decode, the chunks of prompts longer than prefill_chunk run inside
    # the decode calls' weight products instead of calls of their own between decode
    # steps (Sarathi/vLLM's chunked prefill): a 64-token chunk adds ~12 CPU-ms to a
    # 16-slot pythia-70m step, against ~42 ms as a call of its own
    # (experiments/serving/README.md, fifth session). Fused CPU layers on one device
    # with the "slots" cache only; elsewhere chunks run in calls of their own.
    c.mix_prefill = True
    # Automatic prefix caching: keep the KV of up to this many prompt blocks (of
    # prefill_chunk tokens) and reuse them for prompts that begin with the same tokens
    # (a system prompt, a RAG context). 0 = off; needs prefill_chunk.
    c.prefix_cache_blocks = 0
    # The most decode steps per device call: fewer host round trips (and HTTP events)
    # per token. 16 is what the serving benchmark measures its throughput with
    # (experiments/serving/README.md); with 1 the engine makes a device call, a host
    # loop and an SSE event per token. It does not cost latency where it matters: a
    # call ends early when a request ends while others wait for a slot (the slot is
    # refilled at once) and runs one step while requests wait beside free slots; a
    # request arriving while nobody waits is admitted when the running call ends, and
    # max_call_seconds bounds how long that is.
    c.steps_per_call = 16
    # A call runs fewer steps when steps_per_call would take longer than this many
    # seconds at the measured step time (0 = no cap): it bounds the wait of a request
    # that arrives mid-call and the gap between a stream's events on slow hardware or
    # big models (a 16-step call of a 60 ms step would be ~1 s). It costs throughput
    # where a step is slow: at pythia-160m on 2 CPU cores (~0.15 s per 16-slot step)
    # 0.25 s cost ~7 % of tokens/s for ~6 % lower p99 time to first token
    # (experiments/serving/README.md, fifth session); 0 for throughput on such hosts.
    c.max_call_seconds = 0.25
    # Slot counts a decode call may compute, e.g. "(4, 8)": each call computes the
    # smallest that holds the running requests (moved down into free slots), so a
    # half-empty batch costs about half; () = powers of two from 4 below num_slots.
    # One device, contiguous cache only (else every call computes all num_slots).
    c.slot_buckets = ()
    # KV cache: "slots" (each slot owns max_len contiguous columns) or "paged" (the slots
    # share num_pages pages of page_size tokens; a request holds the pages of its prompt
    # plus max_tokens, and waits in the queue while too few are free: with lengths that
    # vary, many more requests fit in the same memory; raise num_slots to use them).
    # page_size must divide max_len. Paged does not run with tensor/pipeline parallelism.
    c.kv_cache = "slots"
    c.page_size = 16
    c.num_pages = 0  # 0 = as many tokens as num_slots x max_len (the slots' memory)
    # The paged cache's decode attention: "gather" (XLA: each slot's pages gathered into a
    # max_len row, any device) or "kernel" (the Pallas paged kernel, which reads only each
    # request's own pages: for a GPU; lowered for CUDA in the tests but not yet run on
    # one; "interpret" runs it in the Pallas interpreter, slowly, on any device).
    c.paged_attention = "gather"
    # Requests that may wait for a slot; beyond it the server answers 429.
    c.max_queue = 64
    # Prompts admitted between two decode steps (bounds how long decoding pauses).
    c.max_prefills_per_step = 4
    # Most choices per request (n) and most logprobs alternatives per token.
    c.max_n = 8
    c.max_logprobs = 5
    # Most stop token ids a request may name.
    c.max_stop_ids = 8
    # Decode from per-layer copies of the weights (faster on CPU); while splitting, the
    # layer weights are held twice: set False when they fill more than half the memory.
    c.split_layers = True

    # ---------------------------------------------------------------- devices
    # Tensor parallelism: attention heads, MLP, vocabulary and the KV cache split over
    # this many devices (the rules table's "tensor" axis).
    c.tensor_parallel = 1
    # Pipeline parallelism: the layers split over this many devices (the "stage" axis);
    # every prefill and decode step runs them as a pipeline. Needs the layer count to
    # divide evenly. Devices used: tensor_parallel x pipeline_stages.
    c.pipeline_stages = 1

    # ----------------------------------------------------------------- server
    # Address to listen on; 127.0.0.1 serves this machine only, 0.0.0.0 every interface.
    c.host = "127.0.0.1"
    c.port = 8000
    # Seconds in-flight requests get to finish after SIGTERM before they are cancelled.
    c.shutdown_timeout = 30.0
    # Compile every prefill bucket and decode step before listening.
    c.warmup = True
    return c
