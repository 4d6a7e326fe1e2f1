"""Tests for documents.py: every local format read as stored, reading after `skip` rows (resume),
the hub's path (a local dataset folder stands in for the hub), and one clear error per bad input.

Offline: ../shared/data/fineweb_sample (one test) and tiny temp files.
"""

import argparse
import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from documents import local_rows, parse_count, read_rows, resolve_data_files
from errors import UserError

SMALL_TEXTS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7) for i in range(60)]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    return path


@pytest.fixture(params=["jsonl", "parquet", "txt"])
def small_docs(request, tmp_path):
    """SMALL_TEXTS as one .jsonl, as a parquet file of 7-row row groups, or as a folder of .txt files."""
    if request.param == "jsonl":
        return write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in SMALL_TEXTS])
    if request.param == "parquet":
        pq.write_table(pa.table({"text": SMALL_TEXTS}), tmp_path / "docs.parquet", row_group_size=7)
        return tmp_path / "docs.parquet"
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(SMALL_TEXTS):
        (tmp_path / "docs" / f"{i:03d}.txt").write_text(text)
    return tmp_path / "docs"


# ---- input formats -------------------------------------------------------------------------------
def test_json_array_gzip_and_a_folder_of_mixed_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.json").write_text(json.dumps([{"text": "first"}, {"text": "second"}]))
    with gzip.open(data / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth"}) + "\n")
    pq.write_table(pa.table({"text": ["fifth", None, "sixth"]}), data / "c.parquet")
    (data / "README.md").write_text("not data: ignored in a folder")
    assert list(read_rows([str(data)])) == ["first", "second", "third", "fourth", "fifth", None, "sixth"]


def test_text_is_read_as_stored_crlf_kept_byte_order_mark_dropped(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"line one\r\nline two\r\n")
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "after a BOM"}\r\n')
    assert list(read_rows([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])) == [
        "line one\r\nline two\r\n",
        "after a BOM",
    ]


def test_reading_after_skip_rows_gives_the_rest_in_every_format(small_docs):
    """fineweb.py resumes by skipping rows: parquet skips whole 7-row groups, then rows inside one."""
    files = resolve_data_files([str(small_docs)])
    for skip in (0, 1, 6, 7, 8, 59, 60, 61):
        assert list(local_rows(files, "text", skip)) == SMALL_TEXTS[skip:], skip


