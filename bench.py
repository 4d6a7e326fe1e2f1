"""
Benchmarks: measured speed, MFU and memory of every stage of the pipeline.

    python bench.py fineweb --data_files path/to/parquet_folder          # tokenizer pipeline vs raw tiktoken
    python bench.py dataloader                                            # DataLoaderLite on a 100M-token shard
    python bench.py train --model gpt2 --batch_size 64 --seq_len 1024     # training step tokens/s and MFU
    python bench.py train --model gpt2 --lora_rank 8 --base_quant nf4     # ... of QLoRA (weight_MiB: the base's bytes)
    python bench.py hellaswag --model gpt2                                # evaluation examples/s
    python bench.py generate --model gpt2 --batch_size 1                  # generation tokens/s, KV cache vs recompute
    python bench.py memory --model gpt2-medium --batch_size 8 --seq_len 512   # activation checkpointing's saving
    python bench.py fsdp --model gpt2-medium --nproc 2                    # memory per process: DDP, FSDP, offload
    add --json to any of them for machine-readable output

Every figure in docs/benchmarks.md comes from one of these commands, from the GPU check (gpu_check.py,
which times its training steps with this file's time_train_step) or from the recipe ablation (ablation.py).
"""

import argparse
import json
import logging
import multiprocessing
import os
import re
import resource
import shutil
import socket
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

from errors import UserError, exit_on_error


