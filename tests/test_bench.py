"""Tests for bench.py: the GPU check (`bench.py gpu`) runs its whole sequence on a CPU with --smoke,
so the script cannot rot while no GPU is around.

torch.compile runs with dynamo's "eager" backend here: the graphs are traced and counted as on a
GPU, without inductor's minute of C++ compilation.
"""

import functools
import inspect
import json
import os
import sys

import pytest
import torch

import bench
from conftest import SHARED_DATA
from errors import UserError
from model import GPT

# every line of the check, in order
GPU_CHECK_LINES = [
    "environment",
    "train_bf16_compiled", "train_bf16_eager", "train_fp16_eager", "train_fp32_eager",
    "train_gpt2_run", "train_gpt2_resume",
    "generate_kv_cache", "fsdp", "modern_recipe_run", "modern_recipe_resume",
    "total",
]  # fmt: skip


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
    measure = bench.check_train_step

    def out_of_memory_in_fp16(device, sizes, dtype, *args):
        figures = measure(device, sizes, dtype, *args)  # the fp16 path runs, then fails as an OOM would
        if dtype == "float16":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.28 GiB")
        return figures

    monkeypatch.setattr(bench, "check_train_step", out_of_memory_in_fp16)
    hellaswag = hellaswag_folder()
    argv = ["bench.py", "gpu", "--device", "cpu", "--smoke", "--compile", "1", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv + (["--hellaswag_dir", hellaswag] if hellaswag else []))
    bench.main()

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
        0, 4, 4, 6)
    assert set(modern["val_loss"]) == {"0", "2", "4"} and modern["sample"].startswith("Hello, I'm a language model,")
    assert set(run["val_loss"]) == {"0", "2", "4"} and set(resume["val_loss"]) == {"4", "6"}
    assert run["sample_step"] == 2 and run["sample"].startswith("Hello, I'm a language model,")
    assert resume["checkpoints"] == ["model_00004.pt", "model_00006.pt"]
    for record in (run, resume, modern, modern_resume):
        assert record["compiled"] and record["graphs_at_compile"] >= 1
        # evals and samples run the uncompiled model, and training goes on with the graph it had
        assert record["graphs_in_evals"] == 0 and record["graphs_in_later_train_steps"] == 0
    if hellaswag:
        assert set(run["hellaswag_acc_norm"]) == {"0", "2", "4"}
    else:
        assert run["hellaswag"].startswith("skipped")

    has_kv_cache = "use_cache" in inspect.signature(GPT.generate).parameters
    assert ("skipped" not in records["generate_kv_cache"]) == has_kv_cache
    assert records["fsdp"]["skipped"]


def test_generation_figures_with_and_without_the_kv_cache(monkeypatch, one_thread):
    if "use_cache" not in inspect.signature(GPT.generate).parameters:
        uncached = GPT.generate

        def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
            return uncached(self, idx, max_new_tokens, temperature, top_k, generator)

        monkeypatch.setattr(GPT, "generate", generate)  # until model.py has its KV cache
    figures = bench.check_generation("cpu", bench.SMOKE_SIZES)
    assert figures["cached_tokens_per_s"] > 0 and figures["uncached_tokens_per_s"] > 0
    assert figures["same_tokens_fraction"] > 0.5 and figures["kv_cache_speedup"] > 0


def test_gpu_check_refuses_a_hellaswag_folder_without_the_data(tmp_path):
    with pytest.raises(UserError, match="no hellaswag_val.jsonl"):
        bench.hellaswag_source(str(tmp_path))


# ---- bench.py recipes ----


def test_recipe_summary_finds_the_fewest_modern_steps_that_reach_gpt2s_loss():
    def record(run, steps, seed, val_loss, seconds):
        return {"run": run, "flags": [], "steps": steps, "seed": seed, "val_loss": val_loss, "train_seconds": seconds,
                "step_ms_median": 1000 * seconds / steps}  # fmt: skip

    records = [record("gpt2", 250, 1, 5.00, 100.0), record("gpt2", 250, 2, 5.02, 110.0),
               record("rope", 250, 1, 4.95, 101.0),
               record("modern", 250, 1, 4.50, 120.0), record("modern", 100, 1, 4.98, 48.0),
               record("modern", 75, 1, 5.01, 36.0),
               record("modern", 250, 2, 4.52, 121.0), record("modern", 100, 2, 5.03, 50.0)]  # fmt: skip
    figures = bench.recipe_summary(records, 250)
    assert figures["gpt2_val_loss"] == pytest.approx(5.01) and figures["gpt2_seed_spread"] == pytest.approx(0.02)
    assert figures["rope_minus_gpt2"] == pytest.approx(-0.06) and figures["modern_minus_gpt2"] == pytest.approx(-0.50)
    # seed 1: 100 steps reach 5.00 (75 do not): 40% of the tokens in 48% of the time; seed 2: only 250 steps do
    assert figures["modern_tokens_share_seed1"] == 0.4 and figures["modern_time_share_seed1"] == pytest.approx(0.48)
    assert figures["modern_tokens_share_seed2"] == 1.0 and figures["modern_time_share_seed2"] == pytest.approx(1.1)


def test_bench_recipes_trains_each_run_once_and_keeps_its_figures(tmp_path, monkeypatch, capsys):
    from test_train import write_shards

    data_dir = write_shards(tmp_path / "data")
    tiny = "--n_layer 1 --n_head 2 --n_embd 32 --batch_size 2 --seq_len 16 --total_batch_size 64 --val_steps 2"
    argv = ["bench.py", "recipes", "--data_dir", data_dir, "--out_dir", str(tmp_path / "out"), "--runs", "gpt2",
            "modern", "--steps", "4", "--modern_steps", "2", "--flags", tiny, "--json"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    out = capsys.readouterr().out
    figures = json.loads(out[out.index("{\n") :])  # after a line per run
    results = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert [(r["run"], r["steps"]) for r in results] == [("gpt2", 4), ("modern", 4), ("modern", 2)]
    assert [list(r["val_curve"]) for r in results] == [["0", "4"], ["0", "4"], ["0", "2"]]  # val at 0 and the end
    assert figures["gpt2_val_loss"] == results[0]["val_loss"]
    assert results[0]["val_curve"]["4"] == round(results[0]["val_loss"], 4)
    assert figures["modern_minus_gpt2"] == pytest.approx(results[1]["val_loss"] - results[0]["val_loss"])
    assert not any(name.endswith(".pt") for r in results for name in os.listdir(r["log_dir"]))  # 80 MB each
    bench.main()  # again: every run is in results.jsonl already, none trains again
    assert len(open(tmp_path / "out" / "results.jsonl").read().splitlines()) == 3
    monkeypatch.setattr(sys, "argv", [*argv, "--data_dir", str(tmp_path)])  # the last --data_dir wins
    with pytest.raises(SystemExit, match="holds runs with --data_dir .*: pass another --out_dir"):
        bench.main()
