"""Tests for bench.py's training-step measurement, which `bench.py train` and the GPU check
(gpu_check.py) both report. bench.py train itself is tested in test_train.py, saved_tensor_bytes in
test_fsdp.py.

torch.compile runs with dynamo's "eager" backend here: the graphs are traced and counted as on a
GPU, without inductor's minute of C++ compilation.
"""

import functools

import pytest
import torch

import bench


@pytest.mark.parametrize("compile_flag", ["0", "1"])
def test_time_train_step_times_the_steps_after_the_warmup(compile_flag, monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    run = bench.time_train_step("cpu", "tiny", 2, 16, "float32", compile_flag, micro_steps=2, warmup=1, steps=2)
    assert len(run.warmup_steps) == 1 and len(run.timed_steps) == 2
    assert all(step.finite for step in run.warmup_steps + run.timed_steps)
    assert run.tokens_per_s == pytest.approx(2 * 2 * 16 / run.seconds_per_step)  # 2 micro-steps of 2 x 16
    assert run.mfu is None and run.peak_memory_MiB > 0  # no peak FLOPS on a CPU; the process's peak RSS
    assert run.compiled == (compile_flag == "1") and (run.graphs >= 1) == run.compiled
