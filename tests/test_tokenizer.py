"""Tests for tokenizer.py: GPT-2 through the interface, the BPE trainers against each other, the
tokenizer folder (save, load, damage), the special tokens, every error, and the command line.

Offline: GPT-2's BPE files from TIKTOKEN_CACHE_DIR, tiny corpora written here, and (one test) the
FineWeb sample from FINEWEB_DATA_FILES.
"""

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import regex
from conftest import REPO

import tokenizer
from errors import UserError
from tokenizer import SPECIAL_TOKENS, get_tokenizer, train_bpe, train_bpe_python, train_tokenizer

GPT2_HASH = "928cd4e3a26fd5c9"  # content_hash of tiktoken's GPT-2 BPE: it must never change
TRICKY = [
    "Hello world! It's 2026; we've 1234567 tokens.",
    "emoji 🎉👩‍👩‍👧 and flags 🇫🇷",
    "中文字符 日本語のテキスト 한국어",
    "Windows line\r\nends\r\n\r\n and\ttabs",
    "long     whitespace" + " " * 300 + "runs\n\n\n\n" + "\t" * 50,
    "<|endoftext|> is plain text here, and so is <|user|>",
    "accents: café naïve Ångström; math: ∑ x² ≤ ∞",
    "",
]
# A few KB of text (seeded sentences of common words, numbers, punctuation and non-ASCII words):
# the trainers' test corpus, varied enough for a few hundred merges.
WORDS = (
    "the of and to in is was that for it with as on be at by this had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so "
    "said what up its about into than them can only other new some time could these two may then do first "
    "any my now such like our over man me even most made after also did many before must through back "
    "years where much your way well down should because each just those people Mr how too little state "
    "good very make world still own see men work long get here between both life being under never day "
    "same another know while last might us great old year off come since against go came right used take "
    "three café naïve Straße Ångström 東京 日本語 한국어 🎉 don't WON'T it's we've"
).split()


def sentence(rng):
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
    number = rng.choice(["", f" {rng.randint(0, 99999)}", f" ({rng.randint(1, 12)}/{rng.randint(1, 28)})"])
    text = " ".join(words)
    return text[0].upper() + text[1:] + number + rng.choice([".", "!", "?", ";", ":", ",\n", ".\r\n"])


CORPUS = [" ".join(sentence(random.Random(i * 100 + j)) for j in range(3)) for i in range(30)]


def small_vocab(num_merges):
    return 256 + num_merges + len(SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def gpt2():
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        pytest.skip("set TIKTOKEN_CACHE_DIR to a folder holding the GPT-2 BPE files")
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def trained():
    return train_tokenizer(CORPUS, small_vocab(200))


@pytest.fixture
def saved(tmp_path, trained):
    folder = tmp_path / "tok"
    trained.save(folder, {"source": "CORPUS"})
    return folder


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    return path


# ---- GPT-2 through the interface ---------------------------------------------------------------
def test_gpt2_ids_equal_tiktoken(gpt2, gpt2_tokenizer):
    for text in TRICKY + CORPUS:
        assert gpt2.encode(text) == gpt2_tokenizer.encode_ordinary(text)
        assert gpt2.encode_to_numpy(text).tolist() == gpt2_tokenizer.encode_ordinary(text)
    assert (gpt2.eot, gpt2.vocab_size, gpt2.special_tokens) == (50256, 50257, {"<|endoftext|>": 50256})


def test_gpt2_hash_is_stable(gpt2):
    assert gpt2.hash == GPT2_HASH
    assert get_tokenizer("gpt2").hash == GPT2_HASH  # a fresh Tokenizer: computed, not cached


def test_gpt2_token_bytes_sum_to_utf8_bytes(gpt2):
    lengths = gpt2.token_bytes()
    for text in TRICKY:
        assert lengths[gpt2.encode(text)].sum() == len(text.encode())
    assert lengths[gpt2.eot] == 0


def test_bytes_per_token_is_bytes_over_tokens(gpt2):
    texts = TRICKY[:3]
    tokens = sum(len(gpt2.encode(text)) for text in texts)
    assert gpt2.bytes_per_token(texts) == sum(len(text.encode()) for text in texts) / tokens


# ---- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["gpt2", "trained"])
def test_every_string_round_trips(which, request):
    tok = request.getfixturevalue(which)
    for text in TRICKY + CORPUS:
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode_to_numpy(text)) == text


