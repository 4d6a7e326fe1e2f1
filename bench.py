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
# Each measurement runs in a fresh interpreter: its peak RSS is its own, and so is tiktoken's regex
# cache. (tiktoken gives each thread one of 128 regex copies; the first thread to use a copy owns it
# and later threads on it pay a lock, ~25% slower: repeated runs in one process would skew the figures.)
# The texts are read and the tokenizer loaded before the clock starts, except for "pipeline", whose
# time is fineweb.py's whole read, tokenize, write. Peak RSS is VmHWM: ru_maxrss would start at the
# RSS of the parent that forked the child (Linux keeps it across exec).
FINEWEB_CHILD = """
import json, resource, sys, time
from concurrent.futures import ThreadPoolExecutor
import fineweb, bench

def cpu_seconds():  # this process and its finished children (the process pool's workers)
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)

mode, num_proc, data_dir, out_dir, shard_size = sys.argv[1:]
num_proc = int(num_proc)
enc = fineweb.gpt2_tokenizer()
if mode != "pipeline":
    texts = [text for text in fineweb.local_rows(fineweb.resolve_data_files([data_dir]), "text", 0) if text]
    batches = list(fineweb.document_batches(iter(texts), fineweb.Position(), fineweb.no_state))
rss_before = bench.rss_mb("VmHWM")
t0, cpu0 = time.perf_counter(), cpu_seconds()
if mode == "raw":  # tiktoken's own batch API: threads, each returning lists of Python ints
    enc.encode_ordinary_batch(texts, num_threads=num_proc)
elif mode == "pool":  # processes instead of threads: texts and tokens pickled between them (start-up timed)
    bench.encode_in_process_pool(batches, num_proc)
elif mode == "encode":  # fineweb.py's encoding of the same batches, without reading or writing
    with ThreadPoolExecutor(num_proc) as pool:
        list(pool.map(lambda batch: fineweb.encode_batch(enc, batch.texts), batches))
else:
    flags = {"--data_files": data_dir, "--out_dir": out_dir, "--shard_size": shard_size, "--num_proc": str(num_proc)}
    fineweb.main([word for flag in flags.items() for word in flag] + ["--overwrite"])
seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
peak_rss = bench.rss_mb("VmHWM")
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rss_mb": peak_rss, "rss_before_mb": rss_before}))
"""


def add_fineweb_args(parser):
    parser.add_argument("--data_files", nargs="+", required=True, help="local files as for fineweb.py")
    parser.add_argument("--num_proc", type=int, default=None, help="cores to use (default: all)")
    parser.add_argument("--copies", type=int, default=4, help="the timed input is the data this many times over")
    parser.add_argument("--shard_size", default="1e6", help="tokens per shard in the pipeline runs")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs of each measurement")


def encode_pool_chunk(texts):
    import numpy as np
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")  # loaded once per process, then cached by tiktoken
    return [np.array(tokens, dtype=np.uint16) for tokens in enc.encode_ordinary_batch(texts, num_threads=1)]


def encode_in_process_pool(batches, num_proc):
    import multiprocessing

    with multiprocessing.Pool(num_proc) as pool:
        list(pool.imap(encode_pool_chunk, (batch.texts for batch in batches)))


def linked_copies(files, copies, folder):
    """A folder in which `files` appear `copies` times over (symlinks, in order): a bigger dataset for free."""
    import os

    os.makedirs(folder)
    for copy in range(copies):
        for i, path in enumerate(files):
            os.symlink(os.path.abspath(path), os.path.join(folder, f"{copy:03d}_{i:05d}_{os.path.basename(path)}"))
    return folder


