"""
The ablation: train_gpt2.py runs that differ by one change each, trained on the same shards with the
same model, batch and tokens, and their val losses. The runs compared are the recipes: GPT-2's, each
modern change alone on top of it, and all of them together (--recipe modern); docs/benchmarks.md,
"Recipes", has the results.

    python ablation.py --data_dir log/demo/data --seeds 1337 1338           # GPT-2's recipe vs the modern one
    python ablation.py --data_dir log/demo/data --time_steps 8 --threads 1  # where the time goes: step times
    add --json for machine-readable output

Each run is train_gpt2.py itself, in a process of its own. Each result is appended to
--out_dir/results.jsonl as its run ends, and a run already there (same flags, seed and steps) is not
run again: an interrupted ablation continues where it stopped. One out_dir holds one ablation: its
records all come from the same --data_dir and --device.
"""

import argparse
import json
import os

from bench import FixedBatchJob, median, print_results, synchronize
from errors import UserError, exit_on_error

# Each run's train_gpt2.py flags: one change at a time on top of GPT-2's recipe, then all of them
RECIPE_RUNS = {
    "gpt2": (),
    "rope": ("--rope", "1"),
    "rmsnorm": ("--rmsnorm", "1"),
    "qk_norm": ("--qk_norm", "1"),
    "relu2": ("--relu2", "1"),
    "untied_head": ("--untied_head", "1"),
    "zero_init": ("--zero_init", "1"),
    "logit_softcap": ("--logit_softcap", "15"),
    "muon": ("--optimizer", "muon"),
    "wsd": ("--lr_schedule", "wsd", "--min_lr_ratio", "0"),
    "modern": ("--recipe", "modern"),
}
# The CPU ablation's model and batch: 4 layers of width 128, micro-batches of 8 x 128 tokens, 2,048
# tokens per step; val every 25 steps on the same 24 x 1,024 tokens.
ABLATION_MODEL = tuple(
    "--n_layer 4 --n_head 4 --n_embd 128 --batch_size 8 --seq_len 128 --total_batch_size 2048 --eval_interval 25 "
    "--val_steps 24 --eval_tasks= --sample_interval 0 --ckpt_interval 0 --log_interval 50".split()
)
# GPT-2's recipe at this size: the best of the max_lr values tried (docs/benchmarks.md, "Recipes")
GPT2_LR = 1e-3


def add_ablation_args(parser, runs):
    """The flags; `runs` are the runs to choose from, {name: train_gpt2.py flags}."""
    parser.add_argument("--data_dir", required=True, help="token shards (fineweb.py), the same for every run")
    parser.add_argument("--out_dir", default="log/recipes", help="each run's log_dir, and results.jsonl")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=list(runs),
        choices=list(runs),
        help="the changes to run, one at a time (default: every one, then all of them: modern)",
    )
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps of each run")
    parser.add_argument(
        "--modern_steps",
        type=int,
        nargs="*",
        default=[100],
        help="shorter runs of the modern recipe (its schedule squeezed into fewer steps): the "
        "fewest steps whose val loss reaches GPT-2's at --steps give the token ratio",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337], help="one run of each per seed")
    parser.add_argument(
        "--gpt2_lr", type=float, default=GPT2_LR, help="--max_lr of every run but modern's (which sets its own LRs)"
    )
    parser.add_argument("--flags", default="", help="more train_gpt2.py flags for every run, e.g. '--muon_lr 0.04'")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time: for losses only, as runs that share the machine take longer",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: cores / jobs)")
    parser.add_argument("--device", default="cpu", help="train_gpt2.py --device")
    parser.add_argument(
        "--time_steps",
        type=int,
        default=0,
        help="instead of training: time this many steps of each run in one process, taking turns "
        "(run 1's step, run 2's, ..., then again), so that each gets the same share of the "
        "machine's noise; the median step time of each and its ratio to GPT-2's",
    )


