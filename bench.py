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
