"""
FineWeb-Edu, or any text dataset, -> token shards for dataloader.py (GPT-2's BPE, or --tokenizer DIR).

    python fineweb.py                # FineWeb-Edu sample-10BT from the Hugging Face hub -> edu_fineweb10B/
    python fineweb.py --streaming    # the same shards, streamed: no dataset download on disk first
    python fineweb.py --data_files path/to/parquet_folder --data_dir log/demo/data --shard_size 1e6
    python fineweb.py --tokenizer tok/ --data_dir tok_shards    # your own BPE (python tokenizer.py train ...)
    HF_ENDPOINT=https://hf-mirror.com python fineweb.py    # through a mirror when the hub is slow or blocked

Each document becomes [<|endoftext|>] + its GPT-2 tokens; documents follow each other in input order
and are cut wherever a shard ends. A shard is a 1-D uint16 array saved with np.save, named
{prefix}_val_000000.npy (shard 0: the validation split), {prefix}_train_000001.npy, ...; each holds
--shard_size tokens except the last. meta.json beside the shards records the settings and, per
shard, its token and document counts and where in the input the next shard starts: re-running the
same command after a crash resumes there and writes the same bytes as an uninterrupted run.

Local files (--data_files: files, folders or globs; no network needed): .parquet (column
--text_field), .jsonl / .json (field --text_field of one JSON object per line, or of one array of
objects), .txt (a whole file is one document, like tinyshakespeare); .jsonl.gz, .json.gz and .txt.gz
too. Empty and null documents are skipped and counted. documents.py reads the input; this file
batches, encodes and writes it.
"""

import argparse
import fnmatch
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from tqdm import tqdm

from documents import (
    DEFAULT_DATASET,
    DEFAULT_NAME,
    HubSource,
    hub_dataset,
    hub_row_count,
    hub_rows,
    json_state,
    local_row_count,
    local_rows,
    no_state,
    parse_count,
    resolve_data_files,
)
from errors import UserError, exit_on_error
from files import atomic_write
from shards import DEFAULT_DATA_DIR, TOKEN_DTYPE, files_matching, shard_name, shard_patterns
from tokenizer import GPT2, get_tokenizer

# One encoding task: ~256K characters (~60K tokens, tens of ms on one core) hides the cost of a task,
# yet even the 2,800-document sample makes ~80 of them, enough to keep 16 cores busy.
BATCH_CHARS = 2**18
BATCH_ROWS = 4096  # ... or this many rows, so that a run of empty documents still makes a batch
BATCHES_PER_THREAD = 4  # read-ahead: keeps every thread fed while bounding the memory in flight
# The writer holds two shards in memory (one filling, one saving), 2 bytes a token: 2**31 tokens is
# 8 GiB for the two, far past any use (the default 1e8 is 400 MB) yet short of a typo like 1e12.
MAX_SHARD_SIZE = 2**31


def available_cores():
    """Cores this process may run on (taskset and container limits included, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Config:
    dataset: str = None  # Hugging Face dataset id; FineWeb-Edu when neither it nor data_files is given
    name: str = None  # the dataset's config: sample-10BT for FineWeb-Edu
    split: str = None  # train when a dataset is given
    text_field: str = "text"
    tokenizer: str = "gpt2"  # or a folder written by `python tokenizer.py train`
    data_files: list = None  # local files, folders or globs, read instead of a dataset
    streaming: bool = False
    cache_dir: str = None  # where `datasets` keeps downloads (default ~/.cache/huggingface/datasets)
    data_dir: str = DEFAULT_DATA_DIR  # the shard folder, train_gpt2.py's --data_dir
    prefix: str = "edufineweb"
    shard_size: int = 10**8  # 100M tokens = 200 MB per shard
    max_tokens: int = None
    num_proc: int = field(default_factory=available_cores)
    overwrite: bool = False


@dataclass
class Position:
    """Where a shard starts in the document stream. Documents straddle shards, so it is a row of the
    input and a number of that row's tokens ([EOT] + text) that the previous shard already holds."""

    row: int = 0
    offset: int = 0
    stream_state: dict = None  # --streaming: the dataset's state_dict() at some row at or before `row`,
    stream_skip: int = 0  # ... and how many rows after that state `row` is (skips earlier files fast)


