"""Tests for fineweb.py: exact tokens, shard layout, determinism, resume, input formats through the
pipeline, errors. How each format is read, and its errors, are tests/test_documents.py's.

Offline: ../shared/data/fineweb_sample (2,800 documents), tinyshakespeare, and tiny temp files.
"""

import errno
import glob
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import data_path

import fineweb
from errors import UserError
from tokenizer import get_tokenizer

EOT = 50256
SAMPLE_TOKENS = 4_364_780  # ../shared/data/README.md: 2,800 documents, one <|endoftext|> before each


def run(out_dir, *flags):
    fineweb.main(["--data_dir", str(out_dir), *map(str, flags)])
    return out_dir


def shard_files(out_dir):
    """Shards in the order the data loader reads them: val, then train, each sorted by name."""
    return [path for split in ("val", "train") for path in sorted(glob.glob(f"{out_dir}/*_{split}_*.npy"))]


def all_tokens(out_dir):
    return np.concatenate([np.load(path) for path in shard_files(out_dir)])


def meta_of(out_dir):
    with open(os.path.join(out_dir, "meta.json")) as f:
        return json.load(f)


def expected_tokens(enc, texts):
    """The oracle: [EOT] + encode_ordinary(text) for each non-empty text, in order."""
    return np.array([t for text in texts if text for t in [EOT] + enc.encode_ordinary(text)], dtype=np.uint16)


def shards_listed(out_dir):
    return len(meta_of(out_dir)["shards"]) if os.path.exists(os.path.join(out_dir, "meta.json")) else 0


def same_bytes(dir_a, dir_b):
    names_a = [os.path.basename(p) for p in shard_files(dir_a)]
    assert names_a == [os.path.basename(p) for p in shard_files(dir_b)]
    for name in names_a:
        with open(os.path.join(dir_a, name), "rb") as a, open(os.path.join(dir_b, name), "rb") as b:
            assert a.read() == b.read(), name
    return True


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    return path


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """The whole sample in 1M-token shards, with two threads: the uninterrupted reference run."""
    fineweb_sample_dir = data_path("FINEWEB_DATA_FILES", "fineweb_sample")
    out_dir = tmp_path_factory.mktemp("sample") / "shards"
    return run(out_dir, "--data_files", fineweb_sample_dir, "--shard_size", "1e6", "--num_proc", 2)


SMALL_TEXTS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7) for i in range(60)]


@pytest.fixture
def small_jsonl(tmp_path):
    return write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in SMALL_TEXTS])


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


# ---- the sample: exact counts, layout, determinism ---------------------------------------------
def test_sample_shards_hold_exactly_eot_plus_encoding_of_every_document(sample_run, fineweb_sample_dir, gpt2_tokenizer):
    texts = [
        t for p in sorted(fineweb_sample_dir.glob("*.parquet")) for t in pq.read_table(p).column("text").to_pylist()
    ]
    tokens = all_tokens(sample_run)
    assert len(texts) == 2800 and len(tokens) == SAMPLE_TOKENS
    np.testing.assert_array_equal(tokens, expected_tokens(gpt2_tokenizer, texts))


def test_sample_shard_names_sizes_and_meta(sample_run):
    names = [os.path.basename(p) for p in shard_files(sample_run)]
    assert names == ["edufineweb_val_000000.npy"] + [f"edufineweb_train_{i:06d}.npy" for i in range(1, 5)]
    shards = [np.load(p) for p in shard_files(sample_run)]
    assert [len(s) for s in shards] == [1_000_000] * 4 + [364_780]  # the last shard is partial
    assert all(s.dtype == np.uint16 and s.ndim == 1 for s in shards)
    meta = meta_of(sample_run)
    assert meta["complete"] and meta["settings"]["dtype"] == "uint16"
    assert meta["settings"]["tokenizer"] == {"name": "gpt2", "hash": "928cd4e3a26fd5c9"}
    assert meta["settings"]["shard_size"] == 1_000_000
    assert [s["tokens"] for s in meta["shards"]] == [len(s) for s in shards]
    # a shard's document count is the documents that start in it: its <|endoftext|> tokens
    assert [s["docs"] for s in meta["shards"]] == [int((s == EOT).sum()) for s in shards]
    assert sum(s["docs"] for s in meta["shards"]) == 2800


