"""Tests for train_gpt2.py: the recipe's numbers, DDP equivalence, exact resume, precision, errors.

Training runs in-process through train_gpt2.main(argv) on a tiny model; only the DDP test starts
processes (torchrun, gloo on CPU).
"""

import importlib.util
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import types
from importlib.machinery import ModuleSpec

import numpy as np
import pytest
import torch
from conftest import REPO

import device
import optim
import train_gpt2
import training_log
from checkpoint import load_checkpoint
from errors import UserError
from training_log import LOGGER_NAME, read_log, read_metrics

# A 2-layer model on (2, 16) batches; 64 tokens per step = 2 micro-steps on one process.
TINY = (
    "--n_layer 2 --n_head 2 --n_embd 32 --batch_size 2 --seq_len 16 --total_batch_size 64 "
    "--warmup_steps 2 --max_lr 1e-2 --val_steps 2 --eval_tasks= --sample_interval 0 --device cpu "
    "--compile 0 --dtype float32"
).split()


def write_shards(data_dir, tokens_per_shard=4096, train_shards=2, seed=0):
    """Token shards the way fineweb.py names them (val first), filled with random GPT-2 token ids."""
    rng = np.random.default_rng(seed)
    os.makedirs(data_dir, exist_ok=True)
    splits = ["val"] + ["train"] * train_shards
    for index, split in enumerate(splits):
        tokens = rng.integers(0, 50257, size=tokens_per_shard, dtype=np.uint16)
        np.save(os.path.join(data_dir, f"edufineweb_{split}_{index:06d}.npy"), tokens)
    return str(data_dir)


@pytest.fixture
def data_dir(tmp_path):
    return write_shards(tmp_path / "data")


def run(data_dir, log_dir, *flags):
    train_gpt2.main(["--data_dir", str(data_dir), "--log_dir", str(log_dir), *TINY, *flags])
    return read_metrics(os.path.join(log_dir, "metrics.jsonl"))


def losses(metrics, kind="train"):
    return {m["step"]: m["loss"] for m in metrics if m["kind"] == kind}


def resumed_halfway(data_dir, tmp_path, *flags):
    """(whole, resumed, the resumed run's folder): the metrics of a 6-step run with a checkpoint every 3
    steps, and of the same run started again in another folder from the step-3 checkpoint alone."""
    steps = ["--max_steps", "6", "--eval_interval", "3", "--ckpt_interval", "3", *flags]
    whole = run(data_dir, tmp_path / "whole", *steps)
    part = tmp_path / "part"
    part.mkdir()
    os.link(tmp_path / "whole" / "model_00003.pt", part / "model_00003.pt")
    return whole, run(data_dir, part, *steps), part


# ---- the recipe ----


def test_defaults_are_the_gpt2_124m_recipe():
    cfg = train_gpt2.parse_config([])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (12, 12, 768)
    assert (cfg.total_batch_size, cfg.batch_size, cfg.seq_len) == (524288, 64, 1024)
    assert (cfg.max_steps, cfg.warmup_steps) == (19073, 715)
    assert cfg.max_steps == int(10e9 / 2**19) and cfg.warmup_steps == int(375e6 / 2**19)
    assert (cfg.max_lr, cfg.min_lr_ratio, cfg.weight_decay, cfg.grad_clip) == (6e-4, 0.1, 0.1, 1.0)
    assert (cfg.beta1, cfg.beta2, cfg.adam_eps) == (0.9, 0.95, 1e-8)
    assert (cfg.eval_interval, cfg.val_steps, cfg.sample_interval, cfg.ckpt_interval) == (250, 20, 250, 5000)
    assert cfg.eval_tasks == "hellaswag" and cfg.resume == "auto"
    assert cfg.data_dir == os.path.join(str(REPO), "edu_fineweb10B")  # beside the script, not the cwd
    # 2**19 tokens = 64 x 1024 x 8 GPUs in one micro-step, or 8 micro-steps on one GPU
    assert train_gpt2.get_grad_accum_steps(cfg, world_size=8) == 1
    assert train_gpt2.get_grad_accum_steps(cfg, world_size=1) == 8


