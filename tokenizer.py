"""
Tokenizers: text <-> token ids, behind one small interface that every script uses.

    from tokenizer import get_tokenizer
    tok = get_tokenizer("gpt2")           # OpenAI's GPT-2 BPE, through tiktoken
    tok = get_tokenizer("log/tok")        # a BPE trained here, loaded from its folder (offline)
    ids = tok.encode("Hello world")       # [15496, 995] with GPT-2
    tok.decode(ids), tok.eot, tok.vocab_size, tok.hash, tok.special("<|assistant|>")

Train a byte-level BPE of your own on any text fineweb.py can read, then look at it:

    python tokenizer.py train --data_files path/to/parquet_folder --vocab_size 32768 --out_dir log/tok
    python tokenizer.py encode --tokenizer log/tok "Hello world"
    python tokenizer.py compare --tokenizer log/tok --data_files path/to/held_out.parquet

GPT-2's BPE has 50,000 merges on top of the 256 single bytes, plus one special token,
<|endoftext|> (id 50256), which fineweb.py puts before every document. tiktoken downloads its two
files on first use; offline, set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached copies.

A trained tokenizer's ids and folder: docs/tokenizer.md.
"""

import argparse
import base64
import binascii
import hashlib
import itertools
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import version

import numpy as np
import regex  # \p{L} and friends; installed with tiktoken, which uses it too
import tiktoken
from tqdm import tqdm

from documents import DEFAULT_DATASET, DEFAULT_NAME, parse_count, read_rows, resolve_data_files
from errors import UserError, exit_on_error

GPT2 = "gpt2"
# GPT-2's BPE plus CHAT_TOKENS at ids 50,257-50,260: rows the model's embedding already has (it is
# padded to 50,304 rows, model.py), so fine-tuning GPT-2 into a chat model needs no new rows.
GPT2_CHAT = "gpt2-chat"
# GPT-4's split pattern (tiktoken's cl100k_base, rustbpe's default) rather than GPT-2's: it matches
# contractions in any case ("DON'T"), splits numbers into groups of at most 3 digits (GPT-2 learns a
# token for "2019" and for every other frequent number), and keeps a run of spaces or newlines apart
# from the word after it, except for one space. We keep its 3-digit groups (nanochat uses 1-2 at 65K
# ids): at 32K-50K ids 3-digit numbers are affordable, and the pattern stays one many people have
# studied. One change of spelling, not of meaning: GPT-4 writes two possessive quantifiers,
# `[^\r\n\p{L}\p{N}]?+` and `[^\s\p{L}\p{N}]++`. Backtracking into them could never rescue a match
# (the character given back is no letter, and [\r\n]* also matches nothing), so plain `?` and `+`
# split every text the same way (test_tokenizer checks it), and tiktoken encodes ~20% faster with them.
PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # for chat fine-tuning
SPECIAL_TOKENS = ("<|endoftext|>", *CHAT_TOKENS, *(f"<|reserved_{i}|>" for i in range(4)))
MAX_VOCAB_SIZE = 2**32  # ids are uint32 in tiktoken and rustbpe (fineweb.py's shards: uint16 up to 65,536)
RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"


def clean_text(text):
    """text with lone surrogates (a JSON "\\ud800", which UTF-8 cannot hold) replaced by U+FFFD,
    as tiktoken's encode_ordinary does; valid surrogate pairs become the character they stand for."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# ---- BPE, the idea: readable Python, the oracle for the fast trainer ---------------------------
def merge(ids, pair, new_id):
    """ids with each occurrence of pair, taken left to right without overlap, replaced by new_id."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return tuple(out)


def train_bpe_python(texts, num_merges, pattern=PATTERN):
    """Learn num_merges BPE merges from texts, slowly and readably: {token bytes: id}, the 256 bytes
    first, then each merged token in the order it was learned. train_bpe is tested against this."""
    # 1. Split each text into chunks with the regex. Merges never cross a chunk boundary, so a chunk
    #    is a "word" and only its count matters (" the" is one word seen thousands of times).
    chunk_counts = Counter(chunk for text in texts for chunk in regex.findall(pattern, clean_text(text)))
    words = {tuple(chunk.encode()): count for chunk, count in chunk_counts.items()}  # bytes are ids 0-255
    vocab = [bytes([b]) for b in range(256)]  # id -> the bytes it stands for
    for new_id in range(256, 256 + num_merges):
        # 2. Count adjacent pairs in every word, weighted by the word's count. Like rustbpe, count
        #    overlapping pairs: "aaa" holds (a, a) twice, though merging it makes one "aa".
        pair_counts = Counter()
        for ids, count in words.items():
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break  # every word is a single token: this text allows no more merges
        # 3. Merge the most frequent pair everywhere. A tie goes to the smallest pair of ids (left id,
        #    then right id), which is what rustbpe's heap does (and Hugging Face tokenizers' too), so
        #    both trainers learn exactly the same merges.
        pair = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        words = {merge(ids, pair, new_id): count for ids, count in words.items()}
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
    return {token: rank for rank, token in enumerate(vocab)}


