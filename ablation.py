"""
The ablation: train_gpt2.py runs that differ by one change each, trained on the same shards with the
same model, batch and tokens, and their val losses. Two comparisons (docs/benchmarks.md has both):

- recipes: GPT-2's recipe, each modern change alone on top of it, and all of them (--recipe modern);
- optimizers: every --optimizer, from SGD to AdamW and Muon, each at its best peak LR from the same
  sweep of three (the first seed), then with the other seeds; the val loss curves on one plot
  (--plot), the final val loss, the tokens to reach AdamW's, and (--time_steps) the step time and the
  bytes of the optimizer's state.

    python ablation.py --data_dir log/demo/data --seeds 1337 1338           # GPT-2's recipe vs the modern one
    python ablation.py --data_dir log/demo/data --time_steps 8 --threads 1  # where the time goes: step times
    python ablation.py --compare optimizers --data_dir log/demo/data --steps 100 --seeds 1337 1338 --jobs 2 --threads 1
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
from config import bounded
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

# The optimizer comparison: GPT-2's recipe with one --optimizer each. The rules before AdamW run with
# --weight_decay 0: their weight decay is L2 (added to the gradient, so its strength follows the LR
# and, in Adam, the adaptive scaling), and the recipe's 0.1 is a value for AdamW's decoupled decay,
# which AdamW and Muon keep (torch.optim.Muon's decay is decoupled too).
OPTIMIZER_RUNS = {
    "sgd": ("--optimizer", "sgd", "--weight_decay", "0"),
    "momentum": ("--optimizer", "momentum", "--weight_decay", "0"),
    "nesterov": ("--optimizer", "nesterov", "--weight_decay", "0"),
    "adagrad": ("--optimizer", "adagrad", "--weight_decay", "0"),
    "rmsprop": ("--optimizer", "rmsprop", "--weight_decay", "0"),
    "adam": ("--optimizer", "adam", "--weight_decay", "0"),
    "adamw": ("--optimizer", "adamw"),
    "muon": ("--optimizer", "muon"),
}
# The peak LRs each run tries (--max_lr; muon's are --muon_lr, its AdamW groups at AdamW's best
# --max_lr): three each, the same budget for every rule, about x3 apart around the values usually
# quoted for small transformers (x2 for the Adam family, around GPT-2's tuned 1e-3 above). Momentum
# 0.9 makes a step ~10x the LR's, hence its LRs 10x below plain SGD's.
OPTIMIZER_LRS = {
    "sgd": (0.3, 1.0, 3.0),
    "momentum": (0.03, 0.1, 0.3),
    "nesterov": (0.03, 0.1, 0.3),
    "adagrad": (0.01, 0.03, 0.1),
    "rmsprop": (3e-4, 1e-3, 3e-3),
    "adam": (1e-3, 2e-3, 4e-3),
    "adamw": (1e-3, 2e-3, 4e-3),
    "muon": (0.02, 0.04, 0.08),
}


def add_ablation_args(parser, runs, out_dir):
    """The flags; `runs` are the runs to choose from, {name: train_gpt2.py flags}."""
    parser.add_argument("--data_dir", required=True, help="token shards (fineweb.py), the same for every run")
    parser.add_argument("--out_dir", default=out_dir, help="each run's log_dir, and results.jsonl")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=list(runs),
        choices=list(runs),
        help="the runs (default: every one; recipes: each change alone, then all of them: modern)",
    )
    parser.add_argument("--steps", type=bounded(int, 1, None), default=250, help="optimizer steps of each run")
    parser.add_argument(
        "--modern_steps",
        type=int,
        nargs="*",
        default=[100],
        help="recipes: shorter runs of the modern recipe (its schedule squeezed into fewer steps): the "
        "fewest steps whose val loss reaches GPT-2's at --steps give the token ratio",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337], help="one run of each per seed")
    parser.add_argument(
        "--gpt2_lr",
        type=float,
        default=GPT2_LR,
        help="--max_lr of every run but modern's (which sets its own LRs); optimizers: of --time_steps only",
    )
    parser.add_argument("--flags", default="", help="more train_gpt2.py flags for every run, e.g. '--muon_lr 0.04'")
    parser.add_argument(
        "--jobs",
        type=bounded(int, 1, None),
        default=1,
        help="runs at a time: for losses only, as runs that share the machine take longer",
    )
    parser.add_argument(
        "--threads", type=bounded(int, 1, None), default=None, help="CPU threads per run (default: cores / jobs)"
    )
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

    extra = shlex.split(args.flags)
    keys = []
    for name, flags in runs.items():
        lr = [] if name == "modern" else ["--max_lr", str(args.gpt2_lr)]
        for steps in [args.steps, *(args.modern_steps if name == "modern" else [])]:
            keys += [{"run": name, "flags": [*flags, *lr, *extra], "seed": seed, "steps": steps} for seed in args.seeds]
    return recipe_summary(run_all(keys, args), args.steps)


def run_optimizers(args, runs):
    """The optimizer comparison: each of `runs` ({name: flags}) at each of its LRs (OPTIMIZER_LRS, or
    --lrs) with the first seed, the grid widened where its best is at an edge (sweep); then its best LR
    with the other seeds. Muon's sweep comes after AdamW's, whose best --max_lr its AdamW groups take.
    The summary and, with --plot, the curves."""
    import shlex

    extra, steps = shlex.split(args.flags), args.steps
    grids = {name: list({**OPTIMIZER_LRS, **args.lrs}[name]) for name in runs}

    def key(name, lr, seed, adamw_lr=None):
        lr_flags = ["--muon_lr", str(lr), "--max_lr", str(adamw_lr)] if name == "muon" else ["--max_lr", str(lr)]
        return {"run": name, "flags": [*runs[name], *lr_flags, *extra], "seed": seed, "steps": steps, "lr": lr}

    first = {name: key for name in runs if name != "muon"}
    best, records = sweep(first, grids, args)
    adamw_lr = None
    if "muon" in runs:
        if "adamw" not in best:
            raise UserError("--runs muon needs adamw too: Muon's AdamW groups take AdamW's best --max_lr")
        adamw_lr = best["adamw"]["lr"]
        muon_best, muon_records = sweep({"muon": lambda *a: key(*a, adamw_lr=adamw_lr)}, grids, args)
        best, records = {**best, **muon_best}, records + muon_records
    seeds = [
        key(name, r["lr"], seed, adamw_lr)
        for name, r in best.items()
        if r["val_loss"] is not None
        for seed in args.seeds[1:]
    ]
    records += run_all(seeds, args)
    if args.plot:
        plot_curves(records, best, args.plot)
    return optimizer_summary(records, best, grids)


def sweep(makers, grids, args):
    """({name: the best run of its grid}, every run's record), for each run's key maker (name, lr, seed)
    -> key, with the first seed. A best at an edge of its grid may be beaten beyond it: the grid gets
    one more LR there, at the same ratio as the edge's neighbour, up to --extend times (grids grow in
    place)."""
    for widened in range(args.extend + 1):
        records = run_all([make(name, lr, args.seeds[0]) for name, make in makers.items() for lr in grids[name]], args)
        best = {name: best_run([r for r in records if r["run"] == name]) for name in makers}
        wider = {}
        for name in makers:
            grid = grids[name]
            if len(grid) < 2 or best[name]["val_loss"] is None:
                continue
            grid.sort()
            if best[name]["lr"] == grid[-1]:
                wider[name] = grid + [float(f"{grid[-1] ** 2 / grid[-2]:.2g}")]
            elif best[name]["lr"] == grid[0]:
                wider[name] = [float(f"{grid[0] ** 2 / grid[1]:.2g}"), *grid]
        if not wider or widened == args.extend:
            break
        grids.update(wider)
    return best, records


def run_all(keys, args):
    """The record of each key ({run, flags, seed, steps, ...}): from --out_dir/results.jsonl, or from
    a run of train_gpt2.py now (--jobs at a time), appended to it as the run ends."""
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
    keys = list({json.dumps(key): key for key in keys}.values())  # once each, e.g. with --modern_steps 250
    todo = [key for key in keys if find_record(done, key) is None]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        for finished in as_completed([pool.submit(train_run, key, args, threads) for key in todo]):
            record = finished.result()
            with open(results_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            done.append(record)
            outcome = (
                f"diverged ({record['diverged']})"
                if record["val_loss"] is None
                else f"val loss {record['val_loss']:.4f}, {record['train_seconds']:.0f} s of training"
            )
            what = f"{record['run']} {' '.join(record['flags'])} seed {record['seed']}, {record['steps']} steps"
            print(
                f"{what}: {outcome}",
                flush=True,
            )
    return [find_record(done, key) for key in keys]


def step_times(args, runs):
    """Where the time goes: the training step of each of `runs` on random tokens, in turns."""
    import functools
    import shlex
    import statistics
    import time

    import torch

    from device import DistInfo, pick_device, setup_precision
    from model import GPT
    from optim import make_optimizer, set_lr, state_bytes
    from train_gpt2 import Run, make_model_config, parse_config, train_step

    device = pick_device(args.device, local_rank=0)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, optimizers = {}, {}
    for name, flags in runs.items():
        lr = [] if name == "modern" else ["--max_lr", str(args.gpt2_lr)]
        cfg = parse_config([*ABLATION_MODEL, *flags, *lr, *shlex.split(args.flags)])
        torch.manual_seed(0)
        model = GPT(make_model_config(cfg, 50257)).to(device)
        optimizer = optimizers[name] = make_optimizer(model, cfg, device.split(":")[0])
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
    base = "gpt2" if "gpt2" in steps else "adamw"  # the recipes' baseline, or the optimizers'
    if base in steps:
        figures.update(
            {f"{name}_time_ratio": figures[f"{name}_step_ms"] / figures[f"{base}_step_ms"] for name in steps}
        )
    # what each optimizer keeps between steps (its moments, momentum buffers, step counts), after a step
    figures.update({f"{name}_optimizer_state_bytes": state_bytes(opt) for name, opt in optimizers.items()})
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
    last_line = (finished.stderr.strip().splitlines() or ["?"])[-1]
    if finished.returncode != 0 and "training diverged" in last_line:
        # a result, not a fault: an LR sweep's highest LR may diverge (train_gpt2.count_nonfinite)
        reason = last_line.removeprefix("error: ").split(": training diverged")[0]
        return {**key, "val_loss": None, "diverged": reason, **where(args)}
    if finished.returncode != 0:
        raise UserError(f"{' '.join(command)} failed: {last_line}")
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
        **where(args),
    }


def where(args):
    """What every record of one out_dir must share (run_all checks it)."""
    return {"data_dir": args.data_dir, "device": args.device}


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


def tokens_per_step(record):
    """A run's --total_batch_size: ABLATION_MODEL's, unless its own flags (--flags) give another."""
    words = [*ABLATION_MODEL, *record["flags"]]
    return int(words[len(words) - words[::-1].index("--total_batch_size")])


def best_run(records):
    """The sweep's run with the lowest final val loss (a diverged one only if all diverged)."""
    return min(records, key=lambda r: (r["val_loss"] is None, r["val_loss"] or 0.0))