def test_preset_replaces_defaults_and_flags_replace_the_preset():
    cfg = train_gpt2.parse_config(["--preset", "cpu", "--max_steps", "7", "--shuffle", "0"])
    assert (cfg.n_layer, cfg.n_embd) == (4, 64)  # from the preset
    assert cfg.max_steps == 7 and cfg.shuffle is False  # from the flags
    assert cfg.max_lr == train_gpt2.PRESETS["cpu"]["max_lr"]


def test_help_lists_every_flag_with_its_origin(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_gpt2.parse_config(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ["--data_dir", "--total_batch_size", "--resume", "--dtype", "--compile", "--seed", "--preset"]:
        assert name in text
    assert "a decay down to 10%, GPT-3 paper appendix B" in " ".join(text.split())


def test_indivisible_batch_size_is_a_clear_error():
    cfg = train_gpt2.parse_config(["--batch_size", "48"])
    with pytest.raises(UserError, match=r"--total_batch_size 524288 is not a multiple of .* 48 x 1024 x 1"):
        train_gpt2.get_grad_accum_steps(cfg, world_size=1)


def test_lr_warms_up_linearly_then_decays_by_cosine_to_ten_percent():
    cfg = train_gpt2.parse_config([])
    assert optim.get_lr(0, cfg) == pytest.approx(6e-4 / 715)
    assert optim.get_lr(357, cfg) == pytest.approx(6e-4 * 358 / 715)
    assert optim.get_lr(714, cfg) == pytest.approx(6e-4)
    assert optim.get_lr(715, cfg) == pytest.approx(6e-4)  # the cosine starts at its peak
    halfway = 715 + (19073 - 715) // 2
    assert optim.get_lr(halfway, cfg) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-4)
    assert optim.get_lr(19072, cfg) == pytest.approx(6e-5, rel=1e-6)
    decay = [optim.get_lr(s, cfg) for s in range(715, 19073, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


# ---- the training step ----


@pytest.mark.parametrize("ddp_grad_accum_steps", [1, 2])
def test_two_process_ddp_equals_one_process_with_gradient_accumulation(data_dir, tmp_path, ddp_grad_accum_steps):
    """torchrun with 2 processes (gloo) x A micro-steps must see the same tokens and take the same
    steps as 1 process x 2A micro-steps: same per-step losses up to float summation order. With A=2,
    DDP skips the gradient all-reduce on the first micro-step (no_sync) and must do it on the last:
    if it never did, each process would train its own weights and the val losses would differ."""
    total_batch_size = str(2 * 16 * 2 * ddp_grad_accum_steps)  # B x T x processes x A
    steps = ["--max_steps", "4", "--eval_interval", "4", "--total_batch_size", total_batch_size]
    # val_steps counts batches per process: 4 on one process read the windows 2 x 2 read on two
    single = run(data_dir, tmp_path / "single", *steps, "--val_steps", "4")
    ddp_log = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    flags = ["--data_dir", data_dir, "--log_dir", str(ddp_log), *TINY, *steps, "--val_steps", "2"]
    command = [*torchrun, str(REPO / "train_gpt2.py"), *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ddp = read_metrics(ddp_log / "metrics.jsonl")
    config = [m for m in ddp if m["kind"] == "config"][0]
    assert (config["world_size"], config["grad_accum_steps"]) == (2, ddp_grad_accum_steps)
    assert [m["grad_accum_steps"] for m in single if m["kind"] == "config"] == [2 * ddp_grad_accum_steps]
    single_losses, ddp_losses = losses(single), losses(ddp)
    assert sorted(ddp_losses) == sorted(single_losses) == [0, 1, 2, 3]
    for step in single_losses:
        assert ddp_losses[step] == pytest.approx(single_losses[step], abs=1e-5)
    # so do the weights after 4 updates (all the training losses are close to ln(50257): random tokens)
    assert losses(ddp, "val")[4] == pytest.approx(losses(single, "val")[4], abs=1e-5)


def test_resume_after_sigterm_is_bit_identical_to_an_uninterrupted_run(data_dir, tmp_path, capsys):
    steps = ["--max_steps", "6", "--eval_interval", "3", "--ckpt_interval", "100"]
    uninterrupted = run(data_dir, tmp_path / "a", *steps)

    class SigtermAfterStep2(logging.Handler):
        def emit(self, record):
            metrics = getattr(record, "metrics", {})
            if metrics.get("kind") == "train" and metrics["step"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    logger = logging.getLogger(LOGGER_NAME)
    trigger = SigtermAfterStep2()
    original_setup = training_log.setup_logging

    def setup_logging_with_trigger(*args):
        log = original_setup(*args)
        log.addHandler(trigger)
        return log

    training_log.setup_logging = setup_logging_with_trigger
    try:
        first_part = run(data_dir, tmp_path / "b", *steps)  # returns normally: exit code 0
    finally:
        training_log.setup_logging = original_setup
        logger.removeHandler(trigger)
    assert max(losses(first_part)) == 2  # the step in flight finished, no more
    # not "the same command": with --resume PATH that would go back to PATH
    assert "stopped by a signal after step 3, saved in " in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "b")) == [".lock", "log.txt", "metrics.jsonl", "model_00003.pt"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again

    resumed = run(data_dir, tmp_path / "b", *steps)  # --resume auto is the default
    assert losses(resumed) == losses(uninterrupted)  # exact float equality, every step
    assert losses(resumed, "val") == losses(uninterrupted, "val")
    assert [m["step"] for m in resumed if m["kind"] == "train"] == list(range(6))  # no step logged twice
    log_txt, skipped = read_log(tmp_path / "b" / "log.txt")
    assert skipped == 0
    assert log_txt["train"][0] == list(range(6)) and log_txt["val"][0] == [0, 3, 6]


def test_checkpoint_holds_everything_a_resume_needs(data_dir, tmp_path):
    run(data_dir, tmp_path / "run", "--max_steps", "2", "--keep_last", "1", "--ckpt_interval", "1")
    assert sorted(f for f in os.listdir(tmp_path / "run") if f.endswith(".pt")) == ["model_00002.pt"]  # pruned
    checkpoint = load_checkpoint(str(tmp_path / "run" / "model_00002.pt"))  # weights_only=True
    assert checkpoint["step"] == 2
    assert checkpoint["config"] == {
        "block_size": 1024,
        "vocab_size": 50257,
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
        "rope": False,
        "rmsnorm": False,
        "qk_norm": False,
        "relu2": False,
        "untied_head": False,
        "zero_init": False,
        "logit_softcap": 0.0,
    }  # GPT-2's
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in checkpoint["model"])
    assert checkpoint["args"]["max_steps"] == 2 and checkpoint["args"]["batch_size"] == 2
    assert len(checkpoint["optimizer"]["state"]) > 0
    assert checkpoint["dataloader"]["position"] == 4  # 2 steps x 2 micro-batches read
    assert len(checkpoint["rng"]) == 1  # one per process
    assert set(checkpoint["rng"][0]) == {"python", "numpy", "torch"}
    # saved before step 2's own evaluation: the newest validation before it is step 0's
    assert checkpoint["last_val"]["step"] == 0 and math.isfinite(checkpoint["last_val"]["loss"])


def test_float16_unscales_gradients_before_clipping_and_checkpoints_the_scaler(data_dir, tmp_path):
    fp32 = run(data_dir, tmp_path / "fp32", "--max_steps", "1", "--eval_interval", "10")
    fp16 = run(data_dir, tmp_path / "fp16", "--max_steps", "1", "--eval_interval", "10", "--dtype", "float16")
    norm32 = [m["grad_norm"] for m in fp32 if m["kind"] == "train"][0]
    norm16 = [m["grad_norm"] for m in fp16 if m["kind"] == "train"][0]
    assert norm16 == pytest.approx(norm32, rel=0.05)  # not 65536x larger: unscaled first
    scaler = load_checkpoint(str(tmp_path / "fp16" / "model_00001.pt"))["scaler"]
    assert scaler["scale"] == 65536.0 and scaler["growth_interval"] == 2000


def nan_loss_on_training_call(nth):
    """A GPT.forward whose n-th call with gradients enabled (a training micro-step) returns a nan loss."""
    forward = train_gpt2.GPT.forward
    calls = []

    def patched_forward(model, idx, targets=None):
        logits, loss = forward(model, idx, targets)
        if torch.is_grad_enabled():
            calls.append(idx)
            if len(calls) == nth:
                loss = loss * float("nan")
        return logits, loss

    return patched_forward


def test_nonfinite_loss_stops_naming_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    # 2 micro-steps per step: the 5th training forward pass is in step 2
    monkeypatch.setattr(train_gpt2.GPT, "forward", nan_loss_on_training_call(nth=5))
    with pytest.raises(SystemExit, match=r"step 2: loss nan.*last good checkpoint is .*model_00002\.pt"):
        run(data_dir, tmp_path / "run", "--max_steps", "6", "--ckpt_interval", "2", "--eval_interval", "10")


def test_max_nonfinite_skips_skips_the_update_and_counts_it(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_gpt2.GPT, "forward", nan_loss_on_training_call(nth=5))
    metrics = run(data_dir, tmp_path / "run", "--max_steps", "4", "--eval_interval", "10", "--max_nonfinite_skips", "1")
    train = [m for m in metrics if m["kind"] == "train"]
    assert [m["nonfinite_skips"] for m in train] == [0, 0, 1, 1]
    assert math.isnan(train[2]["loss"]) and math.isfinite(train[3]["loss"])


# ---- precision, compilation, MFU ----


@pytest.mark.filterwarnings("ignore:.*GradScaler is enabled, but CUDA is not available")
def test_auto_dtype_is_fp16_with_loss_scaling_on_gpus_without_bf16(monkeypatch):
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (7, 0))  # V100
    assert device.setup_precision("auto", "cuda").dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))  # H100
    assert device.setup_precision("auto", "cuda").dtype == torch.bfloat16
    cpu = device.setup_precision("auto", "cpu")
    assert cpu.dtype == torch.float32 and not cpu.scaler.is_enabled()
    assert device.setup_precision("float16", "cpu").scaler.is_enabled()


