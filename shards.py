"""
Token shards: the file contract between fineweb.py, which writes them, and dataloader.py, which reads them.

    edu_fineweb10B/edufineweb_val_000000.npy      shard 0 is the validation split
    edu_fineweb10B/edufineweb_train_000001.npy    then train shards, each a 1-D uint16 array (np.save)

llm.c's `.bin` shards are read too (a header of 256 int32: magic 20240520, version 1, token count;
then the uint16 tokens), so data prepared for llm.c or modded-nanogpt works as it is.
"""

import glob
import json
import os

import numpy as np

from errors import UserError
from tokenizer import GPT2, get_tokenizer

DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "edu_fineweb10B")
TOKEN_DTYPE = np.dtype("<u2")  # token ids below 65,536 (GPT-2's are < 50,257): half the disk of int32
SPLITS = ("val", "train")
EXTENSIONS = (".npy", ".bin")
# llm.c's .bin shards: 256 int32 header words (magic, version, token count, zeros), then the tokens.
LLMC_MAGIC = 20240520
LLMC_VERSION = 1  # version 2 holds uint32 tokens (llm.c's Llama 3 data): not supported
LLMC_HEADER_INTS = 256


def shard_tokenizer(data_dir):
    """{"name", "hash"} of the tokenizer the shards in data_dir were written with, from the meta.json
    fineweb.py writes beside them; None where there is none (shards from llm.c or other tools)."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            recorded = json.load(f)["settings"]["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return recorded if isinstance(recorded, dict) else {"name": recorded, "hash": None}


def tokenizer_for(data_dir, name="auto"):
    """The tokenizer to train on the shards in data_dir with: `name`, which must be the one they were
    written with (auto: that one; gpt2 for shards that record none)."""
    recorded = shard_tokenizer(data_dir)
    name = name if name != "auto" else (recorded["name"] if recorded else GPT2)
    tokenizer = get_tokenizer(name)
    if recorded and recorded["hash"] and recorded["hash"] != tokenizer.hash:
        raise UserError(
            f"the shards in {data_dir} were written with tokenizer {recorded['name']} (hash {recorded['hash']}), "
            f"--tokenizer {name} is another one (hash {tokenizer.hash}): train with the shards' tokenizer "
            f"(--tokenizer auto), or write the shards again with `python fineweb.py --tokenizer {name}`"
        )
    return tokenizer


def shard_name(prefix, index):
    """fineweb.py's file name of shard `index`: shard 0 is the validation split."""
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def shard_patterns(split=None):
    """Glob patterns of the shard files of one split (or of both): what the data loader picks up."""
    return [f"*_{s}_*{ext}" for s in ([split] if split else SPLITS) for ext in EXTENSIONS]


def files_matching(folder, patterns):
    return sorted({path for pattern in patterns for path in glob.glob(os.path.join(folder, pattern))})


def find_shards(data_dir, split):
    """The split's shard files in data_dir, sorted by name (fineweb.py's names sort by index)."""
    if not os.path.isdir(data_dir):
        raise UserError(
            f"data folder {data_dir} not found: run `python fineweb.py` to write the token shards, "
            f"or pass --data_dir with the folder that holds them"
        )
    shards = files_matching(data_dir, shard_patterns(split))
    if not shards:
        raise UserError(
            f"no {split} shards ({' or '.join(shard_patterns(split))}) in {data_dir}: "
            f"run `python fineweb.py`, or pass --data_dir with the folder that holds them"
        )
    return shards


def npy_layout(path):
    """(byte offset of the first token, number of tokens) of a .npy shard, checked against the file."""
    with open(path, "rb") as f:
        try:
            major, _ = np.lib.format.read_magic(f)
            if major not in (1, 2):  # version 3 only differs for structured dtypes, never token arrays
                raise ValueError(f".npy format version {major}")
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
        except ValueError as e:
            raise UserError(f"shard {path} is not a .npy file written by np.save ({e}): re-run fineweb.py")
        offset = f.tell()
    if len(shape) != 1:
        raise UserError(f"shard {path} holds an array of shape {shape}; a shard must be 1-D (one token stream)")
    if dtype != TOKEN_DTYPE:
        raise UserError(
            f"shard {path} holds {dtype} values; expected uint16 token ids as fineweb.py writes them "
            f"(convert with `np.save(path, tokens.astype(np.uint16))` if every id is below 65,536)"
        )
    return offset, check_file_size(path, offset, shape[0])


def bin_layout(path):
    """(byte offset of the first token, number of tokens) of an llm.c .bin shard, header checked."""
    header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
    if len(header) < LLMC_HEADER_INTS:
        raise UserError(f"shard {path} is shorter than llm.c's header of {LLMC_HEADER_INTS} int32: truncated file")
    magic, version, n_tokens = (int(v) for v in header[:3])
    if magic != LLMC_MAGIC:
        raise UserError(f"shard {path} is not an llm.c token file: magic number {magic}, expected {LLMC_MAGIC}")
    if version != LLMC_VERSION:
        raise UserError(
            f"shard {path} is llm.c format version {version}; only version {LLMC_VERSION} (uint16 tokens) is supported"
        )
    return header.nbytes, check_file_size(path, header.nbytes, n_tokens)


def check_file_size(path, offset, n_tokens):
    """n_tokens, once the file is exactly its header plus n_tokens uint16 values."""
    expected, actual = offset + n_tokens * TOKEN_DTYPE.itemsize, os.path.getsize(path)
    if actual != expected:
        raise UserError(
            f"shard {path} is {actual:,} bytes, but its header announces {n_tokens:,} tokens "
            f"({expected:,} bytes): the file is truncated or corrupt; write it again"
        )
    return n_tokens


def shard_layout(path):
    """(byte offset of the first token, number of tokens) of a .npy or .bin shard."""
    return bin_layout(path) if path.endswith(".bin") else npy_layout(path)


def read_tokens(path, offset, start, n):
    """Tokens start .. start+n of a shard, memory-mapped (nothing is read until the array is used)."""
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=offset + start * TOKEN_DTYPE.itemsize, shape=(n,))


def check_token_ids(path, offset, n_tokens, vocab_size):
    """Every id of a shard below vocab_size, or a UserError naming the shard and the first bad id.
    One pass over a memory map: about a tenth of a second per 100M-token shard in the page cache."""
    tokens = read_tokens(path, offset, 0, n_tokens)
    largest = int(tokens.max()) if n_tokens else 0
    if largest >= vocab_size:
        where = int(np.argmax(tokens >= vocab_size))
        raise UserError(
            f"shard {path} holds token id {int(tokens[where])} at position {where:,}, but the model's vocabulary has "
            f"{vocab_size:,} ids (0 .. {vocab_size - 1}): the shard was written with another tokenizer or is "
            f"corrupt; write it again with fineweb.py (and the tokenizer you train with)"
        )