def fineweb_child(mode, data_dir, out_dir, args):
    """One measurement (FINEWEB_CHILD) in a fresh interpreter: its seconds, CPU seconds and peak RSS."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    argv = [mode, str(args.num_proc), data_dir, out_dir, args.shard_size]
    child = subprocess.run([sys.executable, "-c", FINEWEB_CHILD, *argv], cwd=here, capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"bench.py fineweb {mode} failed:\n{child.stderr[-2000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def bench_fineweb(args):
    """Raw tiktoken throughput and the fineweb.py pipeline's, on the same texts with the same cores."""
    import tempfile

    import fineweb

    args.num_proc = args.num_proc or fineweb.available_cores()
    files = fineweb.resolve_data_files(args.data_files)
    modes = ("raw", "pool", "encode", "pipeline")
    best = {mode: {"seconds": float("inf")} for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        many = linked_copies(files, args.copies, f"{tmp}/many")
        for _ in range(args.rounds):  # interleaved, so that a noisy neighbour hurts every figure alike
            for mode in modes:
                best[mode] = min(best[mode], fineweb_child(mode, many, f"{tmp}/out", args), key=lambda r: r["seconds"])
        with open(f"{tmp}/out/meta.json") as f:
            tokens = sum(shard["tokens"] for shard in json.load(f)["shards"])
        one = fineweb_child("pipeline", linked_copies(files, 1, f"{tmp}/one"), f"{tmp}/out", args)
    seconds = {mode: best[mode]["seconds"] for mode in modes}
    return {
        "num_proc": args.num_proc,
        "tokens": tokens,  # [EOT] + text tokens of every document; the raw figures encode the same texts
        "raw_tiktoken_tok_per_s": tokens / seconds["raw"],
        "raw_process_pool_tok_per_s": tokens / seconds["pool"],
        "encode_only_tok_per_s": tokens / seconds["encode"],
        "pipeline_tok_per_s": tokens / seconds["pipeline"],
        "pipeline_vs_raw_tiktoken": seconds["raw"] / seconds["pipeline"],
        "pipeline_vs_encode_only": seconds["encode"] / seconds["pipeline"],
        "raw_tiktoken_cpu_ns_per_tok": best["raw"]["cpu_seconds"] / tokens * 1e9,
        "pipeline_cpu_ns_per_tok": best["pipeline"]["cpu_seconds"] / tokens * 1e9,
        "pipeline_rss_mb_at_start": best["pipeline"]["rss_before_mb"],
        "pipeline_peak_rss_mb_1x_data": one["rss_mb"],
        f"pipeline_peak_rss_mb_{args.copies}x_data": best["pipeline"]["rss_mb"],
    }


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
    """VmHWM (peak so far) or VmRSS (now) of this process in MB, from /proc. (Not getrusage's
    ru_maxrss on Linux: a forked child's starts at its parent's peak.) Without /proc (macOS) the peak
    comes from ru_maxrss, in bytes there; the current RSS is then unknown (None)."""
    import re
    import resource

    try:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 if field == "VmHWM" else None


def synchronize(device):
    """The GPU runs behind the Python loop: wait for it before reading the clock."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


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
    parser.add_argument(
        "--cpu_malloc", choices=["reuse", "default"], default="reuse",
        help="on CPU: keep freed memory for reuse as train_gpt2.py does (device.keep_freed_memory), or glibc's default",
    )  # fmt: skip


def bench_train(args):
    """Speed of train_gpt2.py's step (forward, backward, clip, AdamW) on random tokens, one process."""
    import logging
    import time

    import torch

    from device import compile_model, keep_freed_memory, peak_flops, pick_device, setup_precision
    from model import GPT, GPTConfig

    device = pick_device(args.device, local_rank=0)
    device_type = device.split(":")[0]
    reused = device == "cpu" and args.cpu_malloc == "reuse" and keep_freed_memory()
    precision = setup_precision(args.dtype, device_type)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(args.model)).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 1e-8, device_type)  # fused on CUDA
    x = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device=device)  # (B, T)
    train_model = compile_model(model, args.compile, device_type, (x, x), precision, logging.getLogger("bench"))

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
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    synchronize(device)
    seconds_per_step = (time.perf_counter() - t0) / args.steps
    peak_rss = rss_mb("VmHWM")
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
        "cpu_malloc": "reuse" if reused else "default",
        "ms_per_step": seconds_per_step * 1000,
        "tokens_per_sec": tokens_per_sec,
        "mfu": flops_per_token * tokens_per_sec / peak if peak else "n/a",
        # what PyTorch allocated on a GPU; elsewhere the whole process's peak RSS
        "peak_memory_MiB": torch.cuda.max_memory_allocated(device) / 2**20 if device_type == "cuda" else peak_rss,
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
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:1 or mps")
    parser.add_argument("--dtype", default="float32", help="auto, bfloat16, float16 or float32, as in train_gpt2.py")
    parser.add_argument(
        "--data_dir", help="folder holding hellaswag_val.jsonl (default: $HELLASWAG_DIR, else download)"
    )


