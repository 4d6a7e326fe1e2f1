"""pipeline.py: the whole chain at the smallest scale, end to end; a kill in the middle of a stage and a
second run end with the same numbers; a finished stage is skipped, a changed one refused."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, data_path

import pipeline
from errors import UserError

# Every stage, as small as it goes: a 1,024-id tokenizer, 200K tokens of shards, a 1-layer model.
TINY = {
    "--tokenizer": "--vocab_size 1024 --max_chars 4e5",
    "--shards": "--shard_size 5e4 --max_tokens 2e5",
    "--pretrain": "--model tiny --max_steps 12 --ckpt_interval 4 --eval_interval 12 --eval_tasks= --val_steps 4 "
    "--sample_interval 0 --seq_len 32 --batch_size 4 --total_batch_size 256",
    "--sft": "--max_steps 6 --eval_interval 6 --ckpt_interval 6",
    "--dpo": "--max_steps 3 --eval_interval 3 --ckpt_interval 3",
    "--rl": "--max_steps 2 --eval_interval 2 --ckpt_interval 2 --batch_size 8 --num_samples 4 --max_new_tokens 4",
}


def argv(out_dir):
    return ["--preset", "cpu", "--out_dir", str(out_dir), *(word for pair in TINY.items() for word in pair)]


@pytest.fixture(scope="module")
def env():
    """The offline FineWeb sample; no GSM8K (the report says it could not be read)."""
    fineweb = data_path("FINEWEB_DATA_FILES", "fineweb_sample")
    return {**os.environ, "FINEWEB_DATA_FILES": str(fineweb), "GSM8K_DIR": "", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def whole(tmp_path_factory, env):
    """One uninterrupted run of the whole chain."""
    out = tmp_path_factory.mktemp("whole")
    subprocess.run([sys.executable, "pipeline.py", *argv(out)], cwd=REPO, env=env, check=True)
    return out


def numbers(out):
    with open(out / "evals.json") as f:
        evals = json.load(f)
    last = {}
    for stage in ("pretrain", "sft", "dpo", "rl"):
        with open(out / stage / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
        last[stage] = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    return {"evals": {s: {k: v for k, v in e.items() if k != "checkpoint"} for s, e in evals.items()}, "train": last}


def test_the_whole_chain_ends_with_a_report_naming_every_stage_with_its_numbers(whole):
    report = (whole / "report.md").read_text()
    for stage in pipeline.STAGES:
        assert f"| {stage} | " in report and f"| {stage} | not run" not in report
    for heading in ("## pretrain", "## sft", "## dpo", "## rl", "## Chat evaluations"):
        assert heading in report
    evals = json.loads((whole / "evals.json").read_text())
    assert set(evals) == {"sft", "dpo", "rl"}
    for e in evals.values():
        assert e["heldout_greedy"]["count"] == 20 and 0 <= e["heldout_greedy"]["greedy_acc"] <= 1
        assert set(e["samples"]) == set(pipeline.SAMPLE_QUESTIONS)
    assert os.path.exists(whole / "pretrain" / "plot.png")


def test_a_second_run_skips_every_finished_stage(whole, env):
    result = subprocess.run(
        [sys.executable, "pipeline.py", *argv(whole)], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.count("done before") == len(pipeline.STAGES)


def test_a_changed_stage_is_refused_with_a_message(whole, env):
    changed = [*argv(whole)]
    changed[changed.index("--sft") + 1] += " --max_lr 1e-4"
    with pytest.raises(SystemExit, match="the sft stage in .* ran as .* and would now run as"):
        pipeline.main(changed)


def test_killed_in_the_middle_of_pretraining_and_run_again_it_ends_with_the_same_numbers(whole, env, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "pipeline.py", *argv(out)], cwd=REPO, env=env, start_new_session=True)
    deadline = time.time() + 600
    while not (out / "pretrain" / "model_00004.pt").exists():  # the first checkpoint of pretraining
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the pipeline and its training process, mid-stage
    process.wait()
    state = json.loads((out / "pipeline.json").read_text())
    assert state["pretrain"]["seconds"] is None  # started, not finished
    subprocess.run([sys.executable, "pipeline.py", *argv(out)], cwd=REPO, env=env, check=True)
    assert numbers(out) == numbers(whole)


def test_a_stage_that_cannot_start_says_which_one_is_missing(tmp_path):
    run = pipeline.Run(str(tmp_path), "cpu", {})
    with pytest.raises(UserError, match="holds no checkpoint: run the pretrain stage first"):
        pipeline.command(run, "sft")