def run_ablation(args, runs):
    """Every run of `runs` ({name: train_gpt2.py flags}) x --seeds for --steps steps (and modern's for
    each of --modern_steps); the final val loss of each, its training time (the sum of its step times:
    no evaluation, no start-up), and the modern recipe's share of GPT-2's tokens and time to reach
    GPT-2's final val loss."""
    import shlex
    from concurrent.futures import ThreadPoolExecutor, as_completed

    os.makedirs(args.out_dir, exist_ok=True)
    results_path = os.path.join(args.out_dir, "results.jsonl")
    done = [json.loads(line) for line in open(results_path)] if os.path.exists(results_path) else []
    for name in ("data_dir", "device"):
        other = {r[name] for r in done if name in r} - {getattr(args, name)}
        if other:
            raise UserError(
                f"{results_path} holds runs with --{name} {other.pop()}, not {getattr(args, name)}: pass "
                f"another --out_dir for another benchmark"
            )
    extra = shlex.split(args.flags)
    keys = []
    for name, flags in runs.items():
        lr = [] if name == "modern" else ["--max_lr", str(args.gpt2_lr)]
        for steps in [args.steps, *(args.modern_steps if name == "modern" else [])]:
            keys += [{"run": name, "flags": [*flags, *lr, *extra], "seed": seed, "steps": steps} for seed in args.seeds]
    keys = list({json.dumps(key): key for key in keys}.values())  # once each, e.g. with --modern_steps 250
    todo = [key for key in keys if find_record(done, key) is None]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        for finished in as_completed([pool.submit(train_run, key, args, threads) for key in todo]):
            record = finished.result()
            with open(results_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            done.append(record)
            print(
                f"{record['run']} {' '.join(record['flags'])} seed {record['seed']}, {record['steps']} steps: val "
                f"loss {record['val_loss']:.4f}, {record['train_seconds']:.0f} s of training",
                flush=True,
            )
    return recipe_summary([find_record(done, key) for key in keys], args.steps)


def step_times(args, runs):
    """Where the time goes: the training step of each of `runs` on random tokens, in turns."""
    import functools
    import shlex
    import statistics
    import time

    import torch

    from device import DistInfo, pick_device, setup_precision
    from model import GPT
    from optim import make_optimizer, set_lr
    from train_gpt2 import Run, make_model_config, parse_config, train_step

    device = pick_device(args.device, local_rank=0)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {}
    for name, flags in runs.items():
        lr = [] if name == "modern" else ["--max_lr", str(args.gpt2_lr)]
        cfg = parse_config([*ABLATION_MODEL, *flags, *lr, *shlex.split(args.flags)])
        torch.manual_seed(0)
        model = GPT(make_model_config(cfg, 50257)).to(device)
        optimizer = make_optimizer(model, cfg, device.split(":")[0])
        set_lr(optimizer, cfg.max_lr)
        precision = setup_precision("float32" if device == "cpu" else "auto", device.split(":")[0])
        x = torch.randint(0, 50257, (cfg.batch_size, cfg.seq_len), device=device)  # (B, T)
        micro_steps = cfg.total_batch_size // (cfg.batch_size * cfg.seq_len)
        run = Run(cfg, DistInfo.single(device), precision, log=None, tokenizer=None)
        steps[name] = functools.partial(train_step, run, FixedBatchJob(x, x), model, model, optimizer, micro_steps)
    times = {name: [] for name in steps}
    for turn in range(args.time_steps + 1):  # turn 0 warms up
        for name, step in steps.items():
            synchronize(device)
            t0 = time.perf_counter()
            step()
            synchronize(device)
            if turn:
                times[name].append(1000 * (time.perf_counter() - t0))
    figures = {f"{name}_step_ms": statistics.median(ms) for name, ms in times.items()}
    if "gpt2" in steps:
        figures.update({f"{name}_time_ratio": figures[f"{name}_step_ms"] / figures["gpt2_step_ms"] for name in steps})
    return figures


def find_record(records, key):
    """The newest record of a run with these flags, seed and steps, or None."""
    matches = [r for r in records if all(r[k] == v for k, v in key.items())]
    return matches[-1] if matches else None


def train_run(key, args, threads):
    """train_gpt2.py with key's flags in a fresh process; the figures of its metrics.jsonl."""
    import subprocess
    import sys

    from training_log import read_metrics

    tag = "_".join(flag.lstrip("-") for flag in key["flags"]) or "gpt2"
    log_dir = os.path.join(args.out_dir, f"{tag}_steps{key['steps']}_seed{key['seed']}")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_gpt2.py")
    # the run's own flags after the benchmark's: --flags can change the model, batch or warmup (on a GPU)
    command = [
        sys.executable,
        script,
        *ABLATION_MODEL,
        "--data_dir",
        args.data_dir,
        "--device",
        args.device,
        "--max_steps",
        str(key["steps"]),
        "--warmup_steps",
        "10",
        *key["flags"],
        "--seed",
        str(key["seed"]),
        "--log_dir",
        log_dir,
        "--resume",
        "none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    finished = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if finished.returncode != 0:
        raise UserError(f"{' '.join(command)} failed: {(finished.stderr.strip().splitlines() or ['?'])[-1]}")
    for name in os.listdir(log_dir):
        if name.endswith(".pt"):
            os.remove(os.path.join(log_dir, name))  # the final checkpoint: the figures are all in the record
    metrics = read_metrics(os.path.join(log_dir, "metrics.jsonl"))
    val = [m for m in metrics if m["kind"] == "val"]
    step_ms = [m["dt_ms"] for m in metrics if m["kind"] == "train"]
    return {
        **key,
        "val_loss": val[-1]["loss"],
        "val_bpb": val[-1]["bpb"],
        "val_curve": {m["step"]: round(m["loss"], 4) for m in val},
        "train_seconds": sum(step_ms) / 1000,
        "step_ms_median": median(step_ms),
        "threads": threads,
        "jobs": args.jobs,
        "log_dir": log_dir,
        "data_dir": args.data_dir,
        "device": args.device,
    }


def recipe_summary(records, steps):
    """Per run at `steps`: the val loss (mean over seeds), the spread between seeds, the change against
    GPT-2's and the step time. Per seed: the modern recipe's fewest steps that reach GPT-2's val loss,
    as shares of GPT-2's tokens and training time."""
    import statistics

    figures = {}
    at_steps = [r for r in records if r["steps"] == steps]
    names = list(dict.fromkeys(r["run"] for r in at_steps))
    mean_loss = {name: statistics.mean(r["val_loss"] for r in at_steps if r["run"] == name) for name in names}
    for name in names:
        runs = [r for r in at_steps if r["run"] == name]
        figures[f"{name}_val_loss"] = mean_loss[name]
        if len(runs) > 1:
            figures[f"{name}_seed_spread"] = max(r["val_loss"] for r in runs) - min(r["val_loss"] for r in runs)
        if "gpt2" in mean_loss and name != "gpt2":
            figures[f"{name}_minus_gpt2"] = mean_loss[name] - mean_loss["gpt2"]
        figures[f"{name}_step_ms"] = statistics.mean(r["step_ms_median"] for r in runs)
    for gpt2 in [r for r in at_steps if r["run"] == "gpt2"]:
        reached = [
            r
            for r in records
            if r["run"] == "modern" and r["seed"] == gpt2["seed"] and r["val_loss"] <= gpt2["val_loss"]
        ]
        if reached:
            fastest = min(reached, key=lambda r: r["steps"])
            figures[f"modern_tokens_share_seed{gpt2['seed']}"] = fastest["steps"] / gpt2["steps"]
            figures[f"modern_time_share_seed{gpt2['seed']}"] = fastest["train_seconds"] / gpt2["train_seconds"]
    return figures


@exit_on_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    add_ablation_args(parser, RECIPE_RUNS)
    args = parser.parse_args(argv)
    runs = {name: RECIPE_RUNS[name] for name in args.runs}
    print_results(step_times(args, runs) if args.time_steps else run_ablation(args, runs), args.json)


if __name__ == "__main__":
    main()
