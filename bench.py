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
    pass


def bench_train(args):
    raise SystemExit("bench.py train: not written yet")


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