def test_one_and_two_threads_write_identical_bytes(sample_run, fineweb_sample_dir, tmp_path):
    one_thread = run(tmp_path / "one", "--data_files", fineweb_sample_dir, "--shard_size", "1e6", "--num_proc", 1)
    assert same_bytes(one_thread, sample_run)


def test_rerunning_a_complete_run_does_nothing(sample_run, fineweb_sample_dir, capsys):
    before = os.path.getmtime(shard_files(sample_run)[0])
    run(sample_run, "--data_files", fineweb_sample_dir, "--shard_size", "1e6")
    assert "complete already" in capsys.readouterr().out
    assert os.path.getmtime(shard_files(sample_run)[0]) == before


# ---- resume --------------------------------------------------------------------------------------
def crash_on_shard(monkeypatch, index):
    """Make the save of shard `index` die like a kill: its file written, a stray temp file, no meta."""
    real_save = fineweb.save_shard

    def save_shard(out_dir, entry, tokens, meta):
        if len(meta["shards"]) - 1 == index:
            fineweb.atomic_write(os.path.join(out_dir, entry["file"]), lambda f: np.save(f, tokens))
            with open(os.path.join(out_dir, "meta.json.tmp"), "wb") as f:
                f.write(b'{"settings": ')  # half-written
            raise KeyboardInterrupt
        real_save(out_dir, entry, tokens, meta)

    monkeypatch.setattr(fineweb, "save_shard", save_shard)


def test_resume_after_kill_writes_the_same_bytes(sample_run, fineweb_sample_dir, tmp_path, monkeypatch):
    flags = ("--data_files", fineweb_sample_dir, "--shard_size", "1e6")
    crash_on_shard(monkeypatch, 2)
    with pytest.raises(SystemExit, match="interrupted: re-run the same command to resume"):
        run(tmp_path / "out", *flags)
    meta = meta_of(tmp_path / "out")
    assert not meta["complete"] and [s["file"] for s in meta["shards"]] == [
        "edufineweb_val_000000.npy",
        "edufineweb_train_000001.npy",
    ]
    assert meta["shards"][-1]["next_offset"] > 0  # shard 2 starts inside a document
    monkeypatch.undo()
    run(tmp_path / "out", *flags)
    assert same_bytes(tmp_path / "out", sample_run)
    assert meta_of(tmp_path / "out")["shards"] == meta_of(sample_run)["shards"]
    assert not glob.glob(f"{tmp_path}/out/*.tmp")


def test_resume_after_a_real_kill_9(sample_run, fineweb_sample_dir, tmp_path):
    out_dir = tmp_path / "out"
    command = [sys.executable, fineweb.__file__, "--data_files", str(fineweb_sample_dir), "--data_dir", str(out_dir)]
    command += ["--shard_size", "1e5"]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while child.poll() is None and shards_listed(out_dir) < 3:
        time.sleep(0.002)
    child.kill()  # SIGKILL: no clean-up of any kind
    child.wait()
    if meta_of(out_dir)["complete"]:
        pytest.skip("fineweb.py finished before it could be killed")
    run(out_dir, "--data_files", fineweb_sample_dir, "--shard_size", "1e5")
    assert [len(np.load(p)) for p in shard_files(out_dir)] == [100_000] * 43 + [64_780]
    np.testing.assert_array_equal(all_tokens(out_dir), all_tokens(sample_run))


def test_resume_redoes_a_damaged_shard(sample_run, fineweb_sample_dir, tmp_path):
    out_dir = tmp_path / "out"
    run(out_dir, "--data_files", fineweb_sample_dir, "--shard_size", "1e6")
    meta = meta_of(out_dir)
    meta["complete"] = False
    with open(out_dir / "meta.json", "w") as f:
        json.dump(meta, f)
    with open(out_dir / "edufineweb_train_000003.npy", "r+b") as f:
        f.truncate(1000)
    run(out_dir, "--data_files", fineweb_sample_dir, "--shard_size", "1e6")
    assert same_bytes(out_dir, sample_run)


def test_other_settings_are_refused_unless_overwrite(small_jsonl, tmp_path):
    out_dir = tmp_path / "out"
    run(out_dir, "--data_files", small_jsonl, "--shard_size", 100)
    with pytest.raises(SystemExit, match="other settings .*shard_size: 100 there, 200 now.*--overwrite"):
        run(out_dir, "--data_files", small_jsonl, "--shard_size", 200)
    run(out_dir, "--data_files", small_jsonl, "--shard_size", 200, "--overwrite")
    assert meta_of(out_dir)["settings"]["shard_size"] == 200
    assert all(len(np.load(p)) == 200 for p in shard_files(out_dir)[:-1])