FREE_AND_ALLOCATE_AGAIN = """
import resource, sys, torch, device
if sys.argv[1] == "reuse":
    assert device.keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(2**24)
before = faults()
for _ in range(20):
    x = torch.ones(2**24)  # 64 MB, like the (B*T, 50304) logits of a CPU step
    del x
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_cpu_training_reuses_freed_memory_instead_of_page_faulting_it_in_again():
    def page_faults(mode):
        child = subprocess.run(
            [sys.executable, "-c", FREE_AND_ALLOCATE_AGAIN, mode], cwd=REPO, capture_output=True, text=True, check=True
        )
        return int(child.stdout)

    default, reuse = page_faults("default"), page_faults("reuse")
    # glibc maps each 64 MB block afresh and the kernel faults it in again (about 4,000 faults per
    # block measured here); kept for reuse, the blocks after the first cost few or none.
    assert default > 20 * 2_000
    assert reuse < default / 2


@pytest.mark.parametrize(
    "name, flops",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Tesla V100-SXM2-16GB", 125e12),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_mfu_peak_comes_from_the_detected_gpu(monkeypatch, name, flops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: name)
    assert device.peak_flops("cuda:0", torch.bfloat16) == flops
    assert device.peak_flops("cpu", torch.bfloat16) is None


def test_compile_failure_falls_back_to_eager_with_auto_and_is_an_error_with_1(monkeypatch, caplog):
    def broken_compile(model):
        def fail(*args):
            raise RuntimeError("/usr/bin/ld: cannot find -lcuda: No such file or directory")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = train_gpt2.GPT(train_gpt2.GPTConfig(n_layer=1, n_head=1, n_embd=8))
    batch = (torch.zeros((1, 4), dtype=torch.long),) * 2
    precision = device.setup_precision("float32", "cpu")
    log = logging.getLogger("test_compile")
    with caplog.at_level(logging.WARNING, logger="test_compile"):
        assert device.compile_model(model, "auto", "cuda", batch, precision, log) is model
    assert "cannot find -lcuda" in caplog.text and "--compile 0" in caplog.text
    with pytest.raises(UserError, match="cannot find -lcuda.*--compile 0"):
        device.compile_model(model, "1", "cpu", batch, precision, log)
    assert device.compile_model(model, "auto", "cpu", batch, precision, log) is model  # no attempt on CPU


# ---- compiled training, evaluations and crashes ----


class TrainingShapeOnly(torch.nn.Module):
    """Stands in for torch.compile: records every call. A compiled graph is specialised to the
    training shape and mode; evaluation and sampling (other shapes, eval mode) must not call it."""

    def __init__(self, model, calls):
        super().__init__()
        self._orig_mod = model  # the attribute name torch.compile uses
        self.calls = calls

    def forward(self, idx, targets=None):
        self.calls.append((tuple(idx.shape), self._orig_mod.training))
        return self._orig_mod(idx, targets)


def test_compiled_module_runs_only_training_steps_while_evals_and_samples_run(
    data_dir, tmp_path, hellaswag_dir, gpt2_tokenizer, monkeypatch
):
    calls = []
    monkeypatch.setattr(device.torch, "compile", lambda model: TrainingShapeOnly(model, calls))
    monkeypatch.setenv("HELLASWAG_DIR", str(hellaswag_dir))
    metrics = run(
        data_dir,
        tmp_path / "log",
        "--compile",
        "1",
        "--max_steps",
        "4",
        "--eval_interval",
        "2",
        "--eval_tasks",
        "hellaswag",
        "--eval_limit",
        "2",
        "--sample_interval",
        "2",
        "--num_samples",
        "1",
        "--sample_tokens",
        "4",
    )
    # one warm-up call in compile_model, then 4 steps x 2 micro-steps, all (B, T) = (2, 16) in train mode
    assert calls == [((2, 16), True)] * (1 + 4 * 2)
    assert [m["step"] for m in metrics if m["kind"] == "val"] == [0, 2, 4]
    assert [m["step"] for m in metrics if m["kind"] == "hellaswag"] == [0, 2, 4]
    assert [m["step"] for m in metrics if m["kind"] == "sample"] == [0, 2, 4]


def test_checkpoint_is_written_before_the_evaluations_that_crash(data_dir, tmp_path, monkeypatch):
    evaluate = train_gpt2.evaluate

    def crash_at_step_2(run, job, step, *args):
        if step == 2:
            raise RuntimeError("evaluation crashed")
        return evaluate(run, job, step, *args)

    monkeypatch.setattr(train_gpt2, "evaluate", crash_at_step_2)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        run(data_dir, tmp_path / "log", "--max_steps", "4", "--eval_interval", "2", "--ckpt_interval", "2")
    assert load_checkpoint(str(tmp_path / "log" / "model_00002.pt"))["step"] == 2
    monkeypatch.setattr(train_gpt2, "evaluate", evaluate)
    resumed = run(data_dir, tmp_path / "log", "--max_steps", "4", "--eval_interval", "2", "--ckpt_interval", "2")
    assert sorted(losses(resumed)) == [0, 1, 2, 3]  # the two steps before the crash kept, two more trained


def test_zero_intervals_mean_never_and_still_checkpoint_at_the_end(data_dir, tmp_path):
    metrics = run(data_dir, tmp_path / "log", "--max_steps", "3", "--eval_interval", "0", "--ckpt_interval", "0")
    assert [m["kind"] for m in metrics if m["kind"] not in ("config", "train")] == ["end"]  # no eval, no sample
    assert sorted(os.listdir(tmp_path / "log")) == [".lock", "log.txt", "metrics.jsonl", "model_00003.pt"]


# ---- errors ----


def test_missing_data_dir_points_to_fineweb_and_writes_nothing(tmp_path):
    with pytest.raises(SystemExit, match="fineweb.py"):
        run(tmp_path / "nothing_here", tmp_path / "log", "--max_steps", "1")
    assert not (tmp_path / "log").exists()  # no empty log.txt left to confuse the next run


def test_seq_len_longer_than_block_size_is_an_error(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="--seq_len 2048 is longer than the model's block_size 1024"):
        run(data_dir, tmp_path / "log", "--seq_len", "2048", "--total_batch_size", "4096")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_an_error(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="--device cuda: PyTorch sees no CUDA GPU"):
        train_gpt2.main(["--data_dir", data_dir, "--log_dir", str(tmp_path), "--device", "cuda"])


def test_resuming_with_a_different_model_is_an_error(data_dir, tmp_path):
    run(data_dir, tmp_path / "run", "--max_steps", "1", "--eval_interval", "10")
    with pytest.raises(SystemExit, match=r"n_layer=2 \(flags say 3\).*same model flags"):
        run(data_dir, tmp_path / "run", "--max_steps", "2", "--n_layer", "3")


def test_resume_none_refuses_a_log_dir_with_checkpoints(data_dir, tmp_path):
    run(data_dir, tmp_path / "run", "--max_steps", "1", "--eval_interval", "10")
    with pytest.raises(SystemExit, match="--resume none, but .* already holds checkpoints"):
        run(data_dir, tmp_path / "run", "--max_steps", "1", "--resume", "none")


# ---- the README demo, in miniature ----


def test_demo_pipeline_trains_evaluates_samples_and_plots(
    tmp_path, fineweb_sample_dir, gpt2_tokenizer, hellaswag_dir, monkeypatch
):
    """make demo in miniature: fineweb.py -> shards -> train_gpt2.py -> val, HellaSwag, sample, checkpoint -> plot.py"""
    import fineweb
    import plot

    monkeypatch.setenv("HELLASWAG_DIR", str(hellaswag_dir))
    data_dir = tmp_path / "data"
    fineweb.main(
        [
            "--data_files",
            str(fineweb_sample_dir),
            "--data_dir",
            str(data_dir),
            "--shard_size",
            "20000",
            "--max_tokens",
            "60000",
            "--num_proc",
            "1",
        ]
    )
    log_dir = tmp_path / "demo"
    train_gpt2.main(
        [
            "--preset",
            "cpu",
            "--data_dir",
            str(data_dir),
            "--log_dir",
            str(log_dir),
            "--n_layer",
            "1",
            "--n_embd",
            "32",
            "--batch_size",
            "4",
            "--seq_len",
            "32",
            "--total_batch_size",
            "128",
            "--max_steps",
            "20",
            "--warmup_steps",
            "2",
            "--max_lr",
            "1e-2",
            "--eval_interval",
            "10",
            "--val_steps",
            "2",
            "--eval_limit",
            "4",
            "--sample_interval",
            "20",
            "--sample_tokens",
            "8",
            "--ckpt_interval",
            "20",
        ]
    )
    log_txt = (log_dir / "log.txt").read_text().splitlines()
    assert re.fullmatch(r"0 val \d+\.\d{4}", log_txt[0]) and re.fullmatch(r"0 val_bpb \d+\.\d{4}", log_txt[1])
    assert re.fullmatch(r"0 hella 0\.\d{4}", log_txt[2])
    assert re.fullmatch(r"19 train \d+\.\d{6}", [line for line in log_txt if " train " in line][-1])
    series, _ = read_log(log_dir / "log.txt")
    assert series["val"][0] == [0, 10, 20] and series["hella"][0] == [0, 10, 20]
    assert series["val"][1][-1] < series["val"][1][0] - 1  # from ~10.9 (uniform) toward the unigram loss
    metrics = read_metrics(log_dir / "metrics.jsonl")
    # bits per byte against an independent count: the UTF-8 bytes of the val targets (2 windows of 4 x 32)
    val_tokens = np.load(data_dir / "edufineweb_val_000000.npy").astype(np.int64)
    targets = np.concatenate([val_tokens[1:129], val_tokens[129:257]])
    enc = gpt2_tokenizer
    target_bytes = sum(len(enc.decode_single_token_bytes(t)) for t in targets if t != enc.eot_token)
    val = [m for m in metrics if m["kind"] == "val"][-1]
    assert val["bpb"] == pytest.approx(val["loss"] * len(targets) / (math.log(2) * target_bytes), rel=1e-9)
    hella = [m for m in metrics if m["kind"] == "hellaswag"]
    assert hella[-1]["count"] == 4
    samples = [m["text"] for m in metrics if m["kind"] == "sample"]
    assert len(samples) == 2 and all(s.startswith(train_gpt2.TrainConfig.sample_prompt) for s in samples)
    assert os.path.exists(log_dir / "model_00020.pt")
    plot.main([str(log_dir)])
    assert (log_dir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_train_reports_speed_and_memory_of_the_training_step():
    import argparse

    import bench

    parser = argparse.ArgumentParser()
    bench.add_train_args(parser)
    flags = ["--model", "tiny", "--batch_size", "2", "--seq_len", "16", "--warmup", "1", "--steps", "2"]
    results = bench.bench_train(parser.parse_args(flags))
    assert results["tokens_per_sec"] == pytest.approx(2 * 16 / (results["ms_per_step"] / 1000))
    assert results["mfu"] == "n/a" and results["compiled"] is False and results["dtype"] == "float32"
    assert results["peak_memory_MiB"] > 0


# ---- what a run says at its start and end ----


def test_a_run_ends_with_its_time_final_numbers_and_files_and_a_second_start_redoes_nothing(data_dir, tmp_path, capsys):
    log_dir = tmp_path / "log"
    first = run(data_dir, log_dir, "--max_steps", "2")
    out = capsys.readouterr().out
    final = [m for m in first if m["kind"] == "val"][-1]
    assert final["step"] == 2
    assert re.search(rf"done: 2 step\(s\) in 0:00:\d\d; val loss {final['loss']:.4f} bpb {final['bpb']:.4f}", out)
    assert f"checkpoints, log.txt and metrics.jsonl are in {log_dir}" in out
    log_txt = (log_dir / "log.txt").read_text()
    again = run(data_dir, log_dir, "--max_steps", "2")
    assert f"the run in {log_dir} is complete" in capsys.readouterr().out
    assert again == first and (log_dir / "log.txt").read_text() == log_txt  # nothing evaluated or written again


def test_the_first_step_of_a_process_gives_no_eta(data_dir, tmp_path):
    """Step 0 includes the warm-up (and compilation on a GPU): an ETA from it would be far too long."""
    train = [m for m in run(data_dir, tmp_path / "log", "--max_steps", "3") if m["kind"] == "train"]
    assert train[0]["eta_s"] is None and all(m["eta_s"] is not None for m in train[1:])
    assert train[-1]["eta_s"] == 0


def test_a_warmup_as_long_as_the_run_is_said_at_start(data_dir, tmp_path, capsys):
    run(data_dir, tmp_path / "log", "--max_steps", "2", "--warmup_steps", "5")
    captured = capsys.readouterr()
    assert "--warmup_steps 5 >= --max_steps 2: the LR never reaches --max_lr 0.01 (it ends at 0.004)" in (
        captured.out + captured.err
    )


def test_pretraining_steps_count_every_token_as_real(data_dir, tmp_path):
    train = [m for m in run(data_dir, tmp_path / "log", "--max_steps", "2") if m["kind"] == "train"]
    assert [(m["tokens"], m["padding"]) for m in train] == [(64, 0), (64, 0)]
    assert all(m["tokens_per_sec"] == pytest.approx(64 / (m["dt_ms"] / 1000)) for m in train)


def test_wandb_gets_the_records_of_metrics_jsonl(data_dir, tmp_path, monkeypatch):
    logged, calls = [], []

    class FakeRun:
        def log(self, metrics):
            logged.append(json.loads(json.dumps(metrics)))  # as metrics.jsonl holds it

        def finish(self):
            calls.append("finish")

    wandb = types.ModuleType("wandb")  # a stand-in: wandb is not a requirement of the repository
    wandb.__spec__, wandb.init = ModuleSpec("wandb", None), lambda **kwargs: calls.append(kwargs) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    metrics = run(data_dir, tmp_path / "log", "--max_steps", "2", "--wandb_project", "gpt2-test")
    assert logged == metrics and len(metrics) > 4
    assert calls[0]["project"] == "gpt2-test" and calls[0]["name"] == "log" and calls[-1] == "finish"


def test_wandb_asked_for_but_missing_is_one_message(data_dir, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else find_spec(name))
    with pytest.raises(SystemExit, match="--wandb_project needs the wandb package: pip install wandb"):
        run(data_dir, tmp_path / "log", "--max_steps", "1", "--wandb_project", "x")
    assert not (tmp_path / "log").exists()  # refused before anything is written
