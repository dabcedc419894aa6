"""Load generator for the serving benchmark: Poisson arrivals, mixed lengths, bounded.

Two modes, the same workload (seeded, so every mode sees the same requests):

  server   the official ``openai`` client under asyncio against a running
           ``python -m neox_jax.serve`` (continuous batching, or ``num_slots=1`` for
           one request at a time). Streams; the first chunk with text is the first
           token, the final usage chunk counts the tokens. No logprobs by default (the
           static baseline computes none either); ``--logprobs`` asks for ``logprobs=0``
           and counts the tokens chunk by chunk, as the first sessions measured.
  static   in-process static batching: arrivals are queued, and whenever the model is
           free the next batch (up to ``--batch`` waiting requests) runs
           ``Generator.generate`` to the end. A request's first token is known only when
           its batch ends, so its TTFT is its batch's end (what a client of such a
           server would see).
  hf       in-process ``transformers`` ``generate`` on one request at a time (PyTorch,
           float32), the reference users compare against; a streamer times the first
           token.
  alternate  ``server`` and ``static`` in turns on each workload (server, static,
           server, static with ``--rounds=2``), so both see the same load on a shared
           machine; the static model lives in this process, the server in its own.

Prompts are random token ids (lengths uniform in ``--prompt-len``), outputs exactly
``max_tokens`` (uniform in ``--output-len``) with ``ignore_eos``. Reports output
tokens/s, requests/s, TTFT and time per output token (p50/p99) per request rate, as
JSON lines. See README.md beside this file for the full procedure.

  python experiments/serving/loadgen.py server --base-url=http://127.0.0.1:8000/v1 \\
      --model=pythia-70m --vocab=50304 --rates=1,2,4,8 --requests=200
  python experiments/serving/loadgen.py static --checkpoint=/tmp/pythia-70m --batch=16 \\
      --rates=1,2,4,8 --requests=200
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class Workload:
    arrivals: list[float]  # seconds from the start
    prompts: list[list[int]]
    max_tokens: list[int]


def make_workload(args, rate: float) -> Workload:
    """``args.requests`` requests with exponential gaps of mean ``1 / rate``."""
    rng = np.random.default_rng(args.seed)
    n = args.requests
    gaps = rng.exponential(1.0 / rate, n)
    lo, hi = args.prompt_len
    prompts = [rng.integers(2, args.vocab, int(k)).tolist() for k in rng.integers(lo, hi + 1, n)]
    if args.shared_prefix:  # a system prompt / RAG context every request starts with
        shared = rng.integers(2, args.vocab, args.shared_prefix).tolist()
        prompts = [shared + p for p in prompts]
    out_lo, out_hi = args.output_len
    return Workload(
        arrivals=np.cumsum(gaps).tolist(),
        prompts=prompts,
        max_tokens=rng.integers(out_lo, out_hi + 1, n).tolist(),
    )


@dataclasses.dataclass
class Record:
    arrival: float
    first: float | None = None
    done: float | None = None
    tokens: int = 0
    error: str | None = None


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` (None: this process), all threads.

    On a machine shared with other jobs, wall-clock throughput depends on how much of
    the CPU the others left; tokens per CPU-second of the serving process much less."""
    if pid is None:
        return time.process_time()
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # from field 3 (state) on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(mode: str, rate: float, records: list[Record], makespan: float) -> dict:
    ok = [r for r in records if r.error is None and r.done is not None]
    ttft = [r.first - r.arrival for r in ok]
    tpot = [(r.done - r.first) / (r.tokens - 1) for r in ok if r.tokens > 1]
    tokens = sum(r.tokens for r in ok)

    def pct(xs, q):
        return float(np.percentile(xs, q)) if xs else None

    return {
        "mode": mode,
        "rate": rate,
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "seconds": makespan,
        "output_tokens_per_s": tokens / makespan,
        "requests_per_s": len(ok) / makespan,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50),
        "tpot_p99_s": pct(tpot, 99),
    }


