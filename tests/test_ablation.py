"""Tests for ablation.py: the summary's arithmetic, and real (tiny) train_gpt2.py runs that are
trained once and kept in results.jsonl."""

import json
import os

import pytest

import ablation


def test_recipe_summary_finds_the_fewest_modern_steps_that_reach_gpt2s_loss():
    def record(run, steps, seed, val_loss, seconds):
        return {
            "run": run,
            "flags": [],
            "steps": steps,
            "seed": seed,
            "val_loss": val_loss,
            "train_seconds": seconds,
            "step_ms_median": 1000 * seconds / steps,
        }

    records = [
        record("gpt2", 250, 1, 5.00, 100.0),
        record("gpt2", 250, 2, 5.02, 110.0),
        record("rope", 250, 1, 4.95, 101.0),
        record("modern", 250, 1, 4.50, 120.0),
        record("modern", 100, 1, 4.98, 48.0),
        record("modern", 75, 1, 5.01, 36.0),
        record("modern", 250, 2, 4.52, 121.0),
        record("modern", 100, 2, 5.03, 50.0),
    ]
    figures = ablation.recipe_summary(records, 250)
    assert figures["gpt2_val_loss"] == pytest.approx(5.01) and figures["gpt2_seed_spread"] == pytest.approx(0.02)
    assert figures["rope_minus_gpt2"] == pytest.approx(-0.06) and figures["modern_minus_gpt2"] == pytest.approx(-0.50)
    # seed 1: 100 steps reach 5.00 (75 do not): 40% of the tokens in 48% of the time; seed 2: only 250 steps do
    assert figures["modern_tokens_share_seed1"] == 0.4 and figures["modern_time_share_seed1"] == pytest.approx(0.48)
    assert figures["modern_tokens_share_seed2"] == 1.0 and figures["modern_time_share_seed2"] == pytest.approx(1.1)


def test_ablation_trains_each_run_once_and_keeps_its_figures(tmp_path, capsys):
    from test_train import write_shards

    data_dir = write_shards(tmp_path / "data")
    tiny = "--n_layer 1 --n_head 2 --n_embd 32 --batch_size 2 --seq_len 16 --total_batch_size 64 --val_steps 2"
    argv = [
        "--data_dir",
        data_dir,
        "--out_dir",
        str(tmp_path / "out"),
        "--runs",
        "gpt2",
        "modern",
        "--steps",
        "4",
        "--modern_steps",
        "2",
        "--flags",
        tiny,
        "--json",
    ]
    ablation.main(argv)
    out = capsys.readouterr().out
    figures = json.loads(out[out.index("{\n") :])  # after a line per run
    results = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert [(r["run"], r["steps"]) for r in results] == [("gpt2", 4), ("modern", 4), ("modern", 2)]
    assert [list(r["val_curve"]) for r in results] == [["0", "4"], ["0", "4"], ["0", "2"]]  # val at 0 and the end
    assert figures["gpt2_val_loss"] == results[0]["val_loss"]
    assert results[0]["val_curve"]["4"] == round(results[0]["val_loss"], 4)
    assert figures["modern_minus_gpt2"] == pytest.approx(results[1]["val_loss"] - results[0]["val_loss"])
    assert not any(name.endswith(".pt") for r in results for name in os.listdir(r["log_dir"]))  # 80 MB each
    ablation.main(argv)  # again: every run is in results.jsonl already, none trains again
    assert len(open(tmp_path / "out" / "results.jsonl").read().splitlines()) == 3
    with pytest.raises(SystemExit, match="holds runs with --data_dir .*: pass another --out_dir"):
        ablation.main([*argv, "--data_dir", str(tmp_path)])  # the last --data_dir wins