def test_counts_accept_scientific_notation():
    assert parse_count("3e6") == parse_count("3_000_000") == 3_000_000
    for bad in ("1.5", "0", "-1e6", "ten", "inf"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a positive whole number"):
            parse_count(bad)


# ---- the Hugging Face `datasets` path (a local dataset folder stands in for the hub) --------------
def test_dataset_without_the_text_field_names_its_columns(fineweb_sample_dir):
    pytest.importorskip("datasets")
    with pytest.raises(UserError, match=r"has no column 'body' \(columns: text, id, url\): pass --text_field"):
        list(read_rows(dataset=str(fineweb_sample_dir), split="train", streaming=True, text_field="body"))


def test_unreachable_hub_says_how_to_work_offline():
    pytest.importorskip("datasets")  # conftest sets HF_HUB_OFFLINE=1: the hub is unreachable, without retries
    with pytest.raises(UserError, match="could not reach the Hugging Face hub.*--data_files.*HF_ENDPOINT"):
        list(read_rows(dataset="HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train"))


def test_dataset_text_of_another_type_names_the_row(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "in" / "a.parquet")
    with pytest.raises(UserError, match=f"{tmp_path / 'in'} row 0: field 'text' holds int 1, not text"):
        list(read_rows(dataset=str(tmp_path / "in"), split="train", streaming=True))


# ---- bad input: one clear error each -------------------------------------------------------------
@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda d: d / "missing.parquet", "missing.parquet: no such file or folder"),
        (lambda d: d / "*.parquet", r"\*.parquet: no files matched"),
        (lambda d: d, "no files matched"),  # a folder without data files
        (
            lambda d: pq.write_table(pa.table({"body": ["x"]}), d / "a.parquet") or d / "a.parquet",
            r"no column 'text' \(columns: body\)",
        ),
        (
            lambda d: write_jsonl(d / "a.jsonl", [{"text": "x"}, {"body": "y"}]),
            r"a.jsonl:2: no field 'text' \(fields: body\)",
        ),
        (
            lambda d: (d / "a.jsonl").write_text('{"text": "x"}\n{oops\n') and d / "a.jsonl",
            "a.jsonl:2: not valid JSON",
        ),
        (
            lambda d: (d / "a.json").write_text('[{"text": "x"}, oops]') and d / "a.json",
            "a.json: not valid JSON",
        ),
        (
            lambda d: (d / "a.parquet").write_bytes(b"not parquet at all") and d / "a.parquet",
            "a.parquet: not a readable parquet file",
        ),
        (lambda d: write_jsonl(d / "a.jsonl", [{"text": 5}]), r"a.jsonl:1: field 'text' holds int 5, not text"),
        (lambda d: (d / "a.txt").write_bytes(b"\xff\xfe bad") and d / "a.txt", "a.txt: not UTF-8 text"),
    ],
)
def test_bad_input_gets_one_clear_error(make_input, message, tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(UserError, match=message):
        list(read_rows([str(make_input(tmp_path / "in"))]))


def gzip_damaged(kind, data):
    """data gzipped, then damaged: cut short, its CRC wrong, or no gzip at all."""
    packed = gzip.compress(data)
    if kind == "truncated":
        return packed[: len(packed) // 2]
    if kind == "bad crc":  # the last 8 bytes are the CRC-32 and length of the data
        return packed[:-8] + bytes(b ^ 0xFF for b in packed[-8:-4]) + packed[-4:]
    return os.urandom(len(packed))  # random bytes named .gz


@pytest.mark.parametrize("kind", ["truncated", "bad crc", "not gzip"])
@pytest.mark.parametrize("name", ["a.jsonl.gz", "a.txt.gz", "a.json.gz"])
def test_damaged_gzip_names_the_file_before_handing_out_a_row(kind, name, tmp_path):
    """gzip notices damage only at the end of a file: by then a reader would have handed out most of
    it (and fineweb.py written it into shards). The readers check a .gz file whole before its first row."""
    records = [{"text": text} for text in SMALL_TEXTS]
    data = {".jsonl.gz": "".join(json.dumps(r) + "\n" for r in records), ".json.gz": json.dumps(records)}
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / name).write_bytes(gzip_damaged(kind, data.get(name[1:], " ".join(SMALL_TEXTS)).encode()))
    write_jsonl(tmp_path / "in" / "b.jsonl", records)  # a sound file after it
    rows = read_rows([str(tmp_path / "in")])
    with pytest.raises(UserError, match=f"{name}: damaged gzip file .*gzip -t"):
        next(rows)  # the very first row: not one row of the damaged file comes out


@pytest.mark.parametrize(
    "make_second_file, message",
    [
        (
            lambda d: write_jsonl(d / "b.jsonl", [{"text": "x"}, {"text": 5}]),
            r"b.jsonl:2: field 'text' holds int 5, not text",
        ),
        (
            lambda d: pq.write_table(pa.table({"text": [None, 1]}), d / "b.parquet"),
            r"b.parquet row 1: field 'text' holds int 1, not text",
        ),
        (
            lambda d: pq.write_table(pa.table({"text": ["x", "y", None, "z"], "n": [1, 2, 3, 4]}), d / "b.parquet"),
            None,  # strings and nulls are fine
        ),
    ],
)
def test_text_of_another_type_names_the_file_and_row(make_second_file, message, tmp_path):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in SMALL_TEXTS[:5]])  # rows 0 .. 4 of the input
    make_second_file(tmp_path / "in")
    if message is None:
        assert list(read_rows([str(tmp_path / "in")])) == SMALL_TEXTS[:5] + ["x", "y", None, "z"]
        return
    with pytest.raises(UserError, match=f"{message}: pass --text_field"):
        list(read_rows([str(tmp_path / "in")]))
