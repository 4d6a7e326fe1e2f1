"""Tests for errors.py: how every script's main() ends on a UserError and on Ctrl-C (exit_on_error)."""

import ast
import logging
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_train import data_dir, run  # noqa: F401 (fixture)

import training_log
from checkpoint import model_checkpoint, save_checkpoint
from errors import UserError, exit_on_error
from model import GPT, GPTConfig
from training_log import LOGGER_NAME


def test_a_user_error_is_one_line_and_exit_code_1():
    @exit_on_error
    def main():
        raise UserError("no train shards in data: run `python fineweb.py` first")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == "error: no train shards in data: run `python fineweb.py` first"  # exit code 1


def test_ctrl_c_is_the_one_line_interrupted_and_exit_code_130(capsys):
    @exit_on_error
    def main():
        print("half a sample", end="")
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 130  # 128 + SIGINT, what a shell reports for a program Ctrl-C ended
    assert capsys.readouterr() == ("half a sample", "interrupted\n")


def test_every_script_s_main_runs_under_exit_on_error():
    scripts = {}
    for path in sorted(REPO.glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                scripts[path.name] = [ast.unparse(decorator) for decorator in node.decorator_list]
    assert {"train_gpt2.py", "hellaswag.py", "evals.py", "sample.py", "chat.py", "export.py"} <= set(scripts)
    assert {name: decorators for name, decorators in scripts.items() if decorators != ["exit_on_error"]} == {}


def test_sigint_ends_a_real_sample_py_with_one_line(tmp_path):
    """sample.py streaming a long greedy sample (greedy: the same tokens every run, so it cannot end
    early at <|endoftext|>), SIGINT once its text has started: one line on stderr, exit code 130."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "tiny.pt", model_checkpoint(GPT(GPTConfig.from_name("tiny", block_size=64))))
    command = [sys.executable, str(REPO / "sample.py"), "--checkpoint", str(tmp_path / "tiny.pt"), "--device", "cpu"]
    process = subprocess.Popen(
        [*command, "--temperature", "0", "--max_new_tokens", "1000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not inherited as ignored
    )
    try:
        assert process.stdout.readline() == "--- sample 1/1\n"
        process.stdout.read(200)  # generating now
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert (process.returncode, stderr) == (130, "interrupted\n")


def test_a_reader_that_stops_reading_ends_a_script_quietly():
    """`python train_gpt2.py --plan ... | head -1`: the pipe closes before the plan is printed."""
    command = [sys.executable, str(REPO / "train_gpt2.py"), "--plan", "--model", "gpt2", "--gpu_memory", "16"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # long before the plan is printed: Python and torch take a second to start
    _, stderr = process.communicate(timeout=120)
    assert (process.returncode, stderr) == (141, "")


def test_train_gpt2_first_ctrl_c_saves_and_stops_the_second_stops_at_once(data_dir, tmp_path, capsys):  # noqa: F811
    """train_gpt2.py's own SIGINT handler (StopOnSignal) comes first: one Ctrl-C stops after the step
    with a checkpoint; a second one raises KeyboardInterrupt, which exit_on_error ends in one line."""

    class CtrlCAtStep1(logging.Handler):
        def __init__(self, presses):
            super().__init__()
            self.presses = presses

        def emit(self, record):
            if getattr(record, "metrics", {}).get("kind") == "train" and record.metrics["step"] == 1:
                for _ in range(self.presses):
                    signal.raise_signal(signal.SIGINT)

    original_setup = training_log.setup_logging
    logger = logging.getLogger(LOGGER_NAME)
    for presses in (1, 2):
        trigger = CtrlCAtStep1(presses)

        def setup_logging_with_trigger(*args, trigger=trigger):
            log = original_setup(*args)
            log.addHandler(trigger)
            return log

        flags = [str(tmp_path / f"log{presses}"), "--max_steps", "6", "--ckpt_interval", "100"]
        training_log.setup_logging = setup_logging_with_trigger
        try:
            if presses == 1:
                run(data_dir, *flags)  # returns: exit code 0
                assert "stopped by a signal after step 2, saved in " in capsys.readouterr().out
            else:
                with pytest.raises(SystemExit) as exit_info:
                    run(data_dir, *flags)
                assert exit_info.value.code == 130 and capsys.readouterr().err.splitlines()[-1:] == ["interrupted"]
        finally:
            training_log.setup_logging = original_setup
            logger.removeHandler(trigger)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # StopOnSignal's handler is gone
