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
# Runs in a fresh interpreter, so that its peak RSS is the pipeline's alone. The tokenizer is loaded
# before the clock starts, as it is for the raw-encoding figures it is compared with. Peak RSS comes
# from VmHWM: ru_maxrss would start at the RSS of the parent that forked us (Linux keeps it across exec).
FINEWEB_CHILD = """
import json, resource, sys, time, fineweb

def peak_rss_mb():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except OSError:  # no /proc (macOS): ru_maxrss, in bytes there
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

fineweb.gpt2_tokenizer()
rss_before = peak_rss_mb()
t0 = time.perf_counter()
fineweb.main(sys.argv[1:])
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "rss_mb": peak_rss_mb(), "rss_before_mb": rss_before}))
"""


def add_fineweb_args(parser):
    parser.add_argument("--data_files", nargs="+", required=True, help="local files as for fineweb.py")
    parser.add_argument("--num_proc", type=int, default=None, help="cores to use (default: all)")
    parser.add_argument("--copies", type=int, default=4, help="the timed input is the data this many times over")
    parser.add_argument("--shard_size", default="1e6", help="tokens per shard in the pipeline runs")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs of each measurement")


def fineweb_pipeline(data_dir, out_dir, args):
    """Run fineweb.py on data_dir in a child process: its seconds (read, tokenize, write) and peak RSS."""
    import os
    import subprocess
    import sys

    argv = ["--data_files", data_dir, "--out_dir", out_dir, "--shard_size", args.shard_size, "--num_proc", str(args.num_proc), "--overwrite"]
    here = os.path.dirname(os.path.abspath(__file__))
    child = subprocess.run([sys.executable, "-c", FINEWEB_CHILD, *argv], cwd=here, capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"fineweb.py failed:\n{child.stderr[-2000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def linked_copies(files, copies, folder):
    """A folder in which `files` appear `copies` times over (symlinks, in order): a bigger dataset for free."""
    import os

    os.makedirs(folder)
    for copy in range(copies):
        for i, path in enumerate(files):
            os.symlink(os.path.abspath(path), os.path.join(folder, f"{copy:03d}_{i:05d}_{os.path.basename(path)}"))
    return folder


def encode_pool_chunk(texts):
    import numpy as np
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")  # cached per process after the first call
    return [np.array(tokens, dtype=np.uint16) for tokens in enc.encode_ordinary_batch(texts, num_threads=1)]


def bench_fineweb(args):
    """Raw tiktoken throughput and the fineweb.py pipeline's, on the same texts with the same cores."""
    import multiprocessing
    import tempfile
    import time
    from concurrent.futures import ThreadPoolExecutor

    import fineweb

    args.num_proc = args.num_proc or fineweb.available_cores()
    files = fineweb.resolve_data_files(args.data_files)
    texts = [text for text in fineweb.local_rows(files, "text", 0) if text] * args.copies
    enc = fineweb.gpt2_tokenizer()
    n_tokens = len(texts) + sum(len(tokens) for tokens in enc.encode_ordinary_batch(texts, num_threads=args.num_proc))
    chunks = [texts[i : i + 64] for i in range(0, len(texts), 64)]

    def raw_tiktoken():  # tiktoken's own batch API: threads, each returning a list of ints
        enc.encode_ordinary_batch(texts, num_threads=args.num_proc)

    def raw_pool():  # the alternative to threads: a process pool, texts and tokens pickled between them
        with multiprocessing.Pool(args.num_proc) as pool:
            pool.map(encode_pool_chunk, chunks[: args.num_proc])  # start-up and tokenizer load not timed
            t0 = time.perf_counter()
            pool.map(encode_pool_chunk, chunks)
            return time.perf_counter() - t0

    def encode_only():  # what fineweb.py does to texts already in memory, without reading or writing
        with ThreadPoolExecutor(args.num_proc) as pool:
            list(pool.map(lambda chunk: fineweb.encode_batch(enc, chunk), chunks))

    def seconds(fn):
        t0 = time.perf_counter()
        return fn() or time.perf_counter() - t0

    best = {"raw": float("inf"), "pool": float("inf"), "encode": float("inf"), "pipeline": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        one = linked_copies(files, 1, f"{tmp}/one")
        many = linked_copies(files, args.copies, f"{tmp}/many")
        for _ in range(args.rounds):  # interleaved, so that a noisy neighbour hurts every figure alike
            best["raw"] = min(best["raw"], seconds(raw_tiktoken))
            best["pool"] = min(best["pool"], seconds(raw_pool))
            best["encode"] = min(best["encode"], seconds(encode_only))
            pipeline = fineweb_pipeline(many, f"{tmp}/out", args)
            best["pipeline"] = min(best["pipeline"], pipeline["seconds"])
        small = fineweb_pipeline(one, f"{tmp}/out", args)
    return {
        "num_proc": args.num_proc,
        "tokens": n_tokens,
        "raw_tiktoken_tok_per_s": n_tokens / best["raw"],
        "raw_process_pool_tok_per_s": n_tokens / best["pool"],
        "encode_only_tok_per_s": n_tokens / best["encode"],
        "pipeline_tok_per_s": n_tokens / best["pipeline"],
        "pipeline_vs_raw_tiktoken": best["raw"] / best["pipeline"],
        "pipeline_vs_encode_only": best["encode"] / best["pipeline"],
        "rss_mb_before_run": pipeline["rss_before_mb"],
        f"peak_rss_mb_1x_data": small["rss_mb"],
        f"peak_rss_mb_{args.copies}x_data": pipeline["rss_mb"],
    }


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