@pytest.mark.parametrize("which", ["gpt2", "trained"])
def test_lone_surrogate_becomes_replacement_character(which, request):
    tok = request.getfixturevalue(which)
    text = "a\ud800b \udfff"  # what json.loads gives for '"a\\ud800b \\udfff"'
    assert tok.decode(tok.encode(text)) == "a\ufffdb \ufffd"
    assert tok.decode(tok.encode_to_numpy(text)) == "a\ufffdb \ufffd"
    assert tok.decode(tok.encode("\ud83c\udf89")) == "🎉"  # a valid surrogate pair is the character


def test_pattern_splits_like_gpt4s(gpt2):
    gpt4 = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}|"""  # tiktoken's cl100k_base
    gpt4 += r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
    assert tokenizer.PATTERN == gpt4.replace("]?+", "]?").replace("]++", "]+")
    tricky = TRICKY + CORPUS + ["x!!!\n\n", " !!\r\n", "é!a", "1,234.5e-6", " \n \n", "\u00a0\u2028x", "'S 'll'LL"]
    for text in tricky:
        assert regex.findall(tokenizer.PATTERN, text) == regex.findall(gpt4, text)
    # tiktoken (Rust's fancy_regex) splits like Python's regex module, which the Python trainer uses
    ours = tokenizer.make_encoding("gpt2-split-test", tokenizer.PATTERN, gpt2.encoding._mergeable_ranks, {})
    reference = tokenizer.make_encoding("gpt4-split-test", gpt4, gpt2.encoding._mergeable_ranks, {})
    for text in tricky:
        assert ours.encode_ordinary(text) == reference.encode_ordinary(text)


# ---- training: the fast trainer against the readable one ----------------------------------------
def tie_heavy_corpus():
    """Words of two letters: many pairs with equal counts, so every merge tests the tie-break."""
    rng = random.Random(0)
    return [" ".join("".join(rng.choice("ab") for _ in range(rng.randint(1, 9))) for _ in range(30)) for _ in range(20)]


@pytest.mark.parametrize("num_merges", [50, 120, 200])
def test_rustbpe_learns_exactly_the_python_merges(num_merges):
    assert sum(map(len, CORPUS)) < 10_000  # "a few KB"
    fast, slow = train_bpe(CORPUS, num_merges), train_bpe_python(CORPUS, num_merges)
    assert len(fast) == 256 + num_merges
    assert fast == slow


def test_ties_go_to_the_smallest_pair():
    # (b, a) and (a, b) are both seen once: (a, b) = (97, 98) is the smaller pair of ids, so it is merged first
    for train in (train_bpe, train_bpe_python):
        ranks = train(["ba", "ab"], 2)
        assert sorted(ranks, key=ranks.get)[256:] == [b"ab", b"ba"]


def test_ties_are_broken_the_same_way_everywhere():
    corpus = tie_heavy_corpus()
    assert train_bpe(corpus, 60) == train_bpe_python(corpus, 60)


def test_tiktoken_encodes_as_rustbpe_does():
    rustbpe = pytest.importorskip("rustbpe")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(CORPUS, vocab_size=256 + 200, pattern=tokenizer.PATTERN)
    tok = train_tokenizer(CORPUS, small_vocab(200))
    for text in CORPUS + TRICKY:
        assert tok.encode(text) == trainer.encode(text)


def test_special_tokens_are_the_top_ids(trained):
    top = trained.vocab_size - len(SPECIAL_TOKENS)
    names = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    names += [f"<|reserved_{i}|>" for i in range(4)]
    assert trained.special_tokens == {name: top + i for i, name in enumerate(names)}
    assert trained.eot == trained.special("<|endoftext|>") == top
    assert trained.special("<|assistant|>") == top + 3
    assert trained.token_bytes()[top:].tolist() == [0] * len(names)
    assert top + 3 not in trained.encode("<|assistant|>")  # special text in data stays plain text


def test_gpt2_has_no_chat_tokens(gpt2):
    with pytest.raises(UserError, match="no special token '<\\|user\\|>'"):
        gpt2.special("<|user|>")


def test_vocab_size_counts_the_special_tokens(trained):
    assert trained.vocab_size == small_vocab(200) == len(trained.encoding._mergeable_ranks) + len(SPECIAL_TOKENS)


@pytest.mark.parametrize("vocab_size", [0, 256, 256 + len(SPECIAL_TOKENS) - 1, 2**32 + 1])
def test_vocab_size_out_of_range_is_refused(vocab_size):
    with pytest.raises(UserError, match="must be from 265 .* to 2\\*\\*32"):
        train_tokenizer(CORPUS, vocab_size)


def test_empty_corpus_is_refused():
    with pytest.raises(UserError, match="no text to train on"):
        train_tokenizer(["", None, ""], small_vocab(10))


def test_too_little_text_for_the_vocab_is_refused():
    with pytest.raises(UserError, match="allows only 3 merges"):
        train_tokenizer(["abcd"], small_vocab(10))


# ---- the tokenizer folder ----------------------------------------------------------------------
def test_saved_folder_loads_back_identical(saved, trained):
    loaded = get_tokenizer(str(saved))
    assert loaded.hash == trained.hash
    assert (loaded.vocab_size, loaded.eot, loaded.special_tokens) == (
        trained.vocab_size,
        trained.eot,
        trained.special_tokens,
    )
    for text in TRICKY + CORPUS:
        assert loaded.encode(text) == trained.encode(text)
    assert sorted(os.listdir(saved.parent)) == ["tok"]  # no temporary folder left behind
    meta = json.loads((saved / "tokenizer.json").read_text())
    assert meta["hash"] == trained.hash and meta["training"] == {"source": "CORPUS"}


def test_ranks_file_is_tiktoken_format(saved, trained):
    from tiktoken.load import load_tiktoken_bpe

    assert load_tiktoken_bpe(str(saved / "tokenizer.tiktoken")) == trained.encoding._mergeable_ranks


def test_edited_rank_fails_the_hash_check(saved):
    ranks_file = saved / "tokenizer.tiktoken"
    lines = ranks_file.read_text().splitlines(keepends=True)
    token, _ = lines[300].split()
    lines[300], lines[301] = f"{token} 301\n", f"{lines[301].split()[0]} 300\n"  # swap two ranks
    ranks_file.write_text("".join(lines))
    with pytest.raises(UserError, match=f"{saved} is damaged: its files hash to .* records hash"):
        get_tokenizer(str(saved))


def test_unparsable_folder_is_damaged(saved):
    (saved / "tokenizer.tiktoken").write_text("not base64!\n")
    with pytest.raises(UserError, match=f"{saved} is damaged"):
        get_tokenizer(str(saved))


@pytest.mark.parametrize("missing", ["tokenizer.json", "tokenizer.tiktoken"])
def test_incomplete_folder_is_refused(saved, missing):
    os.remove(saved / missing)
    with pytest.raises(UserError, match=f"{saved} is incomplete: {missing} missing"):
        get_tokenizer(str(saved))


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(UserError, match="unknown tokenizer .*nothing_here"):
        get_tokenizer(str(tmp_path / "nothing_here"))


def test_save_replaces_an_older_tokenizer(saved):
    other = train_tokenizer(CORPUS, small_vocab(50))
    other.save(saved, {})
    assert get_tokenizer(str(saved)).hash == other.hash
    assert sorted(os.listdir(saved.parent)) == ["tok"]


@pytest.mark.parametrize(
    "failure, raised", [(KeyboardInterrupt(), KeyboardInterrupt), (OSError("disk full"), UserError)]
)
def test_failed_save_leaves_the_old_folder(saved, trained, monkeypatch, failure, raised):
    def fail(path, text):
        raise failure

    monkeypatch.setattr(tokenizer, "write_synced", fail)
    with pytest.raises(raised):
        train_tokenizer(CORPUS, small_vocab(50)).save(saved, {})
    assert get_tokenizer(str(saved)).hash == trained.hash
    assert sorted(os.listdir(saved.parent)) == ["tok"]


def test_save_refuses_a_folder_of_other_files(tmp_path, trained):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a tokenizer folder"):
        trained.save(tmp_path, {})
    assert os.listdir(tmp_path) == ["notes.txt"]


# ---- the command line --------------------------------------------------------------------------
def test_cli_trains_a_folder_from_jsonl_and_txt(tmp_path, capsys):
    documents = CORPUS[:20] + ["\n".join(CORPUS[20:])]  # the .txt file is one document
    jsonl = write_jsonl(tmp_path / "docs.jsonl", documents[:20] + ["", None])
    (tmp_path / "more.txt").write_text(documents[20], encoding="utf-8")
    out_dir = tmp_path / "tok"
    data_files = [str(jsonl), str(tmp_path / "more.txt")]
    tokenizer.main(["train", "--data_files", *data_files, "--out_dir", str(out_dir), "--vocab_size", "365"])
    tok = get_tokenizer(str(out_dir))
    assert tok.vocab_size == 365
    assert tok.hash == train_tokenizer(documents, 365).hash
    training = json.loads((out_dir / "tokenizer.json").read_text())["training"]
    assert training["docs"] == 21 and training["chars"] == sum(map(len, documents))
    assert training["trainer"].startswith("rustbpe ") and training["seconds"] >= 0
    assert [path for path, size in training["source"]["data_files"]] == data_files
    assert f"365 ids, hash {tok.hash}" in capsys.readouterr().out


def test_cli_max_chars_cuts_the_text(tmp_path):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", CORPUS)
    args = ["train", "--data_files", str(jsonl), "--vocab_size", str(small_vocab(20)), "--max_chars", "1000"]
    tokenizer.main(args + ["--out_dir", str(tmp_path / "tok")])
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["training"]["chars"] == 1000


def cli_error(tmp_path, *flags):
    """The one-line error of `tokenizer.py train` with flags; checks that nothing was written."""
    out_dir = tmp_path / "tok"
    with pytest.raises(SystemExit) as exit_info:
        tokenizer.main(["train", "--out_dir", str(out_dir), *map(str, flags)])
    assert not out_dir.exists()
    assert not [name for name in os.listdir(tmp_path) if name.startswith("tok.")]  # no temporary folder
    return str(exit_info.value)


def test_cli_non_utf8_file_is_an_error(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café déjà vu".encode("latin-1"))
    message = cli_error(tmp_path, "--data_files", tmp_path / "latin1.txt", "--vocab_size", small_vocab(5))
    assert message.startswith("error: ") and "latin1.txt: not UTF-8 text" in message


def test_cli_empty_corpus_is_an_error(tmp_path):
    jsonl = write_jsonl(tmp_path / "empty.jsonl", ["", None, ""])
    message = cli_error(tmp_path, "--data_files", jsonl, "--vocab_size", small_vocab(5))
    assert message.startswith("error: no text to train on")


def test_cli_text_field_of_numbers_is_an_error(tmp_path):
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "numbers.parquet")
    message = cli_error(tmp_path, "--data_files", tmp_path / "numbers.parquet", "--vocab_size", small_vocab(5))
    assert "numbers.parquet row 0: field 'text' holds int 1, not text: pass --text_field" in message


@pytest.mark.parametrize("vocab_size", [264, 2**32 + 1])
def test_cli_vocab_size_out_of_range_is_an_error(tmp_path, vocab_size):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", CORPUS)
    assert "must be from 265" in cli_error(tmp_path, "--data_files", jsonl, "--vocab_size", vocab_size)


def test_cli_encode_and_compare(tmp_path, saved, gpt2, capsys):
    tokenizer.main(["encode", "--tokenizer", str(saved), "the theory"])
    ids = get_tokenizer(str(saved)).encode("the theory")
    assert str(ids) in capsys.readouterr().out
    jsonl = write_jsonl(tmp_path / "docs.jsonl", CORPUS)
    tokenizer.main(["compare", "--tokenizer", str(saved), "--data_files", str(jsonl)])
    rows = capsys.readouterr().out.splitlines()[-2:]
    assert rows[0].split()[:4] == ["gpt2", "50,257", f"{gpt2.bytes_per_token(CORPUS):.3f}", "1.000"]
    assert rows[1].split()[0] == str(saved)


def test_script_runs_from_anywhere(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO / "tokenizer.py"), "--help"], cwd=tmp_path, capture_output=True)
    assert result.returncode == 0 and b"python tokenizer.py train" in result.stdout


# ---- on real text ------------------------------------------------------------------------------
def test_fineweb_compression_near_gpt2(fineweb_sample_dir, gpt2):
    """At 8,192 ids, trained on one 10 MB file, ours compresses the other file at least 0.8x as well as
    GPT-2 (measured: 0.85x; docs/benchmarks.md has 32,768 and 50,257)."""
    files = sorted(str(path) for path in fineweb_sample_dir.glob("*.parquet"))
    if len(files) < 2:
        pytest.skip(f"need two parquet files in {fineweb_sample_dir}")
    train_texts, held_out = (pq.read_table(f, columns=["text"]).column(0).to_pylist() for f in files[:2])
    ours = train_tokenizer(train_texts, 8192)
    held_out = held_out[:300]
    ratio = ours.bytes_per_token(held_out) / gpt2.bytes_per_token(held_out)
    assert 0.8 < ratio < 1.0
    assert ours.token_bytes()[ours.encode_to_numpy(held_out[0])].sum() == len(held_out[0].encode())


# ---- the tokenizer through the pipeline: fineweb.py -> train_gpt2.py ----


def test_own_tokenizer_flows_from_shards_to_training_and_is_checked(saved, trained, tmp_path, capsys):
    import numpy as np
    from test_train import TINY

    import fineweb
    import train_gpt2
    from training_log import read_metrics

    texts = [" ".join(sentence(random.Random(1000 + i)) for _ in range(20)) for i in range(40)]
    data_dir = tmp_path / "shards"
    fineweb.main(
        [
            "--data_files",
            str(write_jsonl(tmp_path / "docs.jsonl", texts)),
            "--tokenizer",
            str(saved),
            "--data_dir",
            str(data_dir),
            "--shard_size",
            "2000",
        ]
    )
    with open(data_dir / "meta.json") as f:
        assert json.load(f)["settings"]["tokenizer"] == {"name": os.path.abspath(saved), "hash": trained.hash}
    tokens = np.concatenate([np.load(p) for p in sorted(data_dir.glob("*_train_*.npy"))])
    assert tokens.max() < trained.vocab_size and (tokens == trained.eot).sum() > 0
    flags = [*TINY, "--data_dir", str(data_dir), "--max_steps", "2", "--eval_interval", "2"]
    train_gpt2.main([*flags, "--log_dir", str(tmp_path / "log")])  # --tokenizer auto: the shards' own
    config = [m for m in read_metrics(tmp_path / "log" / "metrics.jsonl") if m["kind"] == "config"][0]
    assert config["num_params"] < 200_000  # a 521-id embedding, not GPT-2's 50,304 rows
    val = [m for m in read_metrics(tmp_path / "log" / "metrics.jsonl") if m["kind"] == "val"][-1]
    assert 0 < val["bpb"] < val["loss"]  # more than one byte per token
    with pytest.raises(SystemExit, match=r"were written with tokenizer .*tok \(hash .*--tokenizer gpt2 is another one"):
        train_gpt2.main([*flags, "--log_dir", str(tmp_path / "log2"), "--tokenizer", "gpt2"])


def test_fineweb_refuses_a_tokenizer_too_large_for_uint16_shards(tmp_path, monkeypatch):
    import fineweb

    class Huge:
        name, vocab_size, eot, hash = "huge", 70_000, 0, "x"

    monkeypatch.setattr(fineweb, "get_tokenizer", lambda name: Huge())
    with pytest.raises(SystemExit, match="has 70,000 ids, but shards hold uint16 ids .*--vocab_size 65536"):
        data_files = str(write_jsonl(tmp_path / "d.jsonl", ["a b"]))
        fineweb.main(["--data_files", data_files, "--data_dir", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists() or not os.listdir(tmp_path / "s")