# ---------------------------------------------------------------------- server
async def run_server(args, rate: float) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=args.base_url, api_key="unused", timeout=args.timeout)
    if not args.model:
        args.model = (await client.models.list()).data[0].id
    work = make_workload(args, rate)
    records = [Record(arrival=a) for a in work.arrivals]
    limit = asyncio.Semaphore(args.max_in_flight)
    start, cpu = time.perf_counter(), cpu_seconds(args.server_pid)

    async def one(i: int):
        await asyncio.sleep(max(0.0, start + work.arrivals[i] - time.perf_counter()))
        r = records[i]
        r.arrival = time.perf_counter() - start
        async with limit:
            try:
                stream = await client.completions.create(
                    model=args.model, prompt=work.prompts[i], max_tokens=work.max_tokens[i],
                    temperature=0, stream=True, extra_body={"ignore_eos": True},
                    stream_options={"include_usage": True},
                    **({"logprobs": 0} if args.logprobs else {}),
                )  # fmt: skip
                usage = None
                async for chunk in stream:
                    usage = chunk.usage or usage
                    if not chunk.choices:
                        continue
                    c = chunk.choices[0]
                    n = len(c.logprobs.tokens or []) if c.logprobs else 0
                    if (n or c.text) and r.first is None:
                        r.first = time.perf_counter() - start
                    r.tokens += n
                r.done = time.perf_counter() - start
                if not args.logprobs:
                    r.tokens = usage.completion_tokens
            except openai.APIError as e:
                r.error = f"{type(e).__name__}: {e}"

    await asyncio.gather(*(one(i) for i in range(len(records))))
    await client.close()
    row = summarize(f"server:{args.label}", rate, records, time.perf_counter() - start)
    return with_cpu(row, cpu_seconds(args.server_pid) - cpu)


def with_cpu(row: dict, seconds: float) -> dict:
    """``row`` with the serving process's CPU seconds and output tokens per CPU-second."""
    row["cpu_seconds"] = seconds
    row["output_tokens_per_cpu_s"] = row["output_tokens_per_s"] * row["seconds"] / seconds
    return row


# ------------------------------------------------------------- in process
def run_queued(args, rate: float, mode: str, batch: int, serve) -> dict:
    """In-process baseline: arrivals are queued; whenever the model is free, up to
    ``batch`` waiting requests go to ``serve(indices, work, records, start)``, which runs
    them to the end and fills their records."""
    work = make_workload(args, rate)
    records = [Record(arrival=a) for a in work.arrivals]
    waiting: list[int] = []
    cond = threading.Condition()
    start, cpu = time.perf_counter(), cpu_seconds(None)

    def arrivals():
        for i, a in enumerate(work.arrivals):
            time.sleep(max(0.0, start + a - time.perf_counter()))
            with cond:
                waiting.append(i)
                cond.notify()

    feeder = threading.Thread(target=arrivals, daemon=True)
    feeder.start()
    served = 0
    while served < len(records):
        with cond:
            while not waiting:
                cond.wait()
            group, waiting[:] = waiting[:batch], waiting[batch:]
        serve(group, work, records, start)
        served += len(group)
    feeder.join()
    row = summarize(mode, rate, records, time.perf_counter() - start)
    return with_cpu(row, cpu_seconds(None) - cpu)


def static_server(generator):
    """Static batching: ``Generator.generate`` on the whole batch, to its end."""
    from neox_jax.inference import SamplingParams

    def serve(group, work, records, start):
        samplings = [
            SamplingParams(max_new_tokens=work.max_tokens[i], ignore_eos=True) for i in group
        ]
        generator.generate([work.prompts[i] for i in group], samplings)
        end = time.perf_counter() - start
        for i in group:
            # No streaming: every token of the batch is known at its end.
            records[i].first = records[i].done = end
            records[i].tokens = work.max_tokens[i]

    return serve


class _FirstToken:
    """A ``transformers`` streamer that notes when the first new token exists: ``put``
    is called once with the prompt, then once per generated token."""

    def __init__(self, record: Record, start: float):
        self.record, self.start, self.calls = record, start, 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.record.first = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def hf_server(model):
    """``transformers``' ``generate`` on one request at a time, greedy, exact length."""
    import torch

    def serve(group, work, records, start):
        for i in group:
            ids = torch.tensor([work.prompts[i]])
            n = work.max_tokens[i]
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                    streamer=_FirstToken(records[i], start),
                )  # fmt: skip
            records[i].done = time.perf_counter() - start
            records[i].tokens = out.shape[1] - ids.shape[1]

    return serve