def bench_hellaswag(args):
    """Examples/s of hellaswag.evaluate_hellaswag, the function train_gpt2.py and the CLI both run."""
    import time

    import torch

    from device import setup_distributed, setup_precision
    from hellaswag import evaluate_hellaswag, hellaswag_rows, load_hellaswag
    from model import GPT, MODEL_SIZES, GPTConfig

    if not args.pretrained and args.model not in MODEL_SIZES:
        raise SystemExit(f"--model {args.model}: choose a size from {', '.join(MODEL_SIZES)}, or pass --pretrained")
    device = setup_distributed(args.device).device  # one process, set up as hellaswag.py's CLI does
    precision = setup_precision(args.dtype, device.split(":")[0])
    torch.manual_seed(0)  # the same random weights on every run, so acc is comparable too
    model = GPT.from_pretrained(args.model) if args.pretrained else GPT(GPTConfig.from_name(args.model))
    model.to(device)
    examples = load_hellaswag(args.data_dir, args.limit)
    tokens = sum(len(c) + len(e) for example in examples for c, e in hellaswag_rows(example)[0])

    def run(subset):
        synchronize(device)
        start = time.perf_counter()
        results = evaluate_hellaswag(model, subset, device, args.batch_size, autocast=precision.autocast)
        synchronize(device)
        return results, time.perf_counter() - start

    run(examples[: args.batch_size])  # warm-up: CUDA context, kernel selection, tokenizer cache
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    results, seconds = run(examples)
    figures = {
        "model": args.model + (" (pretrained)" if args.pretrained else " (random weights)"),
        "device": device,
        "dtype": str(precision.dtype).removeprefix("torch."),  # what "auto" resolved to
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


# ---- generation (model.py's KV cache) ---------------------------------------------------------
def add_generate_args(parser):
    parser.add_argument("--model", default="gpt2", help="a size in model.MODEL_SIZES, random weights: gpt2, mini, ...")
    parser.add_argument("--batch_size", type=int, default=1, help="prompts generated together")
    parser.add_argument("--prompt_len", type=int, default=64, help="tokens in each (random) prompt")
    parser.add_argument("--new_tokens", type=int, default=512, help="tokens generated after it (0: no full run)")
    parser.add_argument("--positions", default="64,512", help="positions at which to time single steps")
    parser.add_argument("--steps", type=int, default=8, help="steps timed at each position (their median)")
    parser.add_argument("--cache", choices=["both", "on", "off"], default="both",
                        help="with the KV cache, recomputing the context at every step, or both")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", default="float32", help="auto, bfloat16, float16, float32 (as in sample.py)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads; default: one per core). On a machine shared with "
                             "other jobs, 1 avoids waiting at every op for a thread that is not running")


def bench_generate(args):
    """Tokens/s of GPT.generate_stream (what sample.py and the training samples run) with the KV cache
    and recomputing the context at every step, and the time of one step at a few positions: with the
    cache it should barely grow with the position, without it grows with the context."""
    import statistics
    import time

    import torch

    from device import pick_device, setup_precision
    from model import GPT, GPTConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device, local_rank=0)
    precision = setup_precision(args.dtype, device.split(":")[0])
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(args.model)).to(device).eval()

    def step_seconds(prompt_len, steps, use_cache):
        """Seconds from one yielded token to the next; the first includes the prompt's prefill."""
        prompts = torch.randint(0, model.config.vocab_size, (args.batch_size, prompt_len), device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        seconds = []
        with precision.autocast():
            synchronize(device)
            last = time.perf_counter()
            for _ in model.generate_stream(prompts, steps, top_k=50, generator=generator, use_cache=use_cache):
                synchronize(device)
                seconds.append(time.perf_counter() - last)
                last = time.perf_counter()
        return seconds

    step_seconds(args.prompt_len, 4, use_cache=True)  # warm-up: allocator, kernel selection
    results = {"model": args.model, "params_M": model.num_params() / 1e6, "device": device,
               "dtype": str(precision.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
               "batch_size": args.batch_size, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}  # fmt: skip
    modes = {"on": [("cache", True)], "off": [("recompute", False)]}
    modes["both"] = modes["on"] + modes["off"]
    for name, use_cache in modes[args.cache]:
        if args.new_tokens > 0:
            seconds = sum(step_seconds(args.prompt_len, args.new_tokens, use_cache))
            results[f"{name}_seconds"] = seconds
            results[f"{name}_tokens_per_s"] = args.batch_size * args.new_tokens / seconds
        for position in map(int, args.positions.split(",")):
            # a prompt of `position` tokens: after its prefill, each step feeds the token at the next position
            later_steps = step_seconds(position, args.steps + 1, use_cache)[1:]
            results[f"{name}_ms_per_step_at_{position}"] = statistics.median(later_steps) * 1000
    if args.cache == "both" and args.new_tokens > 0:
        results["cache_speedup"] = results["recompute_seconds"] / results["cache_seconds"]
    return results


# ---- command line -----------------------------------------------------------------------------
BENCHMARKS = {
    "fineweb": (add_fineweb_args, bench_fineweb),
    "dataloader": (add_dataloader_args, bench_dataloader),
    "train": (add_train_args, bench_train),
    "hellaswag": (add_hellaswag_args, bench_hellaswag),
    "generate": (add_generate_args, bench_generate),
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