# ---- BPE, fast ---------------------------------------------------------------------------------
def train_bpe(texts, num_merges, pattern=PATTERN):
    """The merges train_bpe_python learns, from rustbpe: the same algorithm in Rust, splitting and
    counting on all cores, ~1 s for 10 MB of text at any vocabulary size we use. Chosen over Hugging
    Face tokenizers, which learns the same merges 3x slower here (docs/benchmarks.md, "tokenizer.py").
    rustbpe counts in 32-bit integers: plenty for the few billion characters a tokenizer needs."""
    import rustbpe  # imported here: only training needs it

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(map(clean_text, texts), vocab_size=256 + num_merges, pattern=pattern)
    return {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}


def num_merges_for(vocab_size):
    """Merges to learn for vocab_size ids in all: 256 bytes + merges + the special tokens."""
    smallest = 256 + len(SPECIAL_TOKENS)
    if not smallest <= vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(
            f"--vocab_size {vocab_size} must be from {smallest} (256 bytes + {len(SPECIAL_TOKENS)} special "
            f"tokens) to 2**32 = {MAX_VOCAB_SIZE:,} (ids are uint32)"
        )
    return vocab_size - smallest


def special_token_ids(vocab_size):
    """{name: id} of SPECIAL_TOKENS, the top len(SPECIAL_TOKENS) ids of the vocabulary, in order."""
    first = vocab_size - len(SPECIAL_TOKENS)
    return {name: first + i for i, name in enumerate(SPECIAL_TOKENS)}


def train_tokenizer(texts, vocab_size, name="trained"):
    """A Tokenizer of vocab_size ids, its merges learned from texts (any iterable of str)."""
    num_merges = num_merges_for(vocab_size)
    texts = (text for text in texts if text)
    first = next(texts, None)
    if first is None:
        raise UserError("no text to train on: the input is empty (or all its documents are)")
    ranks = train_bpe(itertools.chain([first], texts), num_merges)
    if len(ranks) < 256 + num_merges:
        raise UserError(
            f"this text allows only {len(ranks) - 256:,} merges, but --vocab_size {vocab_size} needs "
            f"{num_merges:,}: give more text, or ask for at most {len(ranks) + len(SPECIAL_TOKENS)} ids"
        )
    return Tokenizer(make_encoding(name, PATTERN, ranks, special_token_ids(vocab_size)), name)


# ---- the interface -----------------------------------------------------------------------------
def make_encoding(name, pattern, ranks, special_tokens):
    """A tiktoken Encoding: tiktoken encodes with any ranks, as fast as with GPT-2's."""
    return tiktoken.Encoding(
        name=os.path.basename(os.path.normpath(name)),
        pat_str=pattern,
        mergeable_ranks=ranks,
        special_tokens=special_tokens,
        explicit_n_vocab=len(ranks) + len(special_tokens),  # tiktoken checks the ids leave no gap
    )


def ranks_text(ranks):
    """The ranks as a .tiktoken file holds them: one "<base64 of the bytes> <id>" line per token."""
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in by_rank)


def content_hash(pattern, ranks, special_tokens):
    """16 hex digits of sha256 over what decides the ids of every text: pattern, ranks, special tokens."""
    digest = hashlib.sha256()
    digest.update(json.dumps(pattern).encode() + b"\n")
    digest.update(ranks_text(ranks).encode())
    digest.update(json.dumps(sorted(special_tokens.items(), key=lambda x: x[1])).encode())
    return digest.hexdigest()[:16]