def mean_curve(records):
    """{step: val loss} averaged over the seeds' runs (the steps all of them have)."""
    import statistics

    # int steps: a record just run has them, one read back from results.jsonl has JSON's string keys
    curves = [{int(step): loss for step, loss in r["val_curve"].items()} for r in records]
    steps = set.intersection(*(set(curve) for curve in curves))
    return {step: statistics.mean(curve[step] for curve in curves) for step in sorted(steps)}


def steps_to_reach(curve, target):
    """The first step at which the val loss curve ({step: loss}, evaluated every few steps) is down to
    target, read off the straight line between the two evaluations around it; None if it never is."""
    points = sorted(curve.items())
    for (s0, l0), (s1, l1) in zip(points, points[1:]):
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1) if l0 > target else s0
    return None


def optimizer_summary(records, best, lrs):
    """Per optimizer: its best LR (and whether that was the edge of the grid tried), the final val loss
    at it (mean over seeds) and their spread, and the tokens it took to reach AdamW's final val loss."""
    figures = {}
    at_best = {name: [r for r in records if r["run"] == name and r["lr"] == b["lr"]] for name, b in best.items()}
    runs = {name: [r for r in rs if r["val_loss"] is not None] for name, rs in at_best.items()}
    curves = {name: mean_curve(rs) for name, rs in runs.items() if rs}
    target = curves["adamw"][max(curves["adamw"])] if "adamw" in curves else None
    for name, rs in runs.items():
        lr = best[name]["lr"]
        figures[f"{name}_best_lr"] = lr
        figures[f"{name}_best_lr_at_edge"] = lr in (min(lrs[name]), max(lrs[name]))
        for r in [r for r in records if r["run"] == name and r["seed"] == best[name]["seed"]]:
            figures[f"{name}_lr{r['lr']:g}_val_loss"] = r["val_loss"]  # the sweep: None = diverged
        figures[f"{name}_diverged_seeds"] = len(at_best[name]) - len(rs)
        if not rs:
            continue
        figures[f"{name}_val_loss"] = curves[name][max(curves[name])]
        if len(rs) > 1:
            figures[f"{name}_seed_spread"] = max(r["val_loss"] for r in rs) - min(r["val_loss"] for r in rs)
        if target is not None:
            step = steps_to_reach(curves[name], target)
            figures[f"{name}_tokens_to_adamw_loss"] = None if step is None else round(step * tokens_per_step(rs[0]))
    return figures


