"""
Benchmarks: measured speed, MFU and memory of every stage of the pipeline.

    python bench.py fineweb --data_files ../shared/data/fineweb_sample   # tokenizer pipeline vs raw tiktoken
    python bench.py dataloader                                            # DataLoaderLite on a 100M-token shard
    python bench.py train --model gpt2 --batch_size 64 --seq_len 1024     # training step tokens/s and MFU
    python bench.py hellaswag --model gpt2                                # evaluation examples/s
    add --json to any of them for machine-readable output

Every figure in docs/benchmarks.md comes from one of these commands.
"""

import argparse
import json


# ---- fineweb.py -------------------------------------------------------------------------------
def add_fineweb_args(parser):
    pass


def bench_fineweb(args):
    raise SystemExit("bench.py fineweb: not written yet")


# ---- dataloader.py ----------------------------------------------------------------------------
# Imports sit inside these functions, so that `bench.py <other benchmark>` does not pay for them.
def add_dataloader_args(parser):
    parser.add_argument("--data_dir", default=None,
                        help="folder of shards to read its first train shard (default: write a temporary shard)")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000,
                        help="tokens in the temporary shard (fineweb.py's shard size)")
    parser.add_argument("--batch_size", type=int, default=64, help="B, sequences per batch")
    parser.add_argument("--seq_len", type=int, default=1024, help="T, tokens per sequence")
    parser.add_argument("--batches", type=int, default=None, help="batches to read (default: the whole shard once)")


def bench_dataloader(args):
    """Open time, batches/s and peak RSS of DataLoaderLite and of the reference recipe's loader (the
    whole shard as an int64 tensor) reading the same shard."""
    import os
    import tempfile

    if args.data_dir is not None:
        return dataloader_results(args, args.data_dir)
    with tempfile.TemporaryDirectory() as data_root:  # deleted afterwards, even on Ctrl-C
        write_random_shard(os.path.join(data_root, "bench_train_000000.npy"), args.shard_tokens)
        return dataloader_results(args, data_root)


def write_random_shard(path, n_tokens, chunk=2**24):
    """A shard as fineweb.py writes it, filled piece by piece so this process never holds it whole."""
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(n_tokens,))
    for start in range(0, n_tokens, chunk):
        tokens[start : start + chunk] = rng.integers(0, 50257, size=min(chunk, n_tokens - start), dtype=np.uint16)
    tokens.flush()


def dataloader_results(args, data_root):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from dataloader import DataLoaderLite

    loader = DataLoaderLite(args.batch_size, args.seq_len, data_root=data_root)  # checks the shards
    shard, offset = loader.shards[0], loader.shard_offsets[0]
    batches = args.batches or loader.shard_windows[0]
    with open(shard, "rb") as f:  # into the page cache first, so neither approach pays for the disk
        while f.read(2**24):
            pass
    results = {"shard": shard, "shard_tokens": loader.shard_tokens[0], "batch_tokens": args.batch_size * args.seq_len,
               "batches": batches}
    for approach in ("reference", "ours"):
        # A fresh process for each approach, so that each peak RSS is its own.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            figures = pool.submit(dataloader_figures, approach, data_root, shard, offset, args.batch_size,
                                  args.seq_len, batches).result()
        results.update({f"{approach}_{name}": value for name, value in figures.items()})
    return results


def dataloader_figures(approach, data_root, shard, offset, B, T, batches):
    """Run in a fresh process: seconds to open the shard, batches/s, and RSS in MB before and at peak."""
    import time

    from dataloader import DataLoaderLite

    baseline = rss_mb("VmHWM")  # Python, numpy and torch
    start = time.perf_counter()
    if approach == "ours":
        next_batch = DataLoaderLite(B, T, data_root=data_root).next_batch
    else:
        next_batch = reference_loader(shard, offset, B, T)
    opened = time.perf_counter()
    for _ in range(batches):
        x, y = next_batch()
    seconds = time.perf_counter() - opened
    peak = rss_mb("VmHWM")
    return {"open_s": opened - start, "batches_per_s": batches / seconds, "baseline_rss_mb": baseline,
            "peak_rss_mb": peak, "peak_over_baseline_mb": peak - baseline, "final_rss_mb": rss_mb("VmRSS")}


def reference_loader(shard, offset, B, T):
    """next_batch of the reference recipe: the shard loaded whole, widened to int64, sliced into views."""
    import numpy as np
    import torch

    tokens = np.load(shard) if shard.endswith(".npy") else np.fromfile(shard, dtype=np.uint16, offset=offset)
    tokens = torch.tensor(tokens.astype(np.int32), dtype=torch.long)  # the recipe's steps: uint16 -> int32 -> int64
    position = 0

    def next_batch():
        nonlocal position
        buf = tokens[position : position + B * T + 1]
        position += B * T
        if position + B * T + 1 > len(tokens):
            position = 0
        return buf[:-1].view(B, T), buf[1:].view(B, T)

    return next_batch


def rss_mb(field):
    """VmRSS (now) or VmHWM (peak so far) of this process, in MB. (Not getrusage's ru_maxrss, which
    after a spawn can report the parent's peak.)"""
    import os
    import re

    if not os.path.exists("/proc/self/status"):
        raise SystemExit("bench.py dataloader reads memory figures from /proc: it runs on Linux only")
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) / 1024


