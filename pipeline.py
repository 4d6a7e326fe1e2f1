"""
The whole pipeline in one command, one folder: a tokenizer -> token shards -> pretraining -> chat
fine-tuning (SFT) -> preference tuning (DPO) and reinforcement learning (RL) -> chat evaluations ->
report.md. Read it as the table of contents of the repository: each stage is one of its scripts.

    python pipeline.py                          # --preset cpu without a GPU, gpu with one; into log/pipeline
    python pipeline.py --preset 8gpu            # torchrun on 8 GPUs: the 10B-token GPT-2 run, then the rest
    python pipeline.py --pretrain "--max_steps 300" --out_dir log/quick      # any stage's flags, added last
    make pipeline                               # the same, after setting up the virtual environment

Run it again and it continues: a finished stage is skipped, an interrupted one resumes from its last
checkpoint (every script resumes by itself), and a stage whose command changed since it ran is refused
with a message. report.md is written again after every stage.

The data of each stage (offline: the same environment variables as `make demo`, and GSM8K_DIR):
- tokenizer, shards, pretraining: FineWeb-Edu (sample-10BT, streamed from the hub), or $FINEWEB_DATA_FILES.
- cpu: SFT on toy_tasks.py's addition (its fine-tuning answers are half wrong on purpose) and on
  data/capitals.jsonl; DPO on the addition's pairs; RL on the addition's prompts, checked exactly; the
  chat evaluations ask the 20 held-out sums, and GSM8K's test set if it can be read (a toy model: 0).
- gpu, 8gpu: the same, plus GSM8K's train solutions (annotations stripped) in SFT, RL on GSM8K's train
  questions, and GSM8K's test set in the evaluations. Not run yet: see the README.
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

import chat_eval
import toy_tasks
from errors import UserError, exit_on_error
from files import atomic_write
from resume import newest_checkpoint
from training_log import read_metrics

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
STAGES = ("tokenizer", "shards", "pretrain", "sft", "dpo", "rl", "evals")
CHAT_STAGES = ("sft", "dpo", "rl")  # the stages whose models the chat evaluations compare
SAMPLE_QUESTIONS = ("What is 3 + 4?", "Capital of France?", "Write a sentence about the sea.")

# How big each stage is. cpu: every stage at toy scale, ~20 minutes on 2 cores; gpu: GPT-2 124M on
# ~1.6B tokens, a few hours on one GPU; 8gpu: the 10B-token run (train_gpt2.py's defaults), then the rest.
PRESETS = {
    "cpu": dict(
        vocab_size=16384,
        max_chars="2e7",
        shard_size="1e6",
        max_tokens="3e6",
        nproc=1,
        pretrain=["--preset", "cpu"],
        chat=["--preset", "cpu"],
        gsm8k=False,
        eval_limit=50,
    ),
    "gpu": dict(
        vocab_size=32768,
        max_chars="1e9",
        shard_size="1e8",
        max_tokens="2e9",
        nproc=1,
        pretrain=["--max_steps", "3000", "--warmup_steps", "200"],
        chat=[],
        gsm8k=True,
        eval_limit=1319,
    ),
    "8gpu": dict(
        vocab_size=32768,
        max_chars="1e9",
        shard_size="1e8",
        max_tokens="1e10",
        nproc=8,
        pretrain=[],
        chat=[],
        gsm8k=True,
        eval_limit=1319,
    ),
}


@dataclass
class Run:
    """One pipeline: its folder, its preset, and the flags added to each stage."""

    out_dir: str
    preset: str
    extra: dict  # {stage: [flags]}

    def path(self, *parts):
        return os.path.join(self.out_dir, *parts)


# ---- the stages: the command each one runs ------------------------------------------------------
def source_flags():
    """Where the text comes from: local files ($FINEWEB_DATA_FILES), else FineWeb-Edu streamed."""
    files = os.environ.get("FINEWEB_DATA_FILES")
    return ["--data_files", files] if files else ["--streaming"]


def init(run, stage):
    """The checkpoint a stage starts from: the newest of `stage`, which has finished by then."""
    path = newest_checkpoint(run.path(stage))
    if path is None:
        raise UserError(f"{run.path(stage)} holds no checkpoint: run the {stage} stage first")
    return path


def command(run, stage):
    """The script and flags of `stage` (built when it runs: a stage starts from the one before's output)."""
    p, chat = PRESETS[run.preset], run.path("chat_data")
    addition = os.path.join(chat, "addition")
    if stage == "tokenizer":
        flags = [
            "tokenizer.py",
            "train",
            *source_flags(),
            "--vocab_size",
            str(p["vocab_size"]),
            "--max_chars",
            p["max_chars"],
            "--out_dir",
            run.path("tokenizer"),
        ]
    elif stage == "shards":
        flags = [
            "fineweb.py",
            *source_flags(),
            "--tokenizer",
            run.path("tokenizer"),
            "--data_dir",
            run.path("data"),
            "--shard_size",
            p["shard_size"],
            "--max_tokens",
            p["max_tokens"],
        ]
    elif stage == "pretrain":
        flags = ["train_gpt2.py", *p["pretrain"], "--data_dir", run.path("data"), "--log_dir", run.path("pretrain")]
    elif stage == "sft":
        files = [f"{addition}/sft.jsonl", os.path.join(SCRIPT_DIR, "data", "capitals.jsonl")]
        files += [os.path.join(chat, "gsm8k_sft.jsonl")] if p["gsm8k"] else []
        flags = ["finetune.py", *p["chat"], "--init", init(run, "pretrain"), "--data_files", *files]
        flags += ["--log_dir", run.path("sft")]
    elif stage == "dpo":
        flags = ["dpo.py", *p["chat"], "--init", init(run, "sft"), "--data_files", f"{addition}/pairs.jsonl"]
        flags += ["--log_dir", run.path("dpo")]
    elif stage == "rl":
        data = ["--task", "gsm8k"]  # validated on GSM8K's test split
        if not p["gsm8k"]:
            data = ["--data_files", f"{addition}/prompts.jsonl", "--val_files", f"{addition}/heldout.jsonl"]
        flags = ["rl.py", *p["chat"], "--init", init(run, "sft"), *data]
        flags += ["--num_samples", "8", "--log_dir", run.path("rl")]
    else:  # the chat evaluations run in this process: see evaluate_chat
        return ["pipeline.py", "--stage", "evals", "--preset", run.preset, "--out_dir", run.out_dir]
    return [*flags, *run.extra.get(stage, [])]


def finished_training(log_dir):
    """Whether a training run in log_dir reached its last step (its metrics.jsonl has the end record):
    a run stopped by SIGTERM exits 0 too, with a checkpoint to continue from."""
    path = os.path.join(log_dir, "metrics.jsonl")
    return os.path.exists(path) and any(m["kind"] == "end" for m in read_metrics(path))


def launcher(run, stage):
    """python, or torchrun for the training stages on several GPUs."""
    nproc = PRESETS[run.preset]["nproc"]
    if nproc > 1 and stage in ("pretrain", *CHAT_STAGES):
        return ["torchrun", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable]


def write_chat_data(run):
    """The chat data of SFT, DPO and RL (the module docstring says which), in out_dir/chat_data."""
    toy_tasks.write_addition(run.path("chat_data", "addition"))
    if PRESETS[run.preset]["gsm8k"]:
        rows = chat_eval.load_examples("gsm8k", None, split="train")
        solutions = [
            {
                "messages": [
                    {"role": "user", "content": row["question"]},
                    {"role": "assistant", "content": chat_eval.gsm8k_answer_text(row["answer"])},
                ]
            }
            for row in rows
        ]
        with open(run.path("chat_data", "gsm8k_sft.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in solutions)


# ---- running them: skip what is done, refuse what changed ---------------------------------------
def read_state(run):
    try:
        with open(run.path("pipeline.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def save_state(run, state):
    atomic_write(run.path("pipeline.json"), lambda f: f.write(json.dumps(state, indent=1).encode()))


def run_stage(run, stage, state):
    """Run `stage` unless it finished with the same command; a changed command is refused."""
    cmd = command(run, stage)
    done = state.get(stage, {})
    if done.get("command") not in (None, cmd):
        raise UserError(
            f"the {stage} stage in {run.out_dir} ran as `{shlex.join(done['command'])}`, and would now run as "
            f"`{shlex.join(cmd)}`: pass the same flags to continue it, or a new --out_dir (or delete "
            f"{run.path(stage)} and its entry in pipeline.json to run it again)"
        )
    if done.get("seconds") is not None:
        print(f"== {stage}: done before ({done['seconds']:.0f} s), skipped")
        return
    print(f"== {stage}: {shlex.join(cmd)}", flush=True)
    state[stage] = {"command": cmd, "seconds": None}
    save_state(run, state)
    started = time.perf_counter()
    if stage == "evals":
        evaluate_chat(run)
    else:
        result = subprocess.run([*launcher(run, stage), *cmd], cwd=SCRIPT_DIR)
        if result.returncode != 0:
            raise UserError(
                f"the {stage} stage failed (exit {result.returncode}): see its output above; run the "
                f"same command again to continue from where it stopped"
            )
        if stage in ("pretrain", *CHAT_STAGES) and not finished_training(run.path(stage)):
            raise UserError(
                f"the {stage} stage stopped before its last step (a signal?): run the same command again to continue it"
            )
    state[stage]["seconds"] = time.perf_counter() - started  # of the run that finished it
    save_state(run, state)


# ---- the chat evaluations: every chat stage's model, the same questions ------------------------
def evaluate_chat(run):
    """Held-out sums (greedy, and pass@1 of 8 samples), GSM8K's test set where it can be read, and a few
    sample replies, for the model of every chat stage: out_dir/evals.json."""
    import torch

    from checkpoint import checkpoint_tokenizer, model_from_checkpoint
    from device import DistInfo, pick_device, setup_precision

    device = pick_device("auto", 0)
    precision = setup_precision("auto", device.split(":")[0])
    heldout = chat_eval.load_examples("rows", run.path("chat_data", "addition", "heldout.jsonl"))
    try:
        gsm8k = chat_eval.load_examples("gsm8k", None, limit=PRESETS[run.preset]["eval_limit"])
    except UserError as e:  # offline without GSM8K_DIR: the report says so
        gsm8k, gsm8k_missing = None, str(e)
    greedy = chat_eval.EvalSettings(max_new_tokens=16)
    sampled = chat_eval.EvalSettings(max_new_tokens=16, num_samples=8, temperature=1.0)
    results = {}
    for stage in CHAT_STAGES:
        path = newest_checkpoint(run.path(stage))
        model, tokenizer = model_from_checkpoint(path, device).eval(), checkpoint_tokenizer(path)
        dist = DistInfo.single(device)
        figures = {
            "checkpoint": path,
            "heldout_greedy": chat_eval.evaluate("rows", model, tokenizer, heldout, dist, precision, greedy),
            "heldout_sampled": chat_eval.evaluate("rows", model, tokenizer, heldout, dist, precision, sampled),
            "gsm8k": chat_eval.evaluate("gsm8k", model, tokenizer, gsm8k, dist, precision) if gsm8k else gsm8k_missing,
        }
        prompts = [
            chat_eval.rows_prompt({"messages": [{"role": "user", "content": q}]}, tokenizer, True)
            for q in SAMPLE_QUESTIONS
        ]
        with torch.no_grad():
            replies = chat_eval.generate_replies(
                model, tokenizer, prompts, chat_eval.EvalSettings(32), device, precision
            )
        figures["samples"] = dict(zip(SAMPLE_QUESTIONS, replies))
        results[stage] = figures
        print(
            f"{stage}: held-out sums greedy {figures['heldout_greedy']['greedy_acc']:.3f}, "
            f"pass@1 {figures['heldout_sampled']['pass@1']:.3f}"
        )
    atomic_write(run.path("evals.json"), lambda f: f.write(json.dumps(results, indent=1).encode()))


# ---- report.md: what each stage bought --------------------------------------------------------
def environment():
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=SCRIPT_DIR, capture_output=True, text=True)
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    return {
        "git commit": commit.stdout.strip() or "unknown",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "GPU": gpu,
        "CPU cores": os.cpu_count(),
    }


def stage_numbers(log_dir):
    """What a training stage's metrics.jsonl says at its end: steps, real tokens, last train loss, and
    its last validation's and evaluations' figures."""
    metrics = read_metrics(os.path.join(log_dir, "metrics.jsonl"))
    train = [m for m in metrics if m["kind"] == "train"]
    numbers = {"steps": len(train), "tokens": sum(m.get("tokens", 0) for m in train)}
    numbers["train loss"] = train[-1]["loss"] if train else None
    skip = {"step", "kind", "graphs", "count", "text"}
    for m in metrics:
        if m["kind"] not in ("train", "config", "sample", "end"):
            numbers.update({f"{m['kind']} {k}": v for k, v in m.items() if k not in skip})
    return numbers


def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def figure(value):
    return f"{value:.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)


def write_report(run, state):
    """report.md in out_dir, from what the stages logged (metrics.jsonl, evals.json): written again after
    every stage, so a run cut short still has its report so far."""
    lines = [
        f"# Pipeline report: {run.out_dir}",
        "",
        f"Preset `{run.preset}`. " + ", ".join(f"{k} {v}" for k, v in environment().items()) + ".",
        "",
    ]
    lines += ["| stage | wall time | command |", "| --- | --- | --- |"]
    for stage in STAGES:
        done = state.get(stage, {})
        seconds = done.get("seconds")
        when = "not run" if not done else "running or stopped" if seconds is None else duration(seconds)
        cmd = f"`{shlex.join(done['command'])}`" if done else ""
        lines.append(f"| {stage} | {when} | {cmd} |")
    for stage in ("pretrain", *CHAT_STAGES):
        if not os.path.exists(run.path(stage, "metrics.jsonl")):
            continue
        lines += ["", f"## {stage}", ""]
        lines += [f"- {name}: {figure(value)}" for name, value in stage_numbers(run.path(stage)).items()]
        if os.path.exists(run.path(stage, "plot.png")):
            lines += ["", f"![{stage}]({stage}/plot.png)"]
    if os.path.exists(run.path("evals.json")):
        with open(run.path("evals.json")) as f:
            evals = json.load(f)
        lines += [
            "",
            "## Chat evaluations",
            "",
            "| model | held-out sums, greedy | pass@1 (8 samples) | GSM8K |",
            "| --- | --- | --- | --- |",
        ]
        for stage, e in evals.items():
            gsm8k = e["gsm8k"] if isinstance(e["gsm8k"], str) else f"{e['gsm8k']['greedy_acc']:.4f}"
            lines.append(
                f"| {stage} | {e['heldout_greedy']['greedy_acc']:.4f} +- {e['heldout_greedy']['stderr']:.4f} "
                f"| {e['heldout_sampled']['pass@1']:.4f} | {gsm8k} |"
            )
        lines += ["", "Sample replies (greedy):", ""]
        for stage, e in evals.items():
            lines += [f"- {stage}: " + "; ".join(f"{q!r} -> {a!r}" for q, a in e["samples"].items())]
    lines += ["", f"Talk to the last model: `python chat.py --checkpoint {newest_checkpoint(run.path('rl'))}`"]
    atomic_write(run.path("report.md"), lambda f: f.write("\n".join(lines).encode() + b"\n"))


def plot(run, stage):
    if stage in ("pretrain", *CHAT_STAGES) and os.path.exists(run.path(stage, "log.txt")):
        subprocess.run([sys.executable, "plot.py", run.path(stage)], cwd=SCRIPT_DIR, capture_output=True)


# ---- command line ----------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=tuple(PRESETS), help="cpu, gpu or 8gpu (default: gpu with one, else cpu)")
    parser.add_argument("--out_dir", default=os.path.join("log", "pipeline"), help="every stage's folder goes here")
    for stage in STAGES[:-1]:
        parser.add_argument(f"--{stage}", default="", metavar="FLAGS", help=f"more flags for the {stage} stage")
    parser.add_argument("--stage", choices=STAGES, help="run only this stage (the others must be done)")
    return parser.parse_args(argv)


@exit_on_error
def main(argv=None):
    args = parse_args(argv)
    if args.preset is None:
        import torch

        args.preset = "gpu" if torch.cuda.is_available() else "cpu"
    extra = {stage: shlex.split(getattr(args, stage)) for stage in STAGES[:-1]}
    run = Run(os.path.abspath(args.out_dir), args.preset, extra)
    os.makedirs(run.out_dir, exist_ok=True)
    state = read_state(run)
    if state.get("preset", run.preset) != run.preset:
        raise UserError(f"{run.out_dir} holds a --preset {state['preset']} pipeline: pass it, or a new --out_dir")
    state["preset"] = run.preset
    write_chat_data(run)
    for stage in [args.stage] if args.stage else STAGES:
        run_stage(run, stage, state)
        plot(run, stage)
        write_report(run, state)
    print(
        f"report: {run.path('report.md')}\ntalk to it: python chat.py --checkpoint {newest_checkpoint(run.path('rl'))}"
    )


if __name__ == "__main__":
    main()