def plot_curves(records, best, path):
    """The val loss against tokens of each optimizer at its best LR (mean over seeds), on one plot."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, b in best.items():
        runs = [r for r in records if r["run"] == name and r["lr"] == b["lr"] and r["val_loss"] is not None]
        if runs:
            curve = mean_curve(runs)
            tokens = [step * tokens_per_step(runs[0]) / 1e3 for step in curve]
            ax.plot(tokens, list(curve.values()), marker="o", ms=3, label=f"{name} (lr {b['lr']:g}, {len(runs)} seeds)")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("val loss (nats per token)")
    ax.set_title("Optimizers on the same model, data and tokens (ablation.py --compare optimizers)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_lrs(text):
    """--lrs NAME=LR,LR,...: another LR grid for one optimizer run."""
    name, _, values = text.partition("=")
    try:
        return name, tuple(float(v) for v in values.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=LR,LR,... e.g. sgd=1,3,10")


@exit_on_error
def main(argv=None):
    # --compare first, on a parser of its own: the runs to choose from depend on it (and -h must see them all)
    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("--compare", choices=("recipes", "optimizers"), default="recipes", help="which ablation")
    compare = which.parse_known_args(argv)[0].compare
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[which]
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    catalogue = RECIPE_RUNS if compare == "recipes" else OPTIMIZER_RUNS
    add_ablation_args(parser, catalogue, out_dir=f"log/{compare}")
    parser.add_argument(
        "--lrs",
        type=parse_lrs,
        nargs="*",
        default=[],
        help="optimizers: other LR grids than OPTIMIZER_LRS, e.g. --lrs sgd=1,3,10 momentum=0.3,1",
    )
    parser.add_argument("--plot", default=None, help="optimizers: a PNG of the val loss curves to write")
    parser.add_argument(
        "--extend",
        type=bounded(int, 0, None),
        default=1,
        help="optimizers: LRs added beyond a best at the edge of its grid, at most, one at a time",
    )
    args = parser.parse_args(argv)
    args.lrs = dict(args.lrs)
    unknown = set(args.lrs) - set(OPTIMIZER_RUNS)
    if unknown:
        raise UserError(f"--lrs {unknown.pop()}=...: not an optimizer run (one of {', '.join(OPTIMIZER_RUNS)})")
    runs = {name: catalogue[name] for name in args.runs}
    if args.time_steps:
        results = step_times(args, runs)
    else:
        results = (run_ablation if compare == "recipes" else run_optimizers)(args, runs)
    print_results(results, args.json)


if __name__ == "__main__":
    main()