@dataclass
class Batch:
    texts: list  # (B,) str, or None for a null document
    first_row: int  # row of texts[0] in the input
    stream_state: dict = None  # as in Position, for texts[0]
    stream_skip: int = 0


# ---- the output folder, apart from the input --------------------------------------------------
def is_within(path, folder):
    return os.path.commonpath([path, folder]) == folder


def folder_read_by(pattern, data_dir):
    """The folder that --data_files' pattern reads every file below and that holds data_dir (or is
    it), else None: a folder named, or one a glob matches, now or once data_dir exists."""
    if os.path.exists(pattern):
        inside = os.path.isdir(pattern) and is_within(os.path.realpath(data_dir), os.path.realpath(pattern))
        return pattern if inside else None
    folder = os.path.abspath(data_dir)
    while not fnmatch.fnmatch(folder, os.path.abspath(pattern)):  # fnmatch's * spans "/": as glob reads below a match
        if folder == os.path.dirname(folder):
            return None
        folder = os.path.dirname(folder)
    return folder


def check_data_dir_apart(cfg, files):
    """Refuse a --data_dir that holds an input file or lies in an input folder: a second run would
    read its meta.json as input, and --overwrite delete what it reads."""
    patterns = cfg.data_files or ([cfg.dataset] if cfg.dataset and os.path.isdir(cfg.dataset) else [])  # local folder
    for pattern in patterns:
        if folder := folder_read_by(pattern, cfg.data_dir):
            raise UserError(
                f"--data_dir {cfg.data_dir} is inside the input (every file below {folder} is read): its shards "
                f"and meta.json would be read as input; pick another --data_dir, outside the input"
            )
    data_dir = os.path.realpath(cfg.data_dir)
    for path in files or []:
        if is_within(os.path.realpath(path), data_dir):
            raise UserError(
                f"--data_dir {cfg.data_dir} holds the input file {path}: the shards would be written among "
                f"their own input; pick another --data_dir, or move the input out of it"
            )


# ---- batches of documents ---------------------------------------------------------------------
def document_batches(rows, start, stream_state):
    """Group texts into batches of about BATCH_CHARS characters, each knowing where it starts."""
    position = (start.row, start.stream_state, start.stream_skip)
    texts, chars = [], 0
    for text in rows:
        texts.append(text)
        chars += len(text) if text else 0
        if chars >= BATCH_CHARS or len(texts) == BATCH_ROWS:
            yield Batch(texts, *position)
            # rows has just handed over texts[-1]: a stream's state now points at the next row
            position = (position[0] + len(texts), stream_state(), 0)
            texts, chars = [], 0
    if texts:
        yield Batch(texts, *position)


# ---- tokenizing -------------------------------------------------------------------------------
def encode_batch(tokenizer, texts):
    """[EOT] + tokens of each text, concatenated: (N,) uint16; and each row's token count (B,),
    0 for an empty or null text, which adds nothing (not even an EOT)."""
    eot = np.array([tokenizer.eot], dtype=np.uint32)
    pieces = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        if text:
            tokens = tokenizer.encode_to_numpy(text)
            pieces += (eot, tokens)
            lengths[i] = 1 + len(tokens)
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.uint32)
    if tokens.size and tokens.max() > np.iinfo(TOKEN_DTYPE).max:
        raise UserError(f"token id {tokens.max()} does not fit in {TOKEN_DTYPE.name}")
    return tokens.astype(TOKEN_DTYPE), lengths