# ---- training step ----------------------------------------------------------------------------
def add_train_args(parser):
    parser.add_argument("--model", default="gpt2", help="a size in model.MODEL_SIZES: gpt2, gpt2-medium, mini, tiny...")
    parser.add_argument("--batch_size", type=int, default=64, help="sequences per step (B)")
    parser.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence (T)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32 (as in train_gpt2.py)")
    parser.add_argument("--compile", default="auto", help="auto, 1, 0 (as in train_gpt2.py)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator, caches)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")


def bench_train(args):
    """Speed of train_gpt2.py's step (forward, backward, clip, AdamW) on random tokens, one process."""
    import logging
    import time

    import torch

    from device import compile_model, peak_flops, peak_memory_bytes, pick_device, setup_precision
    from model import GPT, GPTConfig

    device = pick_device(args.device, local_rank=0)
    device_type = device.split(":")[0]
    precision = setup_precision(args.dtype, device_type)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(args.model)).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 1e-8, device_type)  # fused on CUDA
    x = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device=device)  # (B, T)
    train_model = compile_model(model, args.compile, device_type, (x, x), precision, logging.getLogger("bench"))

    def sync():
        if device_type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        with precision.autocast():
            _, loss = train_model(x, x)
        precision.scaler.scale(loss).backward()
        precision.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        precision.scaler.step(optimizer)
        precision.scaler.update()
        optimizer.zero_grad(set_to_none=True)

    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        train_step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    sync()  # the GPU runs behind the Python loop: wait for it before reading the clock
    seconds_per_step = (time.perf_counter() - t0) / args.steps
    tokens_per_sec = args.batch_size * args.seq_len / seconds_per_step
    flops_per_token = model.flops_per_token(args.seq_len)
    peak = peak_flops(device, precision.dtype)
    return {
        "device": torch.cuda.get_device_name(device) if device_type == "cuda" else device,
        "model": args.model,
        "params_M": model.num_params() / 1e6,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "dtype": str(precision.dtype).removeprefix("torch."),
        "compiled": train_model is not model,
        "ms_per_step": seconds_per_step * 1000,
        "tokens_per_sec": tokens_per_sec,
        "mfu": flops_per_token * tokens_per_sec / peak if peak else "n/a",
        "peak_memory_MiB": peak_memory_bytes(device) / 2**20,
    }


# ---- hellaswag.py -----------------------------------------------------------------------------
def add_hellaswag_args(parser):
    parser.add_argument(
        "--model",
        default="gpt2",
        help="a model size, random weights (speed does not depend on them): gpt2, gpt2-medium, ..., tiny, mini",
    )
    parser.add_argument(
        "--pretrained",
        action="store_true",
        help="load OpenAI's weights for --model (a hub name or a local Hugging Face folder)",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="examples per forward pass")
    parser.add_argument("--limit", type=int, default=1000, help="examples to score")
    parser.add_argument("--device", help="default: cuda if available, else mps, else cpu")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="autocast dtype (CUDA only)"
    )
    parser.add_argument(
        "--data_dir", help="folder holding hellaswag_val.jsonl (default: $HELLASWAG_DIR, else download)"
    )


def bench_hellaswag(args):
    """Examples/s of hellaswag.evaluate_hellaswag, the function train_gpt2.py and the CLI both run."""
    import time

    import torch

    from hellaswag import DTYPES, default_device, evaluate_hellaswag, hellaswag_rows, load_hellaswag
    from model import GPT, MODEL_SIZES, GPTConfig

    if not args.pretrained and args.model not in MODEL_SIZES:
        raise SystemExit(f"--model {args.model}: choose a size from {', '.join(MODEL_SIZES)}, or pass --pretrained")
    device = args.device or default_device()
    torch.manual_seed(0)  # the same random weights on every run, so acc is comparable too
    model = GPT.from_pretrained(args.model) if args.pretrained else GPT(GPTConfig.from_name(args.model))
    model.to(device)
    examples = load_hellaswag(args.data_dir, args.limit)
    tokens = sum(len(c) + len(e) for example in examples for c, e in hellaswag_rows(example)[0])

    def run(subset):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = evaluate_hellaswag(model, subset, device, args.batch_size, autocast_dtype=DTYPES[args.dtype])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return results, time.perf_counter() - start

    run(examples[: args.batch_size])  # warm-up: CUDA context, kernel selection, tokenizer cache
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    results, seconds = run(examples)
    figures = {
        "model": args.model + (" (pretrained)" if args.pretrained else " (random weights)"),
        "device": device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "examples": len(examples),
        "seconds": seconds,
        "examples_per_s": len(examples) / seconds,
        "tokens_per_s": tokens / seconds,  # real tokens of context + ending, 4 rows per example
        "acc": results["acc"],
        "acc_norm": results["acc_norm"],
    }
    if device.startswith("cuda"):
        figures["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return figures


# ---- command line -----------------------------------------------------------------------------
BENCHMARKS = {
    "fineweb": (add_fineweb_args, bench_fineweb),
    "dataloader": (add_dataloader_args, bench_dataloader),
    "train": (add_train_args, bench_train),
    "hellaswag": (add_hellaswag_args, bench_hellaswag),
}


def print_results(results, as_json):
    """Each benchmark returns a flat dict of measured figures; print it as a table or as JSON."""
    if as_json:
        print(json.dumps(results, indent=2))
        return
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="benchmark", required=True)
    for name, (add_args, _) in BENCHMARKS.items():
        sub = subparsers.add_parser(name)
        sub.add_argument("--json", action="store_true", help="print the results as JSON")
        add_args(sub)
    args = parser.parse_args()
    print_results(BENCHMARKS[args.benchmark][1](args), args.json)


if __name__ == "__main__":
    main()