def warm_up(generator, args) -> None:
    """Compile every (batch, prompt bucket) shape the workload can hit, untimed."""
    from neox_jax.inference import SamplingParams, bucket_length

    lo, hi = (n + args.shared_prefix for n in args.prompt_len)
    lengths = sorted({bucket_length(n) for n in range(lo, hi + 1)})
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b <= args.batch]
    start = time.perf_counter()
    for b in batches:
        for n in lengths:
            generator.generate([[1] * n] * b, SamplingParams(max_new_tokens=2, ignore_eos=True))
    print(
        f"static: compiled {len(batches) * len(lengths)} shapes in "
        f"{time.perf_counter() - start:.0f}s",
        file=sys.stderr,
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=("server", "static", "hf", "alternate"))
    p.add_argument("--rates", default="1,2,4,8", help="requests per second, comma-separated")
    p.add_argument(
        "--requests",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[200],
        help="requests per rate (bounded); a comma-separated list runs each",
    )
    p.add_argument("--rounds", type=int, default=1, help="repeat every run this many times")
    p.add_argument("--prompt-len", type=lambda s: tuple(map(int, s.split(","))), default=(32, 512))
    p.add_argument("--output-len", type=lambda s: tuple(map(int, s.split(","))), default=(16, 256))
    p.add_argument("--vocab", type=int, default=50304, help="prompt ids are drawn below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shared-prefix", type=int, default=0, help="tokens every prompt starts with (0 = none)"
    )
    p.add_argument("--out", default="", help="append JSON lines here (default: stdout only)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="")
    p.add_argument("--label", default="continuous", help="names the server's setup in the output")
    p.add_argument(
        "--server-pid", type=int, default=None, help="server mode: count this process's CPU time"
    )
    p.add_argument("--max-in-flight", type=int, default=256, help="client-side bound")
    p.add_argument("--logprobs", action="store_true", help="server mode: stream with logprobs=0")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--checkpoint", default="", help="static / hf modes: the model to load")
    p.add_argument("--batch", type=int, default=16, help="static mode: batch size")
    p.add_argument("--dtype", default="", help="static mode: compute dtype (as the server's)")
    p.add_argument("--tensor-parallel", type=int, default=1, help="static mode: devices")
    args = p.parse_args(argv)
    if args.mode in ("static", "alternate"):
        from neox_jax.inference import Generator, bucket_length
        from neox_jax.inference.cli import inference_mesh
        from neox_jax.loading import load_model_and_tokenizer

        mesh = inference_mesh(args.tensor_parallel, 1)
        config, params, _ = load_model_and_tokenizer(
            args.checkpoint, dtype=args.dtype or None, mesh=mesh
        )
        # One cache size for every batch, room for the longest prompt's bucket: the
        # prompt buckets are then the only shapes (all compiled by warm_up).
        cache = bucket_length(args.prompt_len[1] + args.shared_prefix) + args.output_len[1]
        generator = Generator(
            config, params, max_cache_len=cache, max_batch_size=args.batch, mesh=mesh
        )
        warm_up(generator, args)
        mode, batch, serve = f"static:batch={args.batch}", args.batch, static_server(generator)
    elif args.mode == "hf":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint)
        model.eval()
        serve = hf_server(model)
        warm = argparse.Namespace(**{**vars(args), "requests": 1})
        serve([0], make_workload(warm, 1.0), [Record(0.0)], 0.0)  # warm up, untimed
        mode, batch = "transformers:one-at-a-time", 1
    # alternate: server, static, server, static, ... on each workload, so that both see
    # the same load on a shared machine.
    kinds = ("server", "static") if args.mode == "alternate" else (args.mode,)
    for round_ in range(args.rounds):
        for n in args.requests:
            for rate in (float(r) for r in args.rates.split(",")):
                for kind in kinds:
                    run = argparse.Namespace(**{**vars(args), "requests": n})
                    if kind == "server":
                        row = asyncio.run(run_server(run, rate))
                    else:
                        row = run_queued(run, rate, mode, batch, serve)
                    if kind == "static":  # not observable unstreamed
                        row["tpot_p50_s"] = row["tpot_p99_s"] = None
                    row["round"] = round_ + 1
                    # the machine's load (1, 5, 15 min) at the end
                    row["load_average"] = os.getloadavg()
                    line = json.dumps(row)
                    print(line, flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