def test_a_folder_with_foreign_shards_is_refused(small_jsonl, tmp_path):
    (tmp_path / "out").mkdir()
    np.save(tmp_path / "out" / "other_train_000001.npy", np.zeros(10, dtype=np.uint16))
    with pytest.raises(SystemExit, match="holds shards but no meta.json.*--overwrite"):
        run(tmp_path / "out", "--data_files", small_jsonl)


# ---- the Hugging Face `datasets` path (a local dataset folder stands in for the hub) --------------
def test_streaming_from_a_dataset_writes_the_same_bytes_and_resumes(
    sample_run, fineweb_sample_dir, tmp_path, monkeypatch
):
    pytest.importorskip("datasets")
    flags = ("--dataset", fineweb_sample_dir, "--streaming", "--shard_size", "1e6")
    crash_on_shard(monkeypatch, 3)
    with pytest.raises(SystemExit, match="interrupted"):
        run(tmp_path / "out", *flags)
    state = meta_of(tmp_path / "out")["shards"][-1]["stream_state"]
    assert state is not None  # resuming jumps to the stream's state instead of re-reading every row
    monkeypatch.undo()
    run(tmp_path / "out", *flags)
    assert same_bytes(tmp_path / "out", sample_run)


def test_downloaded_dataset_writes_the_same_tokens(sample_run, fineweb_sample_dir, tmp_path):
    pytest.importorskip("datasets")
    out_dir = run(
        tmp_path / "out",
        "--dataset",
        fineweb_sample_dir,
        "--cache_dir",
        tmp_path / "cache",
        "--shard_size",
        "1e6",
        "--max_tokens",
        "1.5e6",
    )
    np.testing.assert_array_equal(all_tokens(out_dir), all_tokens(sample_run)[:1_500_000])


# ---- input formats -------------------------------------------------------------------------------
def test_txt_file_is_one_document(tinyshakespeare_file, gpt2_tokenizer, tmp_path):
    (tmp_path / "b.txt").write_text("Second file.\nStill the second document.\n")
    out_dir = run(tmp_path / "out", "--data_files", tinyshakespeare_file, tmp_path / "b.txt", "--shard_size", "1e5")
    tokens = all_tokens(out_dir)
    assert (tokens == EOT).sum() == 2
    assert np.flatnonzero(tokens == EOT)[1] == 1 + 338_025  # tinyshakespeare is 338,025 GPT-2 tokens
    texts = [tinyshakespeare_file.read_text(), (tmp_path / "b.txt").read_text()]
    np.testing.assert_array_equal(tokens, expected_tokens(gpt2_tokenizer, texts))


def test_jsonl_skips_and_counts_empty_documents_and_encodes_special_text_as_plain(gpt2_tokenizer, tmp_path):
    texts = [
        "Hello world",
        None,
        "",
        "a <|endoftext|> inside is plain text",
        "lone surrogate \ud800 here",
        "héllo 世界",
    ]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    out_dir = run(tmp_path / "out", "--data_files", path, "--shard_size", 8)
    np.testing.assert_array_equal(all_tokens(out_dir), expected_tokens(gpt2_tokenizer, texts))
    meta = meta_of(out_dir)
    assert meta["shards"][-1]["empty_docs"] == 2 and sum(s["docs"] for s in meta["shards"]) == 4