class Tokenizer:
    """A tiktoken Encoding with the few things the rest of the repo asks of a tokenizer."""

    def __init__(self, encoding, name):
        self.encoding = encoding
        self.name = name  # "gpt2", or the folder a trained tokenizer was loaded from
        self.eot = encoding.eot_token  # <|endoftext|>: separates documents
        self.vocab_size = encoding.n_vocab  # ids are 0 .. vocab_size - 1
        specials = {text: encoding.encode_single_token(text) for text in encoding.special_tokens_set}
        self.special_tokens = dict(sorted(specials.items(), key=lambda item: item[1]))  # {name: id}, by id

    def encode(self, text):
        """Token ids of text, list of int. Special-token text ("<|endoftext|>") inside ordinary text
        is encoded as plain text: data can never inject a document separator."""
        return self.encoding.encode_ordinary(text)

    def encode_to_numpy(self, text):
        """encode(text) as a (T,) uint32 array. encode_to_numpy skips building a Python list of ints,
        the part of encoding that holds the GIL, so threads encode in parallel (fineweb.py)."""
        try:
            return self.encoding.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # a lone surrogate: replace it, as encode_ordinary does
            return self.encoding.encode_to_numpy(clean_text(text), disallowed_special=())

    def decode(self, ids):
        """Text of token ids; bytes that do not form valid UTF-8 (a cut multi-byte character) become U+FFFD."""
        return self.encoding.decode(list(ids))

    def special(self, name):
        """The id of special token `name`, e.g. special("<|assistant|>")."""
        if name not in self.special_tokens:
            raise UserError(
                f"the {self.name} tokenizer has no special token {name!r} (it has "
                f"{', '.join(sorted(self.special_tokens))}): chat tokens come with `python tokenizer.py train`"
            )
        return self.special_tokens[name]

    @cached_property
    def hash(self):
        """content_hash of this tokenizer: equal hashes, equal ids for every text."""
        # tiktoken keeps what an Encoding was built from in these attributes (it has no public getter)
        return content_hash(self.encoding._pat_str, self.encoding._mergeable_ranks, self.encoding._special_tokens)

    def token_bytes(self):
        """(vocab_size,) int64: the UTF-8 bytes each token stands for, 0 for special tokens. The
        denominator of bits per byte, which compares models with different tokenizers."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        specials = set(self.special_tokens.values())
        for token in range(self.vocab_size):
            if token not in specials:
                lengths[token] = len(self.encoding.decode_single_token_bytes(token))
        return lengths

    def bytes_per_token(self, texts):
        """UTF-8 bytes per token over texts: how much this tokenizer compresses them (higher is better)."""
        texts = [clean_text(text) for text in texts]
        tokens = sum(len(self.encode_to_numpy(text)) for text in texts)
        return sum(len(text.encode()) for text in texts) / tokens

    def save(self, out_dir, training):
        """Write this tokenizer's folder, with `training` (a dict: how it was made) in its tokenizer.json.
        Both files go into a temporary folder beside out_dir first, which is then renamed to out_dir:
        a crash or Ctrl-C leaves the old folder (or none), never a half-written one."""
        check_out_dir(out_dir)
        meta = {
            "hash": self.hash,
            "vocab_size": self.vocab_size,
            "pattern": self.encoding._pat_str,
            "special_tokens": self.special_tokens,
            "training": training,
        }
        out_dir = os.path.normpath(out_dir)
        tmp_dir, old_dir = f"{out_dir}.tmp-{os.getpid()}", f"{out_dir}.old-{os.getpid()}"
        try:
            os.makedirs(tmp_dir)
            write_synced(os.path.join(tmp_dir, RANKS_FILE), ranks_text(self.encoding._mergeable_ranks))
            write_synced(os.path.join(tmp_dir, META_FILE), json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
            if os.path.exists(out_dir):  # a folder cannot be renamed onto a non-empty one: move the old one aside
                os.rename(out_dir, old_dir)
            os.rename(tmp_dir, out_dir)
            shutil.rmtree(old_dir, ignore_errors=True)
        except BaseException as e:  # disk full, permissions, Ctrl-C
            shutil.rmtree(tmp_dir, ignore_errors=True)
            if os.path.exists(old_dir) and not os.path.exists(out_dir):
                os.rename(old_dir, out_dir)  # the old tokenizer back under its name
            if isinstance(e, OSError):
                raise UserError(f"could not write the tokenizer to {out_dir} ({e})") from None
            raise


def write_synced(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def check_out_dir(out_dir):
    """out_dir may be absent, empty, or an earlier tokenizer folder (replaced): anything else is someone's data."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir} is a file: choose a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, META_FILE)):
        raise UserError(f"--out_dir {out_dir} holds files but no {META_FILE}: not a tokenizer folder; choose another")


def read_ranks(path):
    ranks = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    return ranks


