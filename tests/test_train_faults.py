"""What goes wrong around train_gpt2.py, and what it must do then: runs past their target, resumes
into a folder with later checkpoints, torn or half-rewritten logs, bad token ids, a full disk, two
runs on one folder, damaged or foreign checkpoints, bad flags, and an error on one rank of two.

Each test makes the fault happen for real where it can (a killed process, a truncated file), or
raises the error the operating system raises (OSError(ENOSPC)) where it cannot.
"""

import errno
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO
from test_train import TINY, losses, run, write_shards

import checkpoint
import export
import files
import resume
import train_gpt2
from training_log import read_log, read_metrics


@pytest.fixture
def data_dir(tmp_path):
    return write_shards(tmp_path / "data")


# ---- runs that must end ----


def test_a_run_already_past_max_steps_stops_at_once_with_a_message(data_dir, tmp_path):
    run(data_dir, tmp_path / "log", "--max_steps", "4")
    with pytest.raises(SystemExit, match=r"model_00004.pt is at step 4, past --max_steps 2: nothing to train"):
        run(data_dir, tmp_path / "log", "--max_steps", "2")
    assert sorted(losses(read_metrics(tmp_path / "log" / "metrics.jsonl"))) == [0, 1, 2, 3]  # the log untouched


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max_steps", "-1", "must be at least 1"),
        ("--total_batch_size", "0", "must be at least 1"),
        ("--batch_size", "0", "must be at least 1"),
        ("--val_steps", "0", "must be at least 1"),
        ("--ckpt_interval", "-5", "must be at least 0"),
        ("--min_lr_ratio", "2", "must be between 0 and 1"),
        ("--max_lr", "-1e-3", "must be at least 0"),
    ],
)
def test_every_numeric_flag_has_its_range_checked_when_parsed(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_gpt2.parse_config([f"{flag}={value}"])  # "=": argparse would read -1e-3 as a flag
    assert exit_info.value.code == 2  # argparse's usage error
    assert f"argument {flag}: {message}, not {value}" in capsys.readouterr().err


# ---- branches, logs ----


def test_resuming_an_older_checkpoint_moves_the_abandoned_branch_aside_and_keep_last_spares_this_run(
    data_dir, tmp_path
):
    log_dir = tmp_path / "log"
    run(data_dir, log_dir, "--max_steps", "4", "--ckpt_interval", "1")
    old = {step: load(log_dir / f"model_{step:05d}.pt") for step in (3, 4)}
    branch = run(
        data_dir,
        log_dir,
        "--max_steps",
        "4",
        "--ckpt_interval",
        "1",
        "--keep_last",
        "2",
        "--max_lr",
        "5e-3",
        "--resume",
        str(log_dir / "model_00002.pt"),
    )
    # this run's own checkpoints 3 and 4 are the newest two: nothing of it was pruned
    assert sorted(p for p in os.listdir(log_dir) if p.endswith(".pt")) == ["model_00003.pt", "model_00004.pt"]
    assert load(log_dir / "model_00004.pt")["args"]["max_lr"] == 5e-3
    moved = log_dir / "abandoned_after_00002"
    assert sorted(os.listdir(moved)) == ["model_00003.pt", "model_00004.pt"]  # kept, not deleted
    for step in (3, 4):
        assert torch.equal(
            load(moved / f"model_{step:05d}.pt")["model"]["lm_head.weight"], old[step]["model"]["lm_head.weight"]
        )
    assert sorted(losses(branch)) == [0, 1, 2, 3]  # steps 0, 1 kept from before the branch point, 2, 3 new
    assert resume.pick_checkpoint("auto", str(log_dir))[0] == str(log_dir / "model_00004.pt")


def load(path):
    return checkpoint.load_checkpoint(str(path))


def test_torn_last_lines_are_dropped_and_reported_never_glued_or_fatal(data_dir, tmp_path, capsys):
    log_dir = tmp_path / "log"
    run(data_dir, log_dir, "--max_steps", "2")
    with open(log_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "kind": "tra')  # what a kill or a full disk in the middle of a write leaves
    with open(log_dir / "log.txt", "a") as f:
        f.write("2 tra")
    metrics = run(data_dir, log_dir, "--max_steps", "4")
    assert "dropped a damaged line" in capsys.readouterr().out
    series, skipped = read_log(log_dir / "log.txt")
    assert skipped == 0 and series["train"][0] == [0, 1, 2, 3]
    assert sorted(losses(metrics)) == [0, 1, 2, 3]


def test_the_log_rewrite_at_resume_is_atomic(data_dir, tmp_path, monkeypatch):
    """A resume rewrites the logs without the steps it will redo. If that rewrite dies half way (a kill,
    a full disk), the old log must still be whole: before, the file was opened with "w" and refilled."""
    log_dir = tmp_path / "log"
    run(data_dir, log_dir, "--max_steps", "2", "--ckpt_interval", "1")
    os.remove(log_dir / "model_00002.pt")  # so that the resume at step 1 has a line to drop
    before = (log_dir / "metrics.jsonl").read_bytes()
    real_replace = os.replace

    def killed_before_rename(src, dst):
        raise KeyboardInterrupt  # killed after writing the new log, before it took the old one's name

    monkeypatch.setattr(files.os, "replace", killed_before_rename)
    with pytest.raises(SystemExit) as exit_info:  # errors.exit_on_error: the one line `interrupted`
        run(data_dir, log_dir, "--max_steps", "2")
    assert exit_info.value.code == 130
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert (log_dir / "metrics.jsonl").read_bytes() == before
    assert not [p for p in os.listdir(log_dir) if p.endswith(".tmp")]


# ---- data ----


@pytest.mark.parametrize("bad_id", [50257, 50303, 60000])  # the padded rows, and past the embedding
def test_a_token_id_outside_the_vocabulary_names_the_shard_and_the_id(tmp_path, bad_id):
    data_dir = write_shards(tmp_path / "data")
    shard = tmp_path / "data" / "edufineweb_train_000002.npy"
    tokens = np.load(shard)
    tokens[1234] = bad_id
    np.save(shard, tokens)
    message = rf"shard .*edufineweb_train_000002.npy holds token id {bad_id} at position 1,234, but the model's "
    with pytest.raises(SystemExit, match=message + r"vocabulary has 50,257 ids"):
        run(data_dir, tmp_path / "log", "--max_steps", "200", "--shuffle", "0")


def test_resume_with_another_total_batch_size_is_refused(data_dir, tmp_path):
    run(data_dir, tmp_path / "log", "--max_steps", "2")
    with pytest.raises(SystemExit, match="trained with --total_batch_size 64, this run has 128.*--total_batch_size 64"):
        run(data_dir, tmp_path / "log", "--max_steps", "4", "--total_batch_size", "128")


# ---- disks and folders ----


def test_a_full_disk_at_a_checkpoint_names_the_intact_previous_one_and_leaves_no_temp_file(
    data_dir, tmp_path, monkeypatch
):
    log_dir = tmp_path / "log"
    real_save = torch.save
    saves = []

    def disk_fills_at_the_second_save(obj, f):
        saves.append(1)
        if len(saves) == 2:
            f.write(b"a part of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", disk_fills_at_the_second_save)
    message = r"could not write .*model_00002.pt: no space left on the device.*model_00001.pt, is intact"
    with pytest.raises(SystemExit, match=message):
        run(data_dir, log_dir, "--max_steps", "3", "--ckpt_interval", "1")
    assert sorted(p for p in os.listdir(log_dir) if p.startswith("model")) == ["model_00001.pt"]
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert sorted(losses(run(data_dir, log_dir, "--max_steps", "3"))) == [0, 1, 2]  # resumes after space is freed


def test_a_full_disk_under_the_log_is_one_message(data_dir, tmp_path, monkeypatch):
    import training_log

    real_emit = training_log.LineFileHandler.emit

    def emit(self, record):
        if getattr(record, "metrics", {}).get("kind") == "train":
            self.file = FullFile()  # the disk fills up at the first training step
        real_emit(self, record)

    monkeypatch.setattr(training_log.LineFileHandler, "emit", emit)
    with pytest.raises(SystemExit, match=r"could not write .*(log.txt|metrics.jsonl): no space left on the device"):
        run(data_dir, tmp_path / "log", "--max_steps", "2")


class FullFile:
    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        pass

    def close(self):
        pass


def test_a_second_run_on_the_same_log_dir_is_refused_and_a_dead_runs_lock_is_not_stale(data_dir, tmp_path):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    held = files.lock_folder(str(log_dir))  # as a run in another process would hold it
    try:
        with pytest.raises(SystemExit, match=rf"{log_dir} is in use by process {os.getpid()}.*another --log_dir"):
            run(data_dir, log_dir, "--max_steps", "1")
    finally:
        held.close()
    assert not (log_dir / "log.txt").exists()  # the refused run touched nothing
    # a run killed with SIGKILL while holding the lock: the kernel drops it with the process
    code = f"import os, files; files.lock_folder({str(log_dir)!r}); os.kill(os.getpid(), 9)"
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO)
    assert child.returncode == -9
    assert sorted(losses(run(data_dir, log_dir, "--max_steps", "1"))) == [0]


@pytest.mark.parametrize("make_bad", ["file", "read_only"])
def test_a_log_dir_that_cannot_be_written_is_one_message(data_dir, tmp_path, monkeypatch, make_bad):
    log_dir = tmp_path / "log"
    if make_bad == "file":
        log_dir.write_text("not a folder")
        message = r"--log_dir .*log: cannot create the folder"
    else:

        def read_only(path, exist_ok=False):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr("training_log.os.makedirs", read_only)
        message = r"--log_dir .*log: cannot create the folder \(the file system is read-only\)"
    with pytest.raises(SystemExit, match=message):
        run(data_dir, log_dir, "--max_steps", "1")


def test_export_refuses_a_file_as_hf_dir_and_reports_a_read_only_disk(data_dir, tmp_path, monkeypatch):
    run(data_dir, tmp_path / "log", "--max_steps", "1")
    path = str(tmp_path / "log" / "model_00001.pt")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="--hf_dir .*a_file is a file"):
        export.main([path, "--hf_dir", str(tmp_path / "a_file")])

    def read_only(model, out_dir):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(export, "save_pretrained", read_only)
    with pytest.raises(SystemExit, match=r"could not write .*hf: the file system is read-only"):
        export.main([path, "--hf_dir", str(tmp_path / "hf")])