def encoded_batches(tokenizer, batches, num_threads):
    """(batch, encode_batch(batch)) in input order, encoded by num_threads threads. tiktoken lets go
    of the GIL while it encodes, so threads scale like processes, without pickling texts and tokens
    between processes; at most BATCHES_PER_THREAD batches per thread are read ahead (flat memory)."""
    pending = deque()
    with ThreadPoolExecutor(num_threads) as pool:
        try:
            while True:
                while len(pending) < BATCHES_PER_THREAD * num_threads and (batch := next(batches, None)) is not None:
                    pending.append((batch, pool.submit(encode_batch, tokenizer, batch.texts)))
                if not pending:
                    return
                batch, encoded = pending.popleft()
                yield batch, encoded.result()
        finally:  # stopped early (--max_tokens, an error): drop the work not started yet
            for _, encoded in pending:
                encoded.cancel()


# ---- writing shards ---------------------------------------------------------------------------
def save_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def save_shard(data_dir, entry, tokens, meta):
    """Save one shard, then the meta.json that lists it (in that order, so meta never lies). If either
    fails (a full disk), the folder is left as the last save left it, and a re-run resumes there."""
    path = os.path.join(data_dir, entry["file"])
    try:
        atomic_write(path, lambda f: np.save(f, tokens))
        try:
            save_json(os.path.join(data_dir, "meta.json"), meta)
        except BaseException:
            os.remove(path)  # a shard that meta.json does not list would still be read by the data loader
            raise
    except UserError as e:
        raise UserError(f"{e}; then re-run the same command to resume after the last complete shard") from e


class ShardWriter:
    """Cuts the token stream into shards. A full shard is saved by a background thread while the next
    one fills the other of two buffers, so encoding never waits on the disk: memory is two shards."""

    def __init__(self, cfg, settings, shards, start, buffers):
        self.cfg = cfg
        self.meta = {"settings": settings, "shards": shards, "complete": False}
        self.buffer, self.spare = buffers  # shard_buffers(cfg.shard_size)
        self.fill = 0  # tokens in the current shard
        self.shard_docs = 0  # documents whose EOT is in the current shard
        self.tokens = sum(s["tokens"] for s in shards)
        self.docs = sum(s["docs"] for s in shards)
        self.empty_docs = shards[-1]["empty_docs"] if shards else 0
        self.position = start
        self.skip = start.offset  # the first tokens of the stream are already in the last shard
        self.saver = ThreadPoolExecutor(1)
        self.saving = None

    def done(self):
        return self.tokens == self.cfg.max_tokens

    def write(self, batch, tokens, lengths):
        """Append one encoded batch: tokens (N,) and its rows' token counts (B,)."""
        ends = np.cumsum(lengths)  # (B,) where each row's tokens end in `tokens`
        starts = (ends - lengths)[lengths > 0]  # (D,) where each document's EOT is
        empty_before = self.empty_docs
        pos, self.skip = self.skip, 0
        while pos < len(tokens) and not self.done():
            budget = self.cfg.max_tokens - self.tokens if self.cfg.max_tokens else len(tokens)
            take = min(len(tokens) - pos, self.cfg.shard_size - self.fill, budget)
            self.buffer[self.fill : self.fill + take] = tokens[pos : pos + take]
            self.shard_docs += int(np.searchsorted(starts, pos + take) - np.searchsorted(starts, pos))
            self.fill, self.tokens, pos = self.fill + take, self.tokens + take, pos + take
            self.advance(batch, lengths, ends, pos, empty_before)
            if self.fill == self.cfg.shard_size:
                self.save_shard()
        if pos == len(tokens):  # the whole batch is in: count the empty rows at its end too
            self.advance(batch, lengths, ends, pos, empty_before)

    def advance(self, batch, lengths, ends, pos, empty_before):
        """Move the stream position to just after the batch's first `pos` tokens."""
        row = int(np.searchsorted(ends, pos, side="right"))  # the first row not completely written
        offset = pos - int(ends[row - 1]) if row else pos
        stream_skip = batch.stream_skip + row if batch.stream_state is not None else 0
        self.position = Position(batch.first_row + row, offset, batch.stream_state, stream_skip)
        self.empty_docs = empty_before + int(np.count_nonzero(lengths[:row] == 0))

    def save_shard(self):
        position = self.position
        entry = {
            "file": shard_name(self.cfg.prefix, len(self.meta["shards"])),
            "tokens": self.fill,
            "docs": self.shard_docs,  # documents that start in this shard
            "empty_docs": self.empty_docs,  # empty or null documents skipped so far (all shards)
            "next_row": position.row,
            "next_offset": position.offset,
            "stream_state": position.stream_state,
            "stream_skip": position.stream_skip,
        }
        self.wait_for_save()  # the spare buffer, which the next shard fills, must be on disk
        self.meta["shards"].append(entry)
        meta = dict(self.meta, shards=list(self.meta["shards"]))  # a snapshot for the saving thread
        self.saving = self.saver.submit(save_shard, self.cfg.data_dir, entry, self.buffer[: self.fill], meta)
        self.buffer, self.spare = self.spare, self.buffer
        self.docs += self.shard_docs
        self.fill, self.shard_docs = 0, 0

    def wait_for_save(self):
        if self.saving is not None:
            self.saving.result()  # re-raises a failed save here
            self.saving = None

    def finish(self):
        """Save the last, partial shard and mark the run complete in meta.json."""
        if self.fill:
            self.save_shard()
        self.wait_for_save()
        self.saver.shutdown()
        if not self.meta["shards"]:
            raise UserError(f"no tokens to write: all {self.empty_docs} documents were empty")
        self.meta["complete"] = True
        try:
            save_json(os.path.join(self.cfg.data_dir, "meta.json"), self.meta)
        except UserError as e:
            raise UserError(f"{e}; then re-run the same command to finish") from e


