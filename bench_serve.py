"""
Serving throughput: what batching many clients' replies into the same forward passes buys (engine.py),
against serving them one at a time, in the same run.

    OMP_NUM_THREADS=1 python bench_serve.py                        # GPT-2 124M, random weights, on the CPU
    python bench_serve.py --model mini --clients 1,4,8 --requests 2 --max_tokens 64 --json

Each of C clients (threads) sends --requests requests one after the other, each the next as soon as
the last is answered: a prompt of 16 to 64 random tokens, a reply of --max_tokens tokens (no stop
token is set, so every reply is that long). The engine runs them one at a time (1 row), then with
--max_batch rows (batched), --repeats times in turns. Figures per mode and C, the median over the
repeats: aggregate tokens/s (all replies' tokens over the wall time), time to first token (median
and worst), the slowest client's tokens/s (a starved client would show there) and the rows per
decode step. The engine is driven directly, without HTTP, so that what is measured is the batching;
the HTTP layer's cost per token is the same in both modes. It lives here and not in bench.py, which
holds the per-stage training benchmarks (and is at its length limit): this one measures serve.py.
"""

import argparse
import json
import random
import statistics
import threading
import time

import torch

from config import bounded
from device import add_device_args, pick_device, setup_precision
from engine import Engine, Sampling
from errors import UserError, exit_on_error
from model import GPT, MODEL_SIZES, GPTConfig


def client(engine, rng, requests, max_tokens, seconds, tokens):
    """One client: requests sent one after the other; per request, (time to first token, tokens), and
    its own tokens/s over its whole run appended to tokens."""
    start = time.perf_counter()
    total = 0
    for _ in range(requests):
        prompt = [rng.randrange(engine.model.config.vocab_size) for _ in range(rng.randint(16, LONGEST_PROMPT))]
        ended, got, first = threading.Event(), [], []

        def emit(event, got=got, first=first, ended=ended):
            if event[0] == "token":
                if not first:
                    first.append(time.perf_counter())
                got.append(event[1])
            else:
                ended.set()

        sent = time.perf_counter()
        engine.submit(prompt, Sampling(max_tokens=max_tokens, top_k=50, seed=rng.randrange(2**32)), emit)
        ended.wait()
        seconds.append(first[0] - sent if first else float("nan"))
        total += len(got)
    tokens.append(total / (time.perf_counter() - start))


def measure(model, precision, max_batch, clients, requests, max_tokens):
    """The figures of C clients served with max_batch rows."""
    engine = Engine(model, stop_ids=[], precision=precision, max_batch=max_batch, max_queue=clients).start()
    first_token, per_client = [], []
    threads = [
        threading.Thread(target=client, args=(engine, random.Random(i), requests, max_tokens, first_token, per_client))
        for i in range(clients)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    engine.close()
    return {
        "tokens_per_s": clients * requests * max_tokens / seconds,
        "first_token_ms_median": 1000 * statistics.median(first_token),
        "first_token_ms_worst": 1000 * max(first_token),
        "slowest_client_tokens_per_s": min(per_client),
        "rows_per_step": engine.rows_stepped / max(engine.steps, 1),
        "seconds": seconds,
    }


LONGEST_PROMPT = 64  # tokens: each prompt is 16 to this many


def client_counts(text):
    """--clients 1,4,8: positive whole numbers."""
    counts = [int(n) for n in text.split(",") if n.strip().isdigit() and int(n) > 0]
    if len(counts) != len(text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers of clients such as 1,4,8")
    return counts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_SIZES), default="gpt2", help="the shape, random weights")
    parser.add_argument(
        "--clients", type=client_counts, default=[1, 4, 8], help="numbers of concurrent clients, e.g. 1,4,8"
    )
    parser.add_argument("--requests", type=bounded(int, 1, None), default=2, help="requests per client")
    parser.add_argument("--max_tokens", type=bounded(int, 1, None), default=64, help="tokens per reply")
    parser.add_argument("--max_batch", type=bounded(int, 1, None), default=8, help="rows of the batched engine")
    parser.add_argument(
        "--repeats", type=bounded(int, 1, None), default=1, help="runs of each mode, in turns (figures: their median)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON lines")
    add_device_args(parser, dtype="float32")
    return parser.parse_args(argv)


@exit_on_error
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device, local_rank=0)
    precision = setup_precision(args.dtype, device.split(":")[0])
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(args.model)).to(device).eval()
    if LONGEST_PROMPT + args.max_tokens > model.config.block_size:
        longest = model.config.block_size - LONGEST_PROMPT
        raise UserError(
            f"--max_tokens {args.max_tokens}: prompts of up to {LONGEST_PROMPT} tokens leave {longest} of "
            f"{args.model}'s context for the reply: ask for at most {longest}"
        )
    print(
        f"{args.model}: {model.num_params() / 1e6:.1f}M parameters, random weights, {device}, "
        f"{torch.get_num_threads()} threads"
    )
    measure(model, precision, args.max_batch, 2, 1, 8)  # warm-up: the allocator, every kernel
    modes = (("one at a time", 1), ("batched", args.max_batch))
    for clients in args.clients:
        runs = {mode: [] for mode, _ in modes}
        for _ in range(args.repeats):  # the modes in turns: a shared machine's slow minutes fall on both
            for mode, max_batch in modes:
                runs[mode].append(measure(model, precision, max_batch, clients, args.requests, args.max_tokens))
        results = {mode: {key: statistics.median(r[key] for r in runs[mode]) for key in runs[mode][0]} for mode in runs}
        for mode, figures in results.items():
            figures = {"clients": clients, "mode": mode, **figures}
            print(
                json.dumps(figures)
                if args.json
                else "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
            )
        speedup = results["batched"]["tokens_per_s"] / results["one at a time"]["tokens_per_s"]
        print(
            json.dumps({"clients": clients, "speedup": speedup})
            if args.json
            else f"{clients} clients: batched {speedup:.2f}x the aggregate tokens/s of one at a time"
        )


if __name__ == "__main__":
    main()
