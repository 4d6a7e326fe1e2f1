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
def add_dataloader_args(parser):
    pass


def bench_dataloader(args):
    raise SystemExit("bench.py dataloader: not written yet")


# ---- training step ----------------------------------------------------------------------------
def add_train_args(parser):
    parser.add_argument("--model", default="gpt2", help="a size from model.MODEL_SIZES: gpt2, gpt2-medium, mini, tiny, ...")
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
    pass


def bench_hellaswag(args):
    raise SystemExit("bench.py hellaswag: not written yet")


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