def physical_memory():
    """Bytes of RAM, or None where the system does not say (Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def shard_buffers(shard_size):
    """The writer's two shard buffers, or a UserError if they cannot fit in memory."""
    nbytes = 2 * shard_size * TOKEN_DTYPE.itemsize
    too_big = f"two shards of {shard_size:,} tokens ({nbytes / 2**30:.1f} GiB) do not fit in memory"
    memory = physical_memory()
    if memory is not None and nbytes > memory:  # else np.empty succeeds, and the OOM killer strikes later
        raise UserError(f"{too_big} ({memory / 2**30:.1f} GiB here): pass a smaller --shard_size (default 1e8)")
    try:
        # np.empty takes memory page by page as it is filled: a small run never pays for 2 x 200 MB
        return np.empty(shard_size, dtype=TOKEN_DTYPE), np.empty(shard_size, dtype=TOKEN_DTYPE)
    except MemoryError:
        raise UserError(f"{too_big}: pass a smaller --shard_size (default 1e8)")


# ---- resuming ---------------------------------------------------------------------------------
def settings_for(cfg, files, tokenizer):
    """What decides the bytes of the shards: a run resumes only into a folder made with the same."""
    if files:
        source = {"data_files": [[os.path.abspath(path), os.path.getsize(path)] for path in files]}
    else:  # streaming or not gives the same bytes, so a streamed run may resume downloaded
        source = {"dataset": cfg.dataset, "name": cfg.name, "split": cfg.split}
    settings = {
        "tokenizer": {"name": tokenizer.name, "hash": tokenizer.hash},  # train_gpt2.py --tokenizer auto reads it
        "eot": tokenizer.eot,
        "dtype": TOKEN_DTYPE.name,
        "shard_size": cfg.shard_size,
        "max_tokens": cfg.max_tokens,
        "prefix": cfg.prefix,
        "text_field": cfg.text_field,
        "source": source,
    }
    return json.loads(json.dumps(settings))  # as meta.json gives it back: lists, not tuples


def shard_is_intact(path, tokens):
    try:
        shard = np.load(path, mmap_mode="r")  # reads the header only; fails on a short file
    except (OSError, ValueError):
        return False
    return shard.dtype == TOKEN_DTYPE and shard.shape == (tokens,)


