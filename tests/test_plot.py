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


def test_read_log_returns_each_series_by_name_and_counts_lines_it_skips(tmp_path):
    (tmp_path / "log.txt").write_text(LOG + "a line that is not a record\n250 val x\n251 tra")
    series, skipped = read_log(tmp_path / "log.txt")
    assert skipped == 3
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


def test_a_log_with_damaged_lines_still_plots_and_says_how_many_it_skipped(tmp_path, capsys):
    (tmp_path / "log.txt").write_text(LOG + "not a record\n12 train")  # a torn last line
    plot.main([str(tmp_path)])
    assert "skipped 2 line(s)" in capsys.readouterr().out
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_out_into_a_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "log.txt").write_text(LOG)
    with pytest.raises(SystemExit, match=r"--out .*nope/plot.png: the folder .*nope does not exist"):
        plot.main([str(tmp_path), "--out", str(tmp_path / "nope" / "plot.png")])


def test_a_folder_without_log_txt_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"no .*log.txt: train first"):
        plot.main([str(tmp_path)])
    (tmp_path / "log.txt").write_text("")
    with pytest.raises(SystemExit, match="holds no `step kind value` lines yet"):
        plot.main([str(tmp_path)])