# ---- fineweb.py -------------------------------------------------------------------------------
# Each measurement runs in a fresh process (spawned, not forked): its peak RSS is its own, and so is
# tiktoken's regex cache. (tiktoken gives each thread one of 128 regex copies; the first thread to
# use a copy owns it and later threads on it pay a lock, ~25% slower: repeated runs in one process
# would skew the figures.) The texts are read and the tokenizer loaded before the clock starts,
# except for "pipeline", whose time is fineweb.py's whole read, tokenize, write.
def in_fresh_process(function, *args):
    """function(*args) in a newly spawned Python process; its return value."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def cpu_seconds():
    """CPU time of this process and of its finished children (a process pool's workers)."""
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def fineweb_measurement(mode, num_proc, data_dir, out_dir, shard_size):
    """One timed run of `mode` (in a fresh process): seconds, CPU seconds and peak RSS."""
    import documents
    import fineweb
    from tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    if mode != "pipeline":
        texts = [text for text in documents.local_rows(documents.resolve_data_files([data_dir]), "text", 0) if text]
        batches = list(fineweb.document_batches(iter(texts), fineweb.Position(), documents.no_state))
    rss_before = rss_mb("VmHWM")
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    if mode == "raw":  # tiktoken's own batch API: threads, each returning lists of Python ints
        tokenizer.encoding.encode_ordinary_batch(texts, num_threads=num_proc)
    elif mode == "pool":  # processes instead of threads: texts and tokens pickled between them (start-up timed)
        encode_in_process_pool(batches, num_proc)
    elif mode == "encode":  # fineweb.py's encoding of the same batches, without reading or writing
        with ThreadPoolExecutor(num_proc) as pool:
            list(pool.map(lambda batch: fineweb.encode_batch(tokenizer, batch.texts), batches))
    else:
        flags = {"--data_files": data_dir, "--data_dir": out_dir, "--shard_size": shard_size, "--num_proc": num_proc}
        fineweb.main([str(word) for flag in flags.items() for word in flag] + ["--overwrite"])
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return {"seconds": seconds, "cpu_seconds": cpu, "rss_mb": rss_mb("VmHWM"), "rss_before_mb": rss_before}


def add_fineweb_args(parser):
    parser.add_argument("--data_files", nargs="+", required=True, help="local files as for fineweb.py")
    parser.add_argument("--num_proc", type=int, default=None, help="cores to use (default: all)")
    parser.add_argument("--copies", type=int, default=4, help="the timed input is the data this many times over")
    parser.add_argument("--shard_size", default="1e6", help="tokens per shard in the pipeline runs")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs of each measurement")


def encode_pool_chunk(texts):
    import numpy as np

    from tokenizer import get_tokenizer

    encoding = get_tokenizer().encoding  # loaded once per process, then cached by tiktoken
    return [np.array(tokens, dtype=np.uint16) for tokens in encoding.encode_ordinary_batch(texts, num_threads=1)]


def encode_in_process_pool(batches, num_proc):

    with multiprocessing.Pool(num_proc) as pool:
        list(pool.imap(encode_pool_chunk, (batch.texts for batch in batches)))


def linked_copies(files, copies, folder):
    """A folder in which `files` appear `copies` times over (symlinks, in order): a bigger dataset for free."""
    os.makedirs(folder)
    for copy in range(copies):
        for i, path in enumerate(files):
            os.symlink(os.path.abspath(path), os.path.join(folder, f"{copy:03d}_{i:05d}_{os.path.basename(path)}"))
    return folder


def bench_fineweb(args):
    """Raw tiktoken throughput and the fineweb.py pipeline's, on the same texts with the same cores."""
    import documents
    import fineweb

    args.num_proc = args.num_proc or fineweb.available_cores()
    files = documents.resolve_data_files(args.data_files)
    modes = ("raw", "pool", "encode", "pipeline")
    best = {mode: {"seconds": float("inf")} for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        many = linked_copies(files, args.copies, f"{tmp}/many")
        for _ in range(args.rounds):  # interleaved, so that a noisy neighbour hurts every figure alike
            for mode in modes:
                run = in_fresh_process(fineweb_measurement, mode, args.num_proc, many, f"{tmp}/out", args.shard_size)
                best[mode] = min(best[mode], run, key=lambda r: r["seconds"])
        with open(f"{tmp}/out/meta.json") as f:
            tokens = sum(shard["tokens"] for shard in json.load(f)["shards"])
        one = in_fresh_process(
            fineweb_measurement,
            "pipeline",
            args.num_proc,
            linked_copies(files, 1, f"{tmp}/one"),
            f"{tmp}/out",
            args.shard_size,
        )
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
    parser.add_argument("--data_dir", help="folder of shards to read its first train shard (default: a temporary one)")
    parser.add_argument(
        "--shard_tokens", type=int, default=100_000_000, help="tokens in the temporary shard (fineweb.py's shard size)"
    )
    parser.add_argument("--batch_size", type=int, default=64, help="B, sequences per batch")
    parser.add_argument("--seq_len", type=int, default=1024, help="T, tokens per sequence")
    parser.add_argument("--batches", type=int, default=None, help="batches to read (default: the whole shard once)")


def bench_dataloader(args):
    """Open time, batches/s and peak RSS of DataLoaderLite and of the reference recipe's loader (the
    whole shard as an int64 tensor) reading the same shard."""
    if args.data_dir is not None:
        return dataloader_results(args, args.data_dir)
    from shards import shard_name

    with tempfile.TemporaryDirectory() as data_dir:  # deleted afterwards, even on Ctrl-C
        write_random_shard(os.path.join(data_dir, shard_name("bench", 1)), args.shard_tokens)
        return dataloader_results(args, data_dir)


def write_random_shard(path, n_tokens, chunk=2**24):
    """A shard as fineweb.py writes it, filled piece by piece so this process never holds it whole."""
    import numpy as np

    from shards import TOKEN_DTYPE

    rng = np.random.default_rng(0)
    tokens = np.lib.format.open_memmap(path, mode="w+", dtype=TOKEN_DTYPE, shape=(n_tokens,))
    for start in range(0, n_tokens, chunk):
        tokens[start : start + chunk] = rng.integers(0, 50257, size=min(chunk, n_tokens - start), dtype=np.uint16)
    tokens.flush()


def dataloader_results(args, data_dir):
    from shards import find_shards, shard_layout

    shard = find_shards(data_dir, "train")[0]
    offset, shard_tokens = shard_layout(shard)
    batches = args.batches or (shard_tokens - 1) // (args.batch_size * args.seq_len)  # the shard once
    with open(shard, "rb") as f:  # into the page cache first, so neither approach pays for the disk
        while f.read(2**24):
            pass
    results = {
        "shard": shard,
        "shard_tokens": shard_tokens,
        "batch_tokens": args.batch_size * args.seq_len,
        "batches": batches,
    }
    for approach in ("reference", "ours"):
        # A fresh process for each approach, so that each peak RSS is its own.
        figures = in_fresh_process(
            dataloader_figures, approach, data_dir, shard, offset, args.batch_size, args.seq_len, batches
        )
        results.update({f"{approach}_{name}": value for name, value in figures.items()})
    return results


def dataloader_figures(approach, data_dir, shard, offset, B, T, batches):
    """Run in a fresh process: seconds to open the shard, batches/s, and RSS in MB before and at peak."""
    from dataloader import DataLoaderLite

    baseline = rss_mb("VmHWM")  # Python, numpy and torch
    start = time.perf_counter()
    if approach == "ours":
        next_batch = DataLoaderLite(B, T, data_dir=data_dir).next_batch
    else:
        next_batch = reference_loader(shard, offset, B, T)
    opened = time.perf_counter()
    for _ in range(batches):
        x, y = next_batch()
    seconds = time.perf_counter() - opened
    peak = rss_mb("VmHWM")
    return {
        "open_s": opened - start,
        "batches_per_s": batches / seconds,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
        "peak_over_baseline_mb": peak - baseline,
        "final_rss_mb": rss_mb("VmRSS"),
    }


def reference_loader(shard, offset, B, T):
    """next_batch of the reference recipe: the shard loaded whole, widened to int64, sliced into views."""
    import numpy as np
    import torch

    tokens = np.load(shard) if shard.endswith(".npy") else np.fromfile(shard, dtype="<u2", offset=offset)
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
    try:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 if field == "VmHWM" else None


class FixedBatchJob:
    """What train_gpt2.train_step reads of a Job, for timing it: a train_loader that gives the same
    (x, y) at every next_batch() (this object itself), and the loss (next-token prediction)."""

    pads_rows, rows_per_example = False, 1

    def __init__(self, x, y):
        from train_gpt2 import lm_loss

        self.x, self.y, self.last_batch_tokens = x, y, x.numel()
        self.train_loader, self.loss = self, lm_loss

    def next_batch(self):
        return self.x, self.y


def synchronize(device):
    """The GPU runs behind the Python loop: wait for it before reading the clock."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def median(values):
    """The median, or None if there are none or one is None (an MFU without a known peak FLOPS)."""
    return statistics.median(values) if values and None not in values else None


# ---- training step ----------------------------------------------------------------------------
def add_train_args(parser):
    from device import add_device_args

    parser.add_argument("--model", default="gpt2", help="a size in model.MODEL_SIZES: gpt2, gpt2-medium, mini, tiny...")
    parser.add_argument("--batch_size", type=int, default=64, help="sequences per step (B)")
    parser.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence (T)")
    add_device_args(parser)
    parser.add_argument("--compile", default="auto", help="auto, 1, 0 (as in train_gpt2.py)")
    parser.add_argument("--lora_rank", type=int, default=0, help="LoRA on attn and mlp, as finetune.py's (0: full)")
    parser.add_argument("--base_quant", default="none", choices=("none", "int8", "nf4"), help="as finetune.py's")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator, caches)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument(
        "--cpu_malloc",
        choices=["reuse", "default"],
        default="reuse",
        help="on CPU: keep freed memory for reuse as train_gpt2.py does (device.keep_freed_memory), or glibc's default",
    )


@dataclass
class TrainStepTiming:
    """What time_train_step measured; bench.py train and gpu_check.py each report it in their own terms."""

    model: object  # the GPT, uncompiled
    optimizer: object
    precision: object  # device.setup_precision's
    compiled: bool  # whether torch.compile's model trained
    compile_s: float  # seconds in compile_model, whose forward/backward on an example batch compiles
    graphs: int  # torch.compile graphs made from compile_model to the last step
    seconds_per_step: float  # per optimizer step, the timed ones
    tokens_per_s: float
    mfu: float  # or None where the peak FLOPS is unknown (CPU, MPS, float32)
    peak_memory_MiB: float  # what PyTorch allocated on a GPU; elsewhere the whole process's peak RSS
    warmup_steps: list  # train_gpt2.StepResult of each untimed step
    timed_steps: list  # ... and of each timed one


def time_train_step(
    device, model_name, batch_size, seq_len, dtype, compile_flag, micro_steps, warmup, steps, lora_rank=0, quant="none"
):
    """train_gpt2.py's train_step (forward, backward, clip, AdamW at the GPT-2 recipe's settings) of a
    model_name GPT with random weights on random tokens, in this process: `warmup` untimed optimizer
    steps (compilation, the allocator, AdamW's state), then `steps` timed ones of `micro_steps`
    micro-steps (gradient accumulation) each."""
    import torch

    from device import DistInfo, compile_model, graphs_compiled, peak_flops, setup_precision
    from lora import apply_lora
    from model import GPT, GPTConfig
    from optim import make_optimizer
    from quant import quantize_linears
    from train_gpt2 import Run, TrainConfig, train_step

    device_type = device.split(":")[0]
    precision = setup_precision(dtype, device_type)
    recipe = TrainConfig()  # the optimizer settings of the GPT-2 recipe
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(model_name)).to(device)
    if quant != "none":  # finetune.py --base_quant: the blocks' frozen matrices in 8 or 4 bits
        quantize_linears(model.requires_grad_(False), quant)
    if lora_rank:
        apply_lora(model, lora_rank, 2 * lora_rank, ["attn", "mlp"])
    optimizer = make_optimizer(model, recipe, device_type)  # over the parameters that train: with LoRA, the adapters
    # two tensors, as train_gpt2.py's batches are: a graph compiled for `idx is targets` would not serve them
    x, y = torch.randint(0, model.config.vocab_size, (2, batch_size, seq_len), device=device)  # (B, T) each
    graphs, t0 = graphs_compiled(), time.perf_counter()
    train_model = compile_model(model, compile_flag, device_type, (x, y), precision, logging.getLogger("bench"))
    compile_s = time.perf_counter() - t0
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    run = Run(recipe, DistInfo.single(device), precision, log=None, tokenizer=None)
    job = FixedBatchJob(x, y)

    def step():
        return train_step(run, job, train_model, model, optimizer, micro_steps)

    warmup_steps = [step() for _ in range(warmup)]
    synchronize(device)
    t0 = time.perf_counter()
    timed_steps = [step() for _ in range(steps)]
    synchronize(device)
    seconds_per_step = (time.perf_counter() - t0) / steps
    tokens_per_s = micro_steps * batch_size * seq_len / seconds_per_step
    peak = peak_flops(device, precision.dtype)
    return TrainStepTiming(
        model=model,
        optimizer=optimizer,
        precision=precision,
        compiled=train_model is not model,
        compile_s=compile_s,
        graphs=graphs_compiled() - graphs,
        seconds_per_step=seconds_per_step,
        tokens_per_s=tokens_per_s,
        mfu=model.flops_per_token(seq_len) * tokens_per_s / peak if peak else None,
        peak_memory_MiB=torch.cuda.max_memory_allocated(device) / 2**20 if device_type == "cuda" else rss_mb("VmHWM"),
        warmup_steps=warmup_steps,
        timed_steps=timed_steps,
    )


def bench_train(args):
    """Speed of train_gpt2.py's train_step (time_train_step) on random tokens, one process, without
    gradient accumulation."""
    import torch

    from device import keep_freed_memory, pick_device
    from quant import weight_bytes

    device = pick_device(args.device, local_rank=0)
    reused = device == "cpu" and args.cpu_malloc == "reuse" and keep_freed_memory()
    run = time_train_step(
        device,
        args.model,
        args.batch_size,
        args.seq_len,
        args.dtype,
        args.compile,
        micro_steps=1,
        warmup=args.warmup,
        steps=args.steps,
        lora_rank=args.lora_rank,
        quant=args.base_quant,
    )
    return {
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
        "model": args.model,
        "params_M": run.model.num_params() / 1e6,
        "trainable_params_M": sum(p.numel() for p in run.model.parameters() if p.requires_grad) / 1e6,
        "weight_MiB": weight_bytes(run.model) / 2**20,  # the base (quantized or not) and the adapters
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "dtype": str(run.precision.dtype).removeprefix("torch."),
        "compiled": run.compiled,
        "cpu_malloc": "reuse" if reused else "default",
        "ms_per_step": run.seconds_per_step * 1000,
        "tokens_per_sec": run.tokens_per_s,
        "mfu": run.mfu if run.mfu is not None else "n/a",
        "peak_memory_MiB": run.peak_memory_MiB,
    }


# ---- hellaswag.py -----------------------------------------------------------------------------
def add_hellaswag_args(parser):
    from device import add_device_args

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
    add_device_args(parser, dtype="float32")
    parser.add_argument(
        "--data_file", help="hellaswag_val.jsonl or the folder holding it (default: $HELLASWAG_DIR, else download)"
    )


def bench_hellaswag(args):
    """Examples/s of scoring.evaluate on HellaSwag, what train_gpt2.py and the CLI both run."""
    import torch

    from device import setup_distributed, setup_precision
    from hellaswag import HELLASWAG, hellaswag_rows
    from hf import from_pretrained
    from model import GPT, MODEL_SIZES, GPTConfig
    from scoring import evaluate
    from tokenizer import get_tokenizer

    if not args.pretrained and args.model not in MODEL_SIZES:
        raise UserError(f"--model {args.model}: choose a size from {', '.join(MODEL_SIZES)}, or pass --pretrained")
    dist = setup_distributed(args.device)  # one process, set up as hellaswag.py's CLI does
    device = dist.device
    precision = setup_precision(args.dtype, device.split(":")[0])
    torch.manual_seed(0)  # the same random weights on every run, so acc is comparable too
    model = from_pretrained(args.model) if args.pretrained else GPT(GPTConfig.from_name(args.model))
    model.to(device)
    examples = HELLASWAG.load(args.data_file, args.limit)
    tokenizer = get_tokenizer()
    tokens = sum(len(c) + len(e) for example in examples for c, e in hellaswag_rows(example, tokenizer)[0])

    def run(subset):
        synchronize(device)
        start = time.perf_counter()
        results = evaluate(HELLASWAG, model, subset, tokenizer, dist, precision, args.batch_size)
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


# ---- memory: activation checkpointing and FSDP (train_gpt2.py --plan's figures, measured) ------
def add_memory_args(parser):
    parser.add_argument("--model", default="gpt2-medium", help="a size in model.MODEL_SIZES, random weights")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass (B)")
    parser.add_argument("--seq_len", type=int, default=512, help="tokens per sequence (T)")


def saved_tensor_bytes(model, x, y):
    """(bytes, loss): the bytes of the distinct tensors autograd saves for backward in the forward
    model(x, y), weights left out. Exact and device-free: torch.autograd.graph.saved_tensors_hooks
    sees every tensor saved; views of one storage (q, k, v of c_attn's output) count once."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, loss = model(x, y)
    return sum(storages.values()), loss


def reset_peak_rss():
    """Start VmHWM (peak RSS) again from the current RSS (Linux: /proc/self/clear_refs). Whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def checkpointing_measurement(model_name, batch_size, seq_len, checkpointing):
    """In a fresh process: the saved bytes of one forward, then the peak RSS of a forward + backward
    above the RSS before it (the weights), and its seconds."""
    import torch

    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(model_name))
    model.activation_checkpointing = checkpointing
    x, y = (torch.randint(0, 50257, (batch_size, seq_len)) for _ in range(2))  # (B, T)
    saved, loss = saved_tensor_bytes(model, x, y)
    del loss  # and with it the graph
    before = rss_mb("VmRSS")
    reset_peak_rss()
    t0 = time.perf_counter()
    _, loss = model(x, y)
    loss.backward()
    return {"saved_MB": saved / 2**20, "peak_MB": rss_mb("VmHWM") - before, "seconds": time.perf_counter() - t0}


def bench_memory(args):
    """Activation checkpointing at B x T on the CPU, float32: what a forward saves for backward (exact,
    saved_tensor_bytes) against memory_plan.activation_bytes' formula, and the peak RSS of a forward +
    backward above the weights (activations, logits, gradients), each in a fresh process."""
    from memory_plan import activation_bytes
    from model import GPTConfig

    config = GPTConfig.from_name(args.model)
    results = {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": "float32"}
    for checkpointing in (False, True):
        name = "ckpt" if checkpointing else "no_ckpt"
        figures = in_fresh_process(checkpointing_measurement, args.model, args.batch_size, args.seq_len, checkpointing)
        saved, recomputed = activation_bytes(config, args.batch_size, args.seq_len, checkpointing=checkpointing)
        results.update({f"{name}_{key}": value for key, value in figures.items()})
        results[f"{name}_planner_saved_MB"] = saved / 2**20
        results[f"{name}_planner_recomputed_MB"] = recomputed / 2**20
    results["saved_ratio"] = results["no_ckpt_saved_MB"] / results["ckpt_saved_MB"]
    results["peak_saving_MB"] = results["no_ckpt_peak_MB"] - results["ckpt_peak_MB"]
    results["time_ratio"] = results["ckpt_seconds"] / results["no_ckpt_seconds"]
    return results


def add_fsdp_args(parser):
    parser.add_argument("--model", default="gpt2-medium", help="a size in model.MODEL_SIZES, random weights")
    parser.add_argument("--nproc", type=int, default=2, help="processes (gloo, on the CPU)")
    parser.add_argument("--batch_size", type=int, default=1, help="sequences per forward pass (B)")
    parser.add_argument("--seq_len", type=int, default=64, help="tokens per sequence (T)")
    parser.add_argument("--steps", type=int, default=2, help="training steps before the memory is read")
    parser.add_argument("--out_dir", default=None, help="where the checkpoints are written (default: a temp folder)")


def parallel_rank(rank, world_size, port, parallel, args, out_dir, results):
    """One process of bench_fsdp: train_step under DDP or FSDP (built on the meta device, but whole for
    fsdp_whole; offloaded for fsdp_offload), then its memory; for FSDP also a checkpoint both ways."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    from device import DistInfo, setup_precision
    from fsdp import gather_full, initialise_shards, shard_model
    from model import GPT, GPTConfig
    from optim import make_optimizer
    from train_gpt2 import Run, TrainConfig, train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    dist_info = DistInfo(rank=rank, local_rank=rank, world_size=world_size, device="cpu")
    fsdp, offload = parallel.startswith("fsdp"), parallel == "fsdp_offload"
    precision = setup_precision("float32", "cpu", sharded=fsdp)
    recipe = TrainConfig(cpu_offload=offload)
    torch.manual_seed(0)
    reset_peak_rss()
    rss_before_model = rss_mb("VmRSS")
    meta = fsdp and parallel != "fsdp_whole"  # as train_gpt2.train builds it; whole, as it did before
    with torch.device("meta" if meta else "cpu"):
        model = GPT(GPTConfig.from_name(args.model))
    train_model = shard_model(model, True, precision, dist_info, offload) if fsdp else DDP(model)
    if meta:
        initialise_shards(model, "cpu")
    init_peak_rss = rss_mb("VmHWM") - rss_before_model
    optimizer = make_optimizer(model, recipe, "cpu")
    x = torch.randint(0, 50257, (args.batch_size, args.seq_len))
    run = Run(recipe, dist_info, precision, log=None, tokenizer=None)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(run, FixedBatchJob(x, x), train_model, model, optimizer, 1)

    def mine(t):  # this rank's bytes of t
        return (t.to_local() if isinstance(t, DTensor) else t).nbytes

    figures = {
        "ms_per_step": (time.perf_counter() - t0) / args.steps * 1000,
        "init_peak_rss_above_start_MB": init_peak_rss,
        "weights_MB": sum(mine(p) for p in model.parameters()) / 2**20,
        "gradients_MB": sum(mine(p.grad) for p in model.parameters()) / 2**20,
        "optimizer_MB": sum(mine(t) for s in optimizer.state.values() for t in s.values() if t.dim()) / 2**20,
        "rss_MB": rss_mb("VmRSS"),
        "peak_rss_MB": rss_mb("VmHWM"),
    }
    if parallel == "fsdp":
        path = os.path.join(out_dir, f"full_{rank}.pt")
        reset_peak_rss()
        before, t0 = rss_mb("VmRSS"), time.perf_counter()
        full = [
            gather_full(model.state_dict(keep_vars=True), rank == 0),
            gather_full(optimizer.state_dict(), rank == 0),
        ]
        if rank == 0:
            torch.save(full, path)
        dist.barrier()
        figures.update(full_save_s=time.perf_counter() - t0, full_save_peak_MB=rss_mb("VmHWM") - before)
        # exact: the bytes rank 0 holds (the RSS above can reuse memory freed earlier, and read less)
        gathered = {id(t): t.nbytes for t in tensors_in(full)} if rank == 0 else {}
        figures["full_state_MB"] = sum(gathered.values()) / 2**20
        del full
        reset_peak_rss()
        before, t0 = rss_mb("VmRSS"), time.perf_counter()
        model_state, optimizer_state = get_state_dict(model, optimizer)  # this rank's shards, by parameter name
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.path.join(out_dir, "dcp"))
        figures.update(dcp_save_s=time.perf_counter() - t0, dcp_save_peak_MB=rss_mb("VmHWM") - before)
    results.put((rank, figures))
    dist.barrier()
    dist.destroy_process_group()


def tensors_in(state):
    """Every tensor in nested lists and dicts."""
    import torch

    if isinstance(state, torch.Tensor):
        return [state]
    values = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else []
    return [tensor for value in values for tensor in tensors_in(value)]


def bench_fsdp(args):
    """Per-process memory of training --model under DDP, FSDP (reshard_after_forward=True; the model
    built whole then sharded, or built on the meta device) and FSDP with CPU offload on --nproc CPU
    processes: the exact bytes of this rank's weights, gradients and AdamW state, the RSS, and its peak
    as the model is built. Then an FSDP checkpoint gathered on rank 0 (ours) and as DCP's shards."""
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="bench_fsdp_")
    results = {"model": args.model, "nproc": args.nproc, "batch_size": args.batch_size, "seq_len": args.seq_len}
    context = multiprocessing.get_context("spawn")
    try:
        for parallel in ("ddp", "fsdp_whole", "fsdp", "fsdp_offload"):
            with socket.socket() as sock:  # a free port for the process group
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            queue = context.Queue()
            ranks = [
                context.Process(target=parallel_rank, args=(r, args.nproc, port, parallel, args, out_dir, queue))
                for r in range(args.nproc)
            ]
            for process in ranks:
                process.start()
            figures = dict(queue.get() for _ in ranks)  # {rank: figures}
            for process in ranks:
                process.join()
                if process.exitcode != 0:
                    raise UserError(f"bench fsdp: a {parallel} process failed (exit code {process.exitcode})")
            for key in figures[0]:  # the largest over the ranks (rank 0 alone for the full checkpoint)
                results[f"{parallel}_{key}"] = max(f[key] for f in figures.values())
    finally:
        if not args.out_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    state = ("weights_MB", "gradients_MB", "optimizer_MB")
    results["fsdp_over_ddp_state"] = sum(results[f"fsdp_{k}"] for k in state) / sum(results[f"ddp_{k}"] for k in state)
    results["fsdp_over_ddp_rss"] = results["fsdp_rss_MB"] / results["ddp_rss_MB"]
    results["offload_over_fsdp_step"] = results["fsdp_offload_ms_per_step"] / results["fsdp_ms_per_step"]
    return results


# ---- generation (model.py's KV cache) ---------------------------------------------------------
def add_generate_args(parser):
    parser.add_argument("--model", default="gpt2", help="a size in model.MODEL_SIZES, random weights: gpt2, mini, ...")
    parser.add_argument("--batch_size", type=int, default=1, help="prompts generated together")
    parser.add_argument("--prompt_len", type=int, default=64, help="tokens in each (random) prompt")
    parser.add_argument("--new_tokens", type=int, default=512, help="tokens generated after it (0: no full run)")
    parser.add_argument("--positions", default="64,512", help="positions at which to time single steps")
    parser.add_argument("--steps", type=int, default=8, help="steps timed at each position (their median)")
    parser.add_argument("--cache", choices=["both", "on", "off"], default="both", help="the KV cache, or recompute")
    from device import add_device_args

    add_device_args(parser, dtype="float32")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (torch.set_num_threads; default: one per core). On a machine shared with "
        "other jobs, 1 avoids waiting at every op for a thread that is not running",
    )