def test_documents_straddle_tiny_shards_and_resume_mid_document(small_docs, gpt2_tokenizer, tmp_path, monkeypatch):
    expected = expected_tokens(gpt2_tokenizer, SMALL_TEXTS)
    whole = run(tmp_path / "whole", "--data_files", small_docs, "--shard_size", 37)
    shards = [np.load(p) for p in shard_files(whole)]
    assert [len(s) for s in shards] == [37] * (len(expected) // 37) + [len(expected) % 37]
    np.testing.assert_array_equal(np.concatenate(shards), expected)
    for index in (1, 5, 9, 30):  # a crash at several shard boundaries, each resumed to the same bytes
        crash_on_shard(monkeypatch, index)
        with pytest.raises(SystemExit, match="interrupted"):
            run(tmp_path / f"crash{index}", "--data_files", small_docs, "--shard_size", 37)
        monkeypatch.undo()
        run(tmp_path / f"crash{index}", "--data_files", small_docs, "--shard_size", 37)
        assert same_bytes(tmp_path / f"crash{index}", whole)
        assert meta_of(tmp_path / f"crash{index}")["shards"] == meta_of(whole)["shards"]


def test_max_tokens_stops_at_exactly_that_many(small_jsonl, gpt2_tokenizer, tmp_path):
    out_dir = run(tmp_path / "out", "--data_files", small_jsonl, "--shard_size", 100, "--max_tokens", 250)
    assert [len(np.load(p)) for p in shard_files(out_dir)] == [100, 100, 50]
    np.testing.assert_array_equal(all_tokens(out_dir), expected_tokens(gpt2_tokenizer, SMALL_TEXTS)[:250])


def test_parquet_with_another_text_field(gpt2_tokenizer, tmp_path):
    pq.write_table(pa.table({"content": ["one", None, "two"], "n": [1, 2, 3]}), tmp_path / "x.parquet")
    out_dir = run(tmp_path / "out", "--data_files", tmp_path / "x.parquet", "--text_field", "content")
    np.testing.assert_array_equal(all_tokens(out_dir), expected_tokens(gpt2_tokenizer, ["one", "two"]))


# ---- command line and errors ---------------------------------------------------------------------
def test_defaults_are_the_reference_recipe():
    cfg = fineweb.parse_args([])
    assert (cfg.dataset, cfg.name, cfg.split, cfg.text_field) == (
        "HuggingFaceFW/fineweb-edu",
        "sample-10BT",
        "train",
        "text",
    )
    assert cfg.data_dir == os.path.join(os.path.dirname(os.path.abspath(fineweb.__file__)), "edu_fineweb10B")
    assert cfg.shard_size == 100_000_000 and cfg.max_tokens is None and cfg.num_proc == fineweb.available_cores()
    assert fineweb.parse_args(["--dataset", "roneneldan/TinyStories"]).name is None


def test_counts_accept_scientific_notation():
    assert fineweb.parse_args(["--shard_size", "1e6", "--max_tokens", "3_000_000"]).shard_size == 1_000_000
    for bad in ("1.5", "0", "-1e6", "ten"):
        with pytest.raises(SystemExit):
            fineweb.parse_args(["--shard_size", bad])


@pytest.mark.parametrize(
    "make_input, flags, message",
    [
        (  # a reader's error (tests/test_documents.py has them all) after a row was read: no shard written
            lambda d: (d / "a.jsonl").write_text('{"text": "x"}\n{oops\n') and d / "a.jsonl",
            (),
            "a.jsonl:2: not valid JSON",
        ),
        (
            lambda d: write_jsonl(d / "a.jsonl", [{"text": ""}, {"text": None}]),
            (),
            "no tokens to write: all 2 documents were empty",
        ),
        (
            lambda d: write_jsonl(d / "a.jsonl", [{"text": "x"}]),
            ("--dataset", "x/y"),
            "--data_files reads local files: drop --dataset",
        ),
    ],
)
def test_bad_input_gets_one_clear_error(make_input, flags, message, tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(SystemExit, match=message):
        run(tmp_path / "out", "--data_files", make_input(tmp_path / "in"), *flags)
    assert not glob.glob(f"{tmp_path}/out/*.npy*")  # nothing half-written left behind


def test_tokenizer_download_failure_names_tiktoken_cache_dir(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError(f"could not download the {name} BPE files")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="could not download the gpt2 BPE files.*TIKTOKEN_CACHE_DIR"):
        get_tokenizer("gpt2")  # the one tokenizer loader: fineweb.py, training, evals and sampling use it


# ---- oversized shards, a misplaced --data_dir, a full disk ---------------------------------------
def test_shard_size_too_big_for_memory_is_refused_when_parsed(small_jsonl, tmp_path):
    with pytest.raises(SystemExit, match="error: --shard_size 1,000,000,000,000 tokens is more than"):
        run(tmp_path / "out", "--data_files", small_jsonl, "--shard_size", "1e12")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("failure", ["too little memory", "MemoryError"])
def test_shard_buffers_that_do_not_fit_suggest_a_smaller_shard_size(failure, small_jsonl, tmp_path, monkeypatch):
    run(tmp_path / "out", "--data_files", small_jsonl, "--shard_size", 100)
    before = {path: open(path, "rb").read() for path in glob.glob(f"{tmp_path}/out/*")}
    if failure == "too little memory":
        monkeypatch.setattr(fineweb, "physical_memory", lambda: 1000)  # bytes
    else:
        real_empty = np.empty

        def empty(shape, *args, **kwargs):  # the allocation of a shard buffer fails, nothing else
            if shape == 300:
                raise MemoryError
            return real_empty(shape, *args, **kwargs)

        monkeypatch.setattr(np, "empty", empty)
    with pytest.raises(SystemExit, match="error: two shards of 300 tokens .*pass a smaller --shard_size"):
        run(tmp_path / "out", "--data_files", small_jsonl, "--shard_size", 300, "--overwrite")
    assert {path: open(path, "rb").read() for path in glob.glob(f"{tmp_path}/out/*")} == before  # nothing deleted


def folder_state(folder):
    return {p: open(p, "rb").read() for p in glob.glob(f"{folder}/**", recursive=True) if os.path.isfile(p)}


def test_data_dir_that_holds_or_sits_in_the_input_is_refused_before_anything_changes(small_jsonl, tmp_path):
    data = small_jsonl.parent
    run(data / "out", "--data_files", small_jsonl, "--shard_size", 100)  # fine: the input is one file beside it
    before = folder_state(tmp_path)
    inside = "error: --data_dir {} is inside the input \\(every file below {} is read\\): .*pick another --data_dir"
    with pytest.raises(SystemExit, match=inside.format(re.escape(f"{data}/out"), re.escape(str(data)))):
        run(data / "out", "--data_files", data, "--shard_size", 100, "--overwrite")  # used to delete the shards
    with pytest.raises(SystemExit, match=f"error: --data_dir {re.escape(str(data))} holds the input file .*docs.jsonl"):
        run(data, "--data_files", small_jsonl, "--overwrite")
    with pytest.raises(SystemExit, match=inside.format(".*/new", ".*/new")):
        run(data / "new", "--data_files", f"{data}/*", "--shard_size", 100)  # a glob that will match it
    with pytest.raises(SystemExit, match=inside.format(".*/deeper", re.escape(str(data)))):
        run(data / "out" / "deeper", "--dataset", data)  # a local dataset folder is read whole too
    assert folder_state(tmp_path) == before


def fail_write(monkeypatch, nth):
    """The nth atomic_write (shard 0, meta.json, shard 1, meta.json, ...) finds the disk full midway."""
    real_atomic_write, calls = fineweb.atomic_write, []

    def atomic_write(path, write, check=None):
        calls.append(path)
        if len(calls) == nth:

            def write(f, write=write):
                f.write(b"\x93NUMPY\x01\x00")  # the first bytes fit
                raise OSError(errno.ENOSPC, "No space left on device")

        return real_atomic_write(path, write, check)

    monkeypatch.setattr(fineweb, "atomic_write", atomic_write)


@pytest.mark.parametrize(
    "nth, listed_after",  # as functions of the number of shards of the whole run
    [(lambda n: 5, lambda n: 2), (lambda n: 6, lambda n: 2), (lambda n: 2 * n + 1, lambda n: n)],
    ids=["shard 2", "meta.json listing shard 2", "the final meta.json"],
)
def test_full_disk_says_no_space_leaves_no_partial_shard_and_resumes_to_the_same_bytes(
    nth, listed_after, small_jsonl, tmp_path, monkeypatch
):
    whole = run(tmp_path / "whole", "--data_files", small_jsonl, "--shard_size", 37)
    names = [os.path.basename(p) for p in shard_files(whole)]
    fail_write(monkeypatch, nth(len(names)))
    with pytest.raises(SystemExit, match=r"error: could not write .*: no space left on the device .*re-run the same"):
        run(tmp_path / "out", "--data_files", small_jsonl, "--shard_size", 37)
    meta = meta_of(tmp_path / "out")
    listed = [s["file"] for s in meta["shards"]]
    assert not meta["complete"] and listed == names[: listed_after(len(names))]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(listed + ["meta.json"])  # no .tmp, no unlisted shard
    monkeypatch.undo()  # space again: the same command resumes
    run(tmp_path / "out", "--data_files", small_jsonl, "--shard_size", 37)
    assert same_bytes(tmp_path / "out", whole)
    assert meta_of(tmp_path / "out") == meta_of(whole)