def load_tokenizer(folder):
    """The tokenizer saved in folder by Tokenizer.save, checked against the hash it recorded."""
    missing = [name for name in (RANKS_FILE, META_FILE) if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise UserError(
            f"tokenizer folder {folder} is incomplete: {' and '.join(missing)} missing. "
            f"Train it again: python tokenizer.py train --out_dir {folder} ..."
        )
    try:
        with open(os.path.join(folder, META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
        pattern, special_tokens, expected_hash = meta["pattern"], meta["special_tokens"], meta["hash"]
        ranks = read_ranks(os.path.join(folder, RANKS_FILE))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, binascii.Error) as e:
        raise UserError(f"tokenizer folder {folder} is damaged ({type(e).__name__}: {e}): train it again") from None
    actual_hash = content_hash(pattern, ranks, special_tokens)
    if actual_hash != expected_hash:
        raise UserError(
            f"tokenizer folder {folder} is damaged: its files hash to {actual_hash}, but {META_FILE} records "
            f"hash {expected_hash}. Train it again (or restore the folder)"
        )
    # named by its absolute path: checkpoints and meta.json record the name, and must find it from anywhere
    folder = os.path.abspath(folder)
    return Tokenizer(make_encoding(folder, pattern, ranks, special_tokens), folder)


def get_tokenizer(name=GPT2):
    """The tokenizer called `name`: "gpt2" (tiktoken's GPT-2 BPE) or a folder made by `tokenizer.py train`."""
    if not hasattr(tiktoken.Encoding, "encode_to_numpy"):
        raise UserError(f"this repo needs tiktoken >= 0.9 (this is {tiktoken.__version__}): pip install -U tiktoken")
    if name not in (GPT2, GPT2_CHAT):
        if not os.path.isdir(name):
            raise UserError(
                f"unknown tokenizer {name!r}: pass {GPT2!r}, {GPT2_CHAT!r}, or a folder written by "
                f"`python tokenizer.py train`"
            )
        return load_tokenizer(name)
    try:
        encoding = tiktoken.get_encoding(GPT2)
    except Exception as e:  # the BPE files are downloaded on first use
        raise UserError(
            f"could not load the {GPT2} tokenizer ({e}): tiktoken downloads it on first use. "
            f"Offline, set TIKTOKEN_CACHE_DIR to a folder holding its cached BPE files"
        )
    if name == GPT2_CHAT:
        chat_ids = {token: encoding.n_vocab + i for i, token in enumerate(CHAT_TOKENS)}
        encoding = make_encoding(
            GPT2_CHAT, encoding._pat_str, encoding._mergeable_ranks, {**encoding._special_tokens, **chat_ids}
        )
    return Tokenizer(encoding, name)


# ---- reading text: documents.py's readers --------------------------------------------------------
def read_texts(args):
    """The documents of --data_files or --dataset, as documents.py reads them (str, or None for a null row)."""
    return read_rows(args.data_files, args.dataset, args.name, args.split, args.text_field, args.streaming)


def source_of(args):
    """Where the text came from, for tokenizer.json."""
    if args.data_files:
        files = resolve_data_files(args.data_files)
        return {"data_files": [[os.path.abspath(path), os.path.getsize(path)] for path in files]}
    return {"dataset": args.dataset, "name": args.name, "split": args.split}


@dataclass
class Corpus:
    """The non-empty texts of rows (documents.py's readers), at most max_chars characters in all (the
    last text cut short), with a progress bar; counts the documents and characters it hands out."""

    rows: Iterable
    max_chars: int = None
    docs: int = 0
    chars: int = 0

    def __iter__(self):
        with tqdm(total=self.max_chars, unit="char", unit_scale=True, desc="reading text") as bar:
            for text in self.rows:  # str or None: documents.py's readers check the type
                if text and self.max_chars is not None:
                    text = text[: self.max_chars - self.chars]
                if text:
                    self.docs, self.chars = self.docs + 1, self.chars + len(text)
                    bar.update(len(text))
                    yield text
                if self.chars == self.max_chars:
                    return


# ---- the command line ------------------------------------------------------------------------------
def train(args):
    check_out_dir(args.out_dir)  # before minutes of reading, not after
    num_merges_for(args.vocab_size)
    t0 = time.perf_counter()
    corpus = Corpus(read_texts(args), args.max_chars)
    tok = train_tokenizer(corpus, args.vocab_size, args.out_dir)
    source = source_of(args)
    seconds = time.perf_counter() - t0
    training = {
        "trainer": f"rustbpe {version('rustbpe')}",
        "source": source,
        "text_field": args.text_field,
        "max_chars": args.max_chars,
        "docs": corpus.docs,
        "chars": corpus.chars,
        "seconds": round(seconds, 2),
    }
    tok.save(args.out_dir, training)
    print(
        f"{args.out_dir}: {tok.vocab_size:,} ids, hash {tok.hash}, learned from {corpus.chars:,} characters "
        f"of {corpus.docs:,} documents in {seconds:.1f}s"
    )


def shown(piece):
    """A token's bytes as text where they are whole UTF-8 characters, else as bytes: b'\\xe6\\x97'."""
    try:
        return repr(piece.decode())
    except UnicodeDecodeError:
        return repr(piece)


def encode(args):
    tok = get_tokenizer(args.tokenizer)
    ids = tok.encode(args.text)
    print(ids)
    print(" ".join(shown(tok.encoding.decode_single_token_bytes(i)) for i in ids))
    bytes_per_token = len(args.text.encode()) / max(len(ids), 1)
    print(f"{len(ids)} tokens, {bytes_per_token:.2f} bytes/token ({tok.name}, hash {tok.hash})")


def tokens_per_second(toks, texts, repeats=3):
    """Raw encoding speed of each tokenizer on texts: one thread, best of `repeats`, the tokenizers
    taking turns, so that a change in the machine's load (shared cores) hits them all alike."""
    best = [float("inf")] * len(toks)
    for _ in range(repeats):
        for i, tok in enumerate(toks):
            t0 = time.perf_counter()
            tokens = sum(len(tok.encode_to_numpy(text)) for text in texts)
            best[i] = min(best[i], (time.perf_counter() - t0) / tokens)
    return [1 / seconds_per_token for seconds_per_token in best]


def compare(args):
    """Bytes per token and encoding speed of GPT-2 and each --tokenizer on the same documents."""
    texts = [text for text in read_texts(args) if text]
    if not texts:
        raise UserError(f"no text in --data_files {' '.join(args.data_files)}")
    toks = [get_tokenizer(name) for name in [GPT2, *args.tokenizer]]
    print(f"{len(texts):,} documents, {sum(map(len, texts)):,} characters; encoding speed: 1 thread, best of 3")
    speeds = tokens_per_second(toks, texts)
    print(f"{'tokenizer':<30} {'vocab':>7} {'bytes/token':>11} {'vs gpt2':>8} {'tokens/s':>10} {'vs gpt2':>8}")
    gpt2_bpt = toks[0].bytes_per_token(texts)
    for tok, speed in zip(toks, speeds):
        bpt = tok.bytes_per_token(texts)
        compression = f"{bpt:>11.3f} {bpt / gpt2_bpt:>8.3f}"
        print(f"{tok.name:<30} {tok.vocab_size:>7,} {compression} {speed / 1e6:>9.2f}M {speed / speeds[0]:>8.3f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="learn a BPE from text and save it in --out_dir")
    p.add_argument("--data_files", nargs="+", metavar="PATH", help="local files, folders or globs (as fineweb.py)")
    p.add_argument("--dataset", help=f"Hugging Face dataset id (default: {DEFAULT_DATASET})")
    p.add_argument("--name", help=f"the dataset's config (default: {DEFAULT_NAME} for FineWeb-Edu)")
    p.add_argument("--split", help="the dataset's split (default: train)")
    p.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it first")
    p.add_argument("--text_field", default="text", help="column or JSON field holding the text (default: text)")
    p.add_argument("--vocab_size", type=int, default=50257, help="ids in all, special tokens included (GPT-2's 50257)")
    p.add_argument("--out_dir", required=True, help="the tokenizer folder to write")
    p.add_argument("--max_chars", type=parse_count, help="read at most this many characters (1e9-style)")
    p = commands.add_parser("encode", help="show the tokens of a text")
    p.add_argument("--tokenizer", default=GPT2, help="gpt2, or a tokenizer folder")
    p.add_argument("text")
    p = commands.add_parser("compare", help="bytes/token and tokens/s of GPT-2 and --tokenizer on --data_files")
    p.add_argument("--tokenizer", nargs="+", required=True, metavar="DIR", help="tokenizer folders")
    p.add_argument("--data_files", nargs="+", required=True, metavar="PATH", help="local files, folders or globs")
    p.add_argument("--text_field", default="text", help="column or JSON field holding the text (default: text)")
    p.set_defaults(dataset=None, name=None, split=None, streaming=False)  # local files only
    args = parser.parse_args(argv)
    if args.command == "train":
        if args.data_files and (args.dataset or args.name or args.split):
            parser.error("--data_files reads local files: drop --dataset, --name and --split")
        if not args.data_files:
            args.dataset = args.dataset or DEFAULT_DATASET
            args.name = args.name or (DEFAULT_NAME if args.dataset == DEFAULT_DATASET else None)
            args.split = args.split or "train"
    return args


@exit_on_error
def main(argv=None):
    args = parse_args(argv)
    try:
        {"train": train, "encode": encode, "compare": compare}[args.command](args)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: nothing was written")


if __name__ == "__main__":
    main()
