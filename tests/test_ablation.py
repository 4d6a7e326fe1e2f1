"""Tests for ablation.py: the summary's arithmetic, and real (tiny) train_gpt2.py runs that are
trained once and kept in results.jsonl."""

import json
import math
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


def test_steps_to_reach_reads_the_line_between_two_evaluations():
    curve = {0: 10.0, 25: 8.0, 50: 6.0, 75: 5.0}
    assert ablation.steps_to_reach(curve, 7.0) == 37.5  # halfway from 8 (step 25) to 6 (step 50)
    assert ablation.steps_to_reach(curve, 5.0) == 75
    assert ablation.steps_to_reach(curve, 10.0) == 0
    assert ablation.steps_to_reach(curve, 4.9) is None


def test_optimizer_summary_takes_each_best_lr_and_the_tokens_to_adamws_final_loss():
    def record(run, lr, seed, curve):
        val_loss = curve[max(curve, key=int)]
        return {"run": run, "flags": [], "lr": lr, "seed": seed, "val_loss": val_loss, "val_curve": curve}

    records = [
        record("adamw", 1e-3, 1, {"0": 11.0, "50": 8.0, "100": 7.0}),
        record("adamw", 2e-3, 1, {"0": 11.0, "50": 7.8, "100": 6.9}),
        record("adamw", 2e-3, 2, {0: 11.0, 50: 7.6, 100: 7.1}),  # just run: int steps, not JSON's strings
        record("sgd", 1.0, 1, {"0": 11.0, "50": 9.0, "100": 8.0}),
        {"run": "sgd", "flags": [], "lr": 3.0, "seed": 1, "val_loss": None},  # diverged
        record("sgd", 1.0, 2, {"0": 11.0, "50": 9.2, "100": 8.2}),
        record("muon", 0.04, 1, {"0": 11.0, "50": 7.0, "100": 6.0}),
        record("muon", 0.04, 2, {"0": 11.0, "50": 7.0, "100": 6.2}),
    ]
    best = {
        name: ablation.best_run([r for r in records if r["run"] == name and r["seed"] == 1])
        for name in "adamw sgd muon".split()
    }
    figures = ablation.optimizer_summary(
        records, best, {"adamw": (1e-3, 2e-3, 4e-3), "sgd": (1.0, 3.0), "muon": (0.04,)}
    )
    assert best["sgd"]["lr"] == 1.0 and figures["sgd_lr3_val_loss"] is None and figures["sgd_best_lr_at_edge"]
    assert figures["adamw_best_lr"] == 2e-3 and not figures["adamw_best_lr_at_edge"]
    assert figures["adamw_val_loss"] == pytest.approx(7.0) and figures["adamw_seed_spread"] == pytest.approx(0.2)
    assert figures["adamw_tokens_to_adamw_loss"] == 100 * 2048
    # muon's mean curve (11, 7, 6.1) crosses 7.0 at step 50 exactly; sgd's (11, 9.1, 8.1) never does
    assert figures["muon_tokens_to_adamw_loss"] == 50 * 2048  # ABLATION_MODEL's
    assert figures["sgd_tokens_to_adamw_loss"] is None


def test_optimizer_comparison_sweeps_records_divergence_and_reruns_the_best_with_the_other_seeds(tmp_path, capsys):
    from test_train import write_shards

    data_dir = write_shards(tmp_path / "data")
    tiny = "--n_layer 1 --n_head 2 --n_embd 32 --batch_size 2 --seq_len 16 --total_batch_size 64 --val_steps 2"
    argv = ["--compare", "optimizers", "--data_dir", data_dir, "--out_dir", str(tmp_path / "out"), "--steps", "3"]
    argv += ["--runs", "sgd", "adamw", "muon", "--seeds", "1", "2", "--flags", tiny, "--json", "--extend", "0"]
    argv += ["--lrs", "sgd=1e30", "adamw=1e-3,1e-2", "muon=0.02", "--plot", str(tmp_path / "curves.png")]
    ablation.main(argv)
    out = capsys.readouterr().out
    figures = json.loads(out[out.index("{\n") :])
    results = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert "sgd_val_loss" not in figures and figures["sgd_lr1e+30_val_loss"] is None  # diverged: no second seed
    assert sorted((r["run"], r["lr"], r["seed"]) for r in results) == sorted(
        [("sgd", 1e30, 1), ("adamw", 1e-3, 1), ("adamw", 1e-2, 1), ("muon", 0.02, 1)]
        + [("adamw", figures["adamw_best_lr"], 2), ("muon", 0.02, 2)]
    )
    muon = next(r for r in results if r["run"] == "muon")
    assert muon["flags"][:6] == ["--optimizer", "muon", "--muon_lr", "0.02", "--max_lr", str(figures["adamw_best_lr"])]
    best_adamw = [r["val_loss"] for r in results if r["run"] == "adamw" and r["lr"] == figures["adamw_best_lr"]]
    assert figures["adamw_val_loss"] == pytest.approx(sum(best_adamw) / 2, abs=1e-4)  # the curves keep 4 decimals
    assert ablation.tokens_per_step(muon) == 64  # the tiny runs' --total_batch_size (--flags), not the benchmark's
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="--lrs nope=...: not an optimizer run"):
        ablation.main([*argv, "--lrs", "nope=1"])


def test_a_best_lr_at_the_edge_of_its_grid_widens_the_grid_there(monkeypatch):
    import argparse

    def run_all(keys, args):  # a loss whose best LR is 0.1: the grid (0.001, 0.01) must grow up to it
        return [{**key, "val_loss": abs(math.log10(key["lr"]) + 1)} for key in keys]

    monkeypatch.setattr(ablation, "run_all", run_all)
    grids = {"sgd": [0.001, 0.01], "adamw": [1e-3, 1e-2, 1e-1]}
    make = lambda name, lr, seed: {"run": name, "lr": lr, "seed": seed}  # noqa: E731
    best, records = ablation.sweep({"sgd": make}, grids, argparse.Namespace(seeds=[1], extend=3))
    assert best["sgd"]["lr"] == 0.1 and grids["sgd"] == [0.001, 0.01, 0.1, 1.0]  # 1.0 showed 0.1 is best
    assert grids["adamw"] == [1e-3, 1e-2, 1e-1]  # not swept: left alone
    grids = {"sgd": [0.001, 0.01]}
    assert ablation.sweep({"sgd": make}, grids, argparse.Namespace(seeds=[1], extend=1))[0]["sgd"]["lr"] == 0.1
    assert grids["sgd"] == [0.001, 0.01, 0.1]  # one more at most