def completed_shards(cfg, settings):
    """The shards that an earlier run with the same settings completed in cfg.data_dir, to resume after
    ([] to start afresh), or None when that run finished."""
    try:
        os.makedirs(cfg.data_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--data_dir {cfg.data_dir}: cannot create it ({e})")
    meta_path = os.path.join(cfg.data_dir, "meta.json")
    if cfg.overwrite:  # only what we write, and what the data loader would read: never the whole folder
        for path in files_matching(cfg.data_dir, shard_patterns() + ["meta.json"]):
            os.remove(path)
    for path in files_matching(cfg.data_dir, ("*.npy.*tmp", "meta.json.*tmp")):
        os.remove(path)  # left by a crash in the middle of a save
    if not os.path.exists(meta_path):
        if files_matching(cfg.data_dir, shard_patterns()):
            raise UserError(
                f"{cfg.data_dir} holds shards but no meta.json (made by another tool?): "
                f"pass --overwrite to replace them, or choose another --data_dir"
            )
        return []
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        old_settings, old_shards = meta["settings"], meta["shards"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{meta_path} is unreadable ({e!r}): pass --overwrite to start afresh")
    if old_settings != settings:
        keys = sorted(set(old_settings) | set(settings))
        changed = [
            f"{k}: {old_settings.get(k)!r:.80} there, {settings.get(k)!r:.80} now"
            for k in keys
            if old_settings.get(k) != settings.get(k)
        ]
        raise UserError(
            f"{cfg.data_dir} holds shards made with other settings ({'; '.join(changed)}): "
            f"pass --overwrite to replace them, or choose another --data_dir"
        )
    shards = []
    for entry in old_shards:
        if not shard_is_intact(os.path.join(cfg.data_dir, entry["file"]), entry["tokens"]):
            print(f"{entry['file']} is missing or damaged: writing it again, and what follows it")
            break
        shards.append(entry)
    return None if meta.get("complete") and len(shards) == len(old_shards) else shards


def resume_position(shards):
    if not shards:
        return Position()
    last = shards[-1]
    return Position(last["next_row"], last["next_offset"], last["stream_state"], last["stream_skip"])


# ---- the pipeline -----------------------------------------------------------------------------
def show_progress(bar, writer, num_rows):
    """Tokens on the bar; its total (for the ETA) is --max_tokens, or else estimated from the rows read."""
    if writer.cfg.max_tokens is None and num_rows and writer.position.row:
        bar.total = round(writer.tokens * num_rows / writer.position.row)
    bar.set_postfix(docs=f"{writer.docs + writer.shard_docs:,}", shards=len(writer.meta["shards"]), refresh=False)
    bar.update(writer.tokens - bar.n)


def tokenize(cfg):
    """Write the shards of cfg's input into cfg.data_dir; returns a one-line summary."""
    files = resolve_data_files(cfg.data_files) if cfg.data_files else None
    check_data_dir_apart(cfg, files)  # before anything in it is deleted or written
    tokenizer = get_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise UserError(
            f"tokenizer {cfg.tokenizer} has {tokenizer.vocab_size:,} ids, but shards hold uint16 ids (at most 65,536): "
            f"train one with `python tokenizer.py train --vocab_size 65536` or fewer"
        )
    settings = settings_for(cfg, files, tokenizer)
    buffers = shard_buffers(cfg.shard_size)  # before completed_shards, which may delete (--overwrite)
    shards = completed_shards(cfg, settings)
    if shards is None:
        return f"{cfg.data_dir} is complete already (see its meta.json): nothing to do; --overwrite redoes it"
    start, start_shard = resume_position(shards), len(shards)
    if files:
        rows, num_rows, stream_state = local_rows(files, cfg.text_field, start.row), local_row_count(files), no_state
    else:
        hub = HubSource(cfg.dataset, cfg.name, cfg.split, cfg.text_field, cfg.streaming, cfg.cache_dir)
        ds = hub_dataset(hub)
        rows = hub_rows(hub, ds, start.row, start.stream_state, start.stream_skip)
        num_rows = hub_row_count(hub, ds)
        stream_state = partial(json_state, ds) if cfg.streaming else no_state

    writer = ShardWriter(cfg, settings, shards, start, buffers)
    tokens_before, t0 = writer.tokens, time.perf_counter()
    bar = tqdm(total=cfg.max_tokens, initial=writer.tokens, unit="tok", unit_scale=True, desc="tokenizing")
    batches = document_batches(rows, start, stream_state)
    with bar, closing(encoded_batches(tokenizer, batches, cfg.num_proc)) as encoded:
        for batch, (tokens, lengths) in encoded:
            writer.write(batch, tokens, lengths)
            show_progress(bar, writer, num_rows)
            if writer.done():
                break
    writer.finish()

    seconds = time.perf_counter() - t0
    new_tokens = writer.tokens - tokens_before
    resumed = f"resumed at shard {start_shard}, " if start_shard else ""
    shards = writer.meta["shards"]
    summary = (
        f"{cfg.data_dir}: {len(shards)} shards, {writer.tokens:,} tokens, {writer.docs:,} documents "
        f"({writer.empty_docs:,} empty skipped); {resumed}{new_tokens:,} tokens in {seconds:.1f}s "
        f"({new_tokens / seconds / 1e6:.2f}M tokens/s)"
    )
    if len(shards) == 1:
        summary += ". Warning: all of it is the val shard; lower --shard_size to get train shards"
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help=f"Hugging Face dataset id or dataset folder (default: {DEFAULT_DATASET})")
    parser.add_argument("--name", help=f"the dataset's config (default: {DEFAULT_NAME} for {DEFAULT_DATASET})")
    parser.add_argument("--split", help="the dataset's split (default: train)")
    parser.add_argument("--text_field", default="text", help="column or JSON field holding the text (default: text)")
    parser.add_argument("--tokenizer", default=GPT2, help="gpt2 (default), or a folder written by tokenizer.py train")
    parser.add_argument("--data_files", nargs="+", metavar="PATH", help="local files, folders or globs (no network)")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it first")
    parser.add_argument("--cache_dir", help="where datasets keeps downloads (default: ~/.cache/huggingface/datasets)")
    parser.add_argument(
        "--data_dir",
        default=Config.data_dir,
        help="shard folder to write, train_gpt2.py's --data_dir (default: edu_fineweb10B beside this)",
    )
    parser.add_argument("--prefix", default=Config.prefix, help="shard file name prefix (default: edufineweb)")
    parser.add_argument("--shard_size", type=parse_count, default=Config.shard_size, help="tokens per shard (1e8)")
    parser.add_argument("--max_tokens", type=parse_count, help="stop after this many tokens (small demos)")
    parser.add_argument("--num_proc", type=int, default=available_cores(), help="encoding threads (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier run in --data_dir")
    cfg = Config(**vars(parser.parse_args(argv)))
    if cfg.data_files:
        hub_flags = [f"--{flag}" for flag in ("dataset", "name", "split") if getattr(cfg, flag)]
        if hub_flags:
            raise UserError(f"--data_files reads local files: drop {', '.join(hub_flags)}")
    elif cfg.dataset is None:
        cfg.dataset, cfg.name = DEFAULT_DATASET, cfg.name or DEFAULT_NAME
    cfg.split = cfg.split or (None if cfg.data_files else "train")
    if cfg.num_proc < 1:
        raise UserError("--num_proc must be at least 1")
    if cfg.shard_size > MAX_SHARD_SIZE:
        raise UserError(
            f"--shard_size {cfg.shard_size:,} tokens is more than {MAX_SHARD_SIZE:,} (2**31): the writer holds two "
            f"shards in memory, 2 bytes a token; the default, 1e8, is 200 MB a shard"
        )
    return cfg


@exit_on_error
def main(argv=None):
    cfg = parse_args(argv)
    try:
        print(tokenize(cfg))
    except KeyboardInterrupt:
        raise UserError("interrupted: re-run the same command to resume after the last complete shard")


if __name__ == "__main__":
    main()