# ---- damaged and foreign checkpoints ----


def test_a_damaged_newest_checkpoint_gives_way_to_the_newest_readable_one(data_dir, tmp_path, capsys):
    log_dir = tmp_path / "log"
    run(data_dir, log_dir, "--max_steps", "3", "--ckpt_interval", "1")
    (log_dir / "model_00003.pt").write_bytes(b"")  # zero bytes
    with open(log_dir / "model_00002.pt", "r+b") as f:
        f.truncate(1000)  # truncated
    resumed = run(data_dir, log_dir, "--max_steps", "3")
    out = capsys.readouterr().out
    assert "model_00003.pt" in out and "model_00002.pt" in out and "resuming from an older checkpoint" in out
    assert f"resuming from {log_dir / 'model_00001.pt'} at step 1" in out
    assert sorted(losses(resumed)) == [0, 1, 2]


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: torch.save({"h.0.weight": torch.zeros(2)}, p), r"is not a training checkpoint .*no model, config"),
        (lambda p: torch.save({"model": {}, "config": {}}, p), r"is not a training checkpoint .*no step, optimizer"),
        (lambda p: p.write_text("hello, I am text"), r"not a file written by torch.save, or a damaged one"),
        (lambda p: np.save(open(p, "wb"), np.arange(3, dtype=object)), r"cannot read checkpoint"),
    ],
)
def test_a_foreign_file_as_resume_is_one_message_and_never_suggests_weights_only_false(
    data_dir, tmp_path, write, message, capsys
):
    path = tmp_path / "foreign.pt"
    write(path)
    with pytest.raises(SystemExit, match=message) as exit_info:
        run(data_dir, tmp_path / "log", "--max_steps", "1", "--resume", str(path))
    assert "weights_only=False" not in str(exit_info.value)
    assert len(str(exit_info.value).splitlines()) == 1