def bench_generate(args):
    """Tokens/s of generate_stream (what sample.py and the training samples run) with the KV cache
    and recomputing the context at every step, and the time of one step at a few positions: with the
    cache it should barely grow with the position, without it grows with the context."""
    import torch

    from device import pick_device, setup_precision
    from generate import generate_stream
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
            for _ in generate_stream(model, prompts, steps, top_k=50, generator=generator, use_cache=use_cache):
                synchronize(device)
                seconds.append(time.perf_counter() - last)
                last = time.perf_counter()
        return seconds

    step_seconds(args.prompt_len, 4, use_cache=True)  # warm-up: allocator, kernel selection
    results = {
        "model": args.model,
        "params_M": model.num_params() / 1e6,
        "device": device,
        "dtype": str(precision.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
    }
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
def print_results(results, as_json):
    """Each benchmark returns a flat dict of measured figures; print it as a table or as JSON."""
    if as_json:
        print(json.dumps(results, indent=2))
        return
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")


@exit_on_error
def main(argv=None):
    benchmarks = {
        "fineweb": (add_fineweb_args, bench_fineweb),
        "dataloader": (add_dataloader_args, bench_dataloader),
        "train": (add_train_args, bench_train),
        "hellaswag": (add_hellaswag_args, bench_hellaswag),
        "generate": (add_generate_args, bench_generate),
        "memory": (add_memory_args, bench_memory),
        "fsdp": (add_fsdp_args, bench_fsdp),
    }
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="benchmark", required=True)
    for name, (add_args, _) in benchmarks.items():
        sub = subparsers.add_parser(name)
        sub.add_argument("--json", action="store_true", help="print the results as JSON")
        add_args(sub)
    args = parser.parse_args(argv)
    print_results(benchmarks[args.benchmark][1](args), args.json)


if __name__ == "__main__":
    main()
