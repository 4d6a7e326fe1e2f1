"""Tests for gpu_check.py: the GPU check runs its whole sequence on a CPU with --smoke, so the script
cannot rot while no GPU is around.

torch.compile runs with dynamo's "eager" backend here: the graphs are traced and counted as on a
GPU, without inductor's minute of C++ compilation.
"""

import functools
import json
import os

import pytest
import torch
from conftest import SHARED_DATA

import gpu_check
from errors import UserError

# every line of the check, in order
GPU_CHECK_LINES = [
    "environment",
    "train_bf16_compiled",
    "train_bf16_eager",
    "train_fp16_eager",
    "train_fp32_eager",
    "train_gpt2_run",
    "train_gpt2_resume",
    "generate_kv_cache",
    "qlora_nf4",
    "fsdp",
    "fsdp_cpu_offload",
    "fsdp_cpu_offload_run",
    "fsdp_cpu_offload_resume",
    "modern_recipe_run",
    "modern_recipe_resume",
    "total",
]


def hellaswag_folder():
    folder = os.environ.get("HELLASWAG_DIR") or str(SHARED_DATA / "hellaswag")
    return folder if os.path.isfile(os.path.join(folder, "hellaswag_val.jsonl")) else None


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on 2 shared, busy cores two threads wait for each
    other: one step took 10-30x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gpu_check_smoke_writes_every_line_and_goes_on_after_an_error(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    measure = gpu_check.check_train_step

    def out_of_memory_in_fp16(device, sizes, dtype, *args):
        figures = measure(device, sizes, dtype, *args)  # the fp16 path runs, then fails as an OOM would
        if dtype == "float16":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.28 GiB")
        return figures

    monkeypatch.setattr(gpu_check, "check_train_step", out_of_memory_in_fp16)
    hellaswag = hellaswag_folder()
    argv = ["--device", "cpu", "--smoke", "--compile", "1", "--out", str(tmp_path)]
    gpu_check.main(argv + (["--hellaswag_dir", hellaswag] if hellaswag else []))

    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith('{"name": ')]
    with open(tmp_path / "gpu_check.jsonl") as f:  # --out a folder: gpu_check.jsonl in it
        assert f.read().splitlines() == printed  # the file gets the very lines printed
    records = {r["name"]: r for r in map(json.loads, printed)}
    assert list(records) == GPU_CHECK_LINES
    for record in records.values():
        assert len(set(record) - {"name", "seconds", "run"}) > 0
        assert "error" not in record or record["name"] == "train_fp16_eager"
    assert records["train_fp16_eager"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert records["total"]["errors"] == ["train_fp16_eager"]

    environment = records["environment"]
    assert environment["device"] == "cpu" and environment["torch"] == torch.__version__
    assert environment["flash_attention_runs"] is True and environment["gpt2_bpe"] == "ok"

    for name in ["train_bf16_compiled", "train_bf16_eager", "train_fp32_eager"]:
        step = records[name]
        assert step["tokens_per_s"] > 0 and step["ms_per_micro_step"] > 0 and step["all_finite"]
        assert step["mfu"] is None  # no peak FLOPS on a CPU
    assert records["train_bf16_compiled"]["compiled"] and records["train_bf16_compiled"]["graphs"] >= 1
    assert records["train_bf16_eager"]["dtype"] == "bfloat16" and not records["train_bf16_eager"]["compiled"]

    run, resume = records["train_gpt2_run"], records["train_gpt2_resume"]
    modern, modern_resume = records["modern_recipe_run"], records["modern_recipe_resume"]
    assert (run["start_step"], run["max_steps"], resume["start_step"], resume["max_steps"]) == (0, 4, 4, 6)
    assert (modern["start_step"], modern["max_steps"], modern_resume["start_step"], modern_resume["max_steps"]) == (
        0,
        4,
        4,
        6,
    )
    assert set(modern["val_loss"]) == {"0", "2", "4"} and modern["sample"].startswith("Hello, I'm a language model,")
    assert set(run["val_loss"]) == {"0", "2", "4"} and set(resume["val_loss"]) == {"4", "6"}
    assert run["sample_step"] == 2 and run["sample"].startswith("Hello, I'm a language model,")
    assert resume["checkpoints"] == ["model_00004.pt", "model_00006.pt"]
    for record in (run, resume, modern, modern_resume):
        assert record["compiled"] and record["graphs_at_compile"] >= 1
        # evals and samples run the uncompiled model, and training goes on with the graph it had
        assert record["graphs_in_evals"] == 0 and record["graphs_in_later_train_steps"] == 0
        # compile_model's example batch is like the real ones: the first step needs no graph of its own
        assert record["graphs_in_first_train_step"] == 0 and record["recompiles"] == 0
    if hellaswag:
        assert set(run["hellaswag_acc_norm"]) == {"0", "2", "4"}
    else:
        assert run["hellaswag"].startswith("skipped")

    assert "skipped" not in records["generate_kv_cache"]
    assert records["fsdp"]["skipped"]
    offload = records["fsdp_cpu_offload"]  # on the CPU offloading moves nothing: the same losses
    assert offload["offload_ms_per_step"] > 0 and offload["no_offload_ms_per_step"] > 0
    assert offload["loss_max_difference"] == 0 and offload["offload_peak_gib"] is None
    offloaded, offloaded_resume = records["fsdp_cpu_offload_run"], records["fsdp_cpu_offload_resume"]
    assert (offloaded_resume["start_step"], offloaded_resume["max_steps"]) == (4, 6)
    assert set(offloaded["val_loss"]) == {"0", "2", "4"} and offloaded["sample"].startswith("Hello, I'm a language")
    assert offloaded_resume["checkpoints"] == ["model_00004.pt", "model_00006.pt"]
    assert offloaded["loss_first"] == run["loss_first"]  # the same initial weights, built on the meta device


def test_generation_figures_with_and_without_the_kv_cache(one_thread):
    figures = gpu_check.check_generation("cpu", gpu_check.SMOKE_SIZES)
    assert figures["cached_tokens_per_s"] > 0 and figures["uncached_tokens_per_s"] > 0
    assert figures["same_tokens_fraction"] > 0.5 and figures["kv_cache_speedup"] > 0


def test_gpu_check_refuses_a_hellaswag_folder_without_the_data(tmp_path):
    with pytest.raises(UserError, match="no hellaswag_val.jsonl"):
        gpu_check.hellaswag_source(str(tmp_path))


def test_graphs_made_in_each_phase_are_differences_of_the_counts_in_the_records():
    # each record carries the process's graph count when it was logged: 7 before the run began
    records = [
        {"kind": "config", "step": 0, "graphs": 9},  # compile_model made 2
        {"kind": "val", "step": 0, "graphs": 9},
        {"kind": "sample", "step": 0, "graphs": 10},  # 1 while sampling
        {"kind": "train", "step": 0, "graphs": 11},  # 1 in the first training step
        {"kind": "train", "step": 1, "graphs": 11},
        {"kind": "val", "step": 2, "graphs": 11},
        {"kind": "hellaswag", "step": 2, "graphs": 12},  # 1 in an eval task
        {"kind": "train", "step": 2, "graphs": 14},  # 2 in a training step after the evals
    ]
    assert gpu_check.graphs_made(records, 7) == {
        "compiled": True,
        "graphs_at_compile": 2,
        "graphs_in_first_train_step": 1,
        "graphs_in_evals": 2,
        "graphs_in_later_train_steps": 2,
        "recompiles": 5,
    }


def test_an_eager_run_and_its_resume_report_no_graphs(tmp_path, one_thread):
    sizes, figures = gpu_check.SMOKE_SIZES, []
    for max_steps in (sizes.run_steps, sizes.run_steps * 3 // 2):  # a run, then a resume in the same process
        figures.append(gpu_check.check_train_gpt2_run(str(tmp_path), "cpu", sizes, "0", None, max_steps))
    assert [f["start_step"] for f in figures] == [0, sizes.run_steps]
    for record in figures:
        assert record["compiled"] is False and record["graphs_at_compile"] == 0 and record["recompiles"] == 0
        assert record["graphs_in_first_train_step"] == record["graphs_in_evals"] == 0
