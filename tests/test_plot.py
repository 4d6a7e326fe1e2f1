"""Tests for plot.py and the log.txt reader it shares with training_log.py."""

import pytest

import plot
from training_log import read_log

LOG = """0 val 10.9512
0 hella 0.2500
0 train 10.987654
1 train 10.512345
250 val 6.1234
250 hella 0.2641
250 lambada 0.0312
"""


def test_read_log_returns_each_series_by_name(tmp_path):
    (tmp_path / "log.txt").write_text(LOG + "a line that is not a record\n")
    series = read_log(tmp_path / "log.txt")
    assert series == {
        "val": ([0, 250], [10.9512, 6.1234]),
        "hella": ([0, 250], [0.25, 0.2641]),
        "train": ([0, 1], [10.987654, 10.512345]),
        "lambada": ([250], [0.0312]),
    }


def test_plot_writes_a_png_beside_the_log(tmp_path):
    (tmp_path / "log.txt").write_text(LOG)
    plot.main([str(tmp_path)])
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot.main([str(tmp_path), "--out", str(tmp_path / "other.png")])
    assert (tmp_path / "other.png").stat().st_size > 10_000


def test_reference_numbers_are_gpt2_and_gpt3_small():
    assert (plot.GPT2_124M_HELLASWAG, plot.GPT3_125M_HELLASWAG, plot.GPT2_124M_VAL_LOSS) == (0.2955, 0.337, 3.2924)


def test_a_folder_without_log_txt_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"no .*log.txt: train first"):
        plot.main([str(tmp_path)])
    (tmp_path / "log.txt").write_text("")
    with pytest.raises(SystemExit, match="holds no `step kind value` lines yet"):
        plot.main([str(tmp_path)])