def test_hellaswag_on_a_foreign_checkpoint_is_one_message(tmp_path, hellaswag_dir):
    import hellaswag

    torch.save({"transformer.wte.weight": torch.zeros(2)}, tmp_path / "state_dict.pt")
    with pytest.raises(SystemExit, match=r"state_dict.pt is not a checkpoint of this repo.*no model, config"):
        hellaswag.main(
            [
                "--checkpoint",
                str(tmp_path / "state_dict.pt"),
                "--device",
                "cpu",
                "--limit",
                "1",
                "--data_file",
                str(hellaswag_dir),
            ]
        )


# ---- distributed: an error on one rank ----


def test_an_error_on_one_rank_ends_the_whole_job_promptly(tmp_path):
    """Two gloo processes; the shard that only rank 1 reads at step 1 holds a bad token id. Rank 1
    stops with the message while rank 0 waits in the gradient all-reduce of that step: the job must
    end within seconds, not after the 30-minute collective timeout."""
    data_dir = tmp_path / "data"
    write_shards(data_dir, tokens_per_shard=4096, train_shards=0)  # the val shard
    rng = np.random.default_rng(0)
    np.save(data_dir / "edufineweb_train_000001.npy", rng.integers(0, 50257, 3 * 32 + 1, dtype=np.uint16))  # 3 windows
    bad = rng.integers(0, 50257, 4096, dtype=np.uint16)
    bad[7] = 50300
    np.save(data_dir / "edufineweb_train_000002.npy", bad)
    # step 0: windows 0, 1 (shard 1) on ranks 0, 1; step 1: window 2 (shard 1) on rank 0, window 3 (shard 2) on rank 1
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    flags = [
        "--data_dir",
        str(data_dir),
        "--log_dir",
        str(tmp_path / "log"),
        *TINY,
        "--max_steps",
        "4",
        "--shuffle",
        "0",
        "--eval_interval",
        "0",
    ]
    start = time.monotonic()
    result = subprocess.run(
        [*torchrun, str(REPO / "train_gpt2.py"), *flags], capture_output=True, text=True, timeout=240
    )
    seconds = time.monotonic() - start
    assert result.returncode != 0
    assert "edufineweb_train_000002.npy holds token id 50300" in result.stdout + result.stderr
    assert seconds < 60, f"the job took {seconds:.0f} s to end"
