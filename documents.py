"""
Reading documents: the rows of local text files, or of a Hugging Face dataset, one at a time.

    from documents import read_rows
    for text in read_rows(["path/to/parquet_folder"]):       # str, or None for a null document
        ...
    read_rows(dataset="HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train", streaming=True)
    read_rows(["chats.jsonl"], text_field=None)               # whole records (dicts), as finetune.py reads them

Local files (files, folders or globs; no network needed): .parquet (column text_field), .jsonl /
.json (field text_field of one JSON object per line, or of one array of objects), .txt (a whole
file is one document, like tinyshakespeare); .jsonl.gz, .json.gz and .txt.gz too. Text comes as
stored: a byte-order mark dropped, "\\r\\n" kept. A bad file is a UserError naming it (and the row).

fineweb.py, tokenizer.py and finetune.py read their text here. For fineweb.py's resume, a reader can
start after its first `skip` rows (parquet skips whole row groups unread), and a stream from the hub
can jump to a state_dict() saved earlier instead of streaming every row before it again.
"""

import argparse
import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from itertools import islice

from errors import UserError

DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"  # the dataset of build-nanogpt's 10B-token recipe
DEFAULT_NAME = "sample-10BT"
LOCAL_FORMATS = (".parquet", ".jsonl", ".json", ".txt")


# ---- local files ------------------------------------------------------------------------------
def local_format(path):
    """'.parquet', '.jsonl', '.json' or '.txt' (looking through a .gz suffix), or None."""
    base, ext = os.path.splitext(path.lower())
    if ext == ".gz":
        base, ext = os.path.splitext(base)
        return ext if ext in (".jsonl", ".json", ".txt") else None  # parquet compresses itself
    return ext if ext in LOCAL_FORMATS else None


def files_in(path):
    """A supported file, or the supported files below a folder, sorted by path."""
    if os.path.isfile(path):
        return [path] if local_format(path) else []
    found = glob.glob(os.path.join(path, "**", "*"), recursive=True)  # skips hidden files like .gitattributes
    return sorted(p for p in found if os.path.isfile(p) and local_format(p))


def resolve_data_files(patterns):
    """The input files in order: each pattern is a file, a folder or a glob (its matches sorted)."""
    files = []
    for pattern in patterns:
        if os.path.exists(pattern):
            found = files_in(pattern)
        elif any(c in pattern for c in "*?["):
            found = [f for match in sorted(glob.glob(pattern, recursive=True)) for f in files_in(match)]
        else:
            raise UserError(f"--data_files {pattern}: no such file or folder")
        if not found:
            raise UserError(f"--data_files {pattern}: no files matched (supported: {', '.join(LOCAL_FORMATS)})")
        files += found
    return files


def open_parquet(path):
    # imported here: training imports this file (through tokenizer.py) and needs no pyarrow
    import pyarrow.parquet as pq

    try:
        # buffered reads: memory holds a few MB of the file, not a whole (possibly huge) row group
        return pq.ParquetFile(path, buffer_size=2**22, pre_buffer=False)
    except Exception as e:  # pyarrow says ArrowInvalid or OSError for bytes that are not parquet
        raise UserError(f"{path}: not a readable parquet file ({e})")


def check_text(text, where, text_field):
    """text, if it is a str or None (a null document); else a UserError saying where it is. With
    text_field None the readers hand out whole records (finetune.py reads chat rows so), unchecked."""
    if text is None or isinstance(text, str) or text_field is None:
        return text
    raise UserError(
        f"{where}: field {text_field!r} holds {type(text).__name__} {text!r:.40}, not text: "
        f"pass --text_field with the field that holds the documents' text"
    )


def parquet_rows(path, text_field, skip):
    """Texts of a parquet file after its first `skip` rows (whole rows, as dicts, with text_field
    None); returns the file's row count."""
    parquet = open_parquet(path)
    columns = parquet.schema_arrow.names
    if text_field is not None and text_field not in columns:
        raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(columns)}): pass --text_field")
    # skip whole row groups by their metadata, so resuming deep into a file reads little of it
    group, row = 0, 0  # row: the file's row of the next record batch's first text
    while group < parquet.num_row_groups and skip >= parquet.metadata.row_group(group).num_rows:
        skip -= parquet.metadata.row_group(group).num_rows
        row += parquet.metadata.row_group(group).num_rows
        group += 1
    if group < parquet.num_row_groups:
        row_groups = range(group, parquet.num_row_groups)
        read = None if text_field is None else [text_field]
        for record_batch in parquet.iter_batches(batch_size=1024, row_groups=row_groups, columns=read):
            texts = record_batch.to_pylist() if text_field is None else record_batch.column(0).to_pylist()
            for i in range(skip, len(texts)):
                yield check_text(texts[i], f"{path} row {row + i}", text_field)
            skip, row = max(0, skip - len(texts)), row + len(texts)
    return parquet.metadata.num_rows


def is_gzip(path):
    return path.lower().endswith(".gz")


def open_text(path):
    """UTF-8 text as stored: a byte-order mark dropped, but "\r\n" kept (the tokens should see the file's bytes)."""
    opener = gzip.open if is_gzip(path) else open
    return opener(path, "rt", encoding="utf-8-sig", newline="")


def check_gzip(path):
    """Decompress a .gz file to nowhere. gzip finds a cut-off file or a wrong CRC only at its very end,
    after a reader has handed out most of it: checking first, a damaged file hands out no row at all
    (no shard of fineweb.py holds part of it). The extra pass costs little: zlib inflates some 10x
    faster than one core tokenizes."""
    with gzip.open(path, "rb") as f:
        while f.read(2**24):
            pass


def json_rows(path, text_field, skip):
    """Texts of a .jsonl/.json file after its first `skip` rows; returns the file's row count.
    A row is a non-blank line holding a JSON object, or an element of a top-level JSON array."""
    with open_text(path) as f:
        is_array = f.read(256).lstrip().startswith("[")
        f.seek(0)
        if is_array:  # a top-level array is parsed whole: convert big ones to .jsonl to keep memory flat
            try:
                items = enumerate(json.load(f), 1)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: not valid JSON ({e})")
        else:
            items = ((number, line) for number, line in enumerate(f, 1) if line.strip())
        rows = 0
        for number, item in items:
            rows += 1
            if rows <= skip:
                continue  # resuming: counting lines is enough, no need to parse them
            try:
                record = item if is_array else json.loads(item)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e})")
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, not {type(record).__name__}")
            if text_field is None:
                yield record
                continue
            if text_field not in record:
                raise UserError(
                    f"{path}:{number}: no field {text_field!r} (fields: {', '.join(record)}): pass --text_field"
                )
            yield check_text(record[text_field], f"{path}:{number}", text_field)
    return rows


def txt_rows(path, text_field, skip):
    """A .txt file is one document; returns the row count, 1."""
    if not skip:
        with open_text(path) as f:
            yield f.read()
    return 1


def local_rows(files, text_field, skip):
    """Texts (or None) of all files in order, after the first `skip` rows."""
    readers = {".parquet": parquet_rows, ".jsonl": json_rows, ".json": json_rows, ".txt": txt_rows}
    for path in files:
        try:
            if is_gzip(path):
                check_gzip(path)
            rows_in_file = yield from readers[local_format(path)](path, text_field, skip)
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e})")
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # cut off; corrupt; not gzip at all
            raise UserError(
                f"{path}: damaged gzip file ({e}): download or compress it again (`gzip -t {path}` checks it)"
            )
        skip = max(0, skip - rows_in_file)


def local_row_count(files):
    """Rows in the files if their metadata says so cheaply (parquet, txt), else None."""
    if any(local_format(path) in (".jsonl", ".json") for path in files):
        return None
    return sum(open_parquet(p).metadata.num_rows if local_format(p) == ".parquet" else 1 for p in files)


# ---- the Hugging Face hub ---------------------------------------------------------------------
@dataclass
class HubSource:
    """A dataset on the Hugging Face hub (or a dataset folder on disk), and how to read it."""

    dataset: str  # e.g. DEFAULT_DATASET
    name: str = None  # the dataset's config: DEFAULT_NAME for FineWeb-Edu
    split: str = None
    text_field: str = "text"  # None: whole records (dicts)
    streaming: bool = False  # rows as they download, instead of the whole dataset on disk first
    cache_dir: str = None  # where `datasets` keeps downloads (default ~/.cache/huggingface/datasets)


def hub_unreachable(hub, error):
    return (
        f"could not reach the Hugging Face hub for {hub.dataset} ({type(error).__name__}: {error}). Offline, "
        f"pass local files with --data_files; behind a slow or blocked hub, use a mirror: HF_ENDPOINT=<mirror url>"
    )


def hub_dataset(hub):
    """The dataset from the hub: downloaded once and memory-mapped, or a stream with hub.streaming."""
    import datasets  # imported here: a second of startup that local files do not need

    try:
        ds = datasets.load_dataset(
            hub.dataset, hub.name, split=hub.split, streaming=hub.streaming, cache_dir=hub.cache_dir
        )
    except FileNotFoundError as e:  # DatasetNotFoundError, DataFilesNotFoundError
        raise UserError(f"--dataset {hub.dataset}: not found ({e}). For local files use --data_files")
    except ValueError as e:  # unknown config or split: datasets names those that exist
        raise UserError(f"--dataset {hub.dataset}: {e}")
    except OSError as e:  # ConnectionError, HTTP errors, timeouts
        raise UserError(hub_unreachable(hub, e))
    if hub.text_field is None or ds.column_names is None:  # whole records; or a stream that names no columns
        return ds
    if hub.text_field not in ds.column_names:
        raise UserError(
            f"{hub.dataset} has no column {hub.text_field!r} (columns: {', '.join(ds.column_names)}): pass --text_field"
        )
    return ds.select_columns([hub.text_field])


def hub_rows(hub, ds, skip=0, stream_state=None, stream_skip=0):
    """Texts of a hub dataset after its first `skip` rows (whole rows, as dicts, with text_field None).
    A stream given stream_state, its state_dict() at some row at or before `skip`, jumps there and
    skips stream_skip rows more, instead of streaming all `skip` rows again."""
    field = (lambda record: record) if hub.text_field is None else (lambda record: record[hub.text_field])
    if not hub.streaming and hub.text_field is None:
        rows = iter(ds.skip(skip))
    elif not hub.streaming:  # a column at a time: much faster than formatting each row as a dict
        rows = (text for batch in ds.skip(skip).iter(batch_size=1024) for text in batch[hub.text_field])
    elif stream_state is not None and loads_state(ds, stream_state):
        rows = islice((field(record) for record in ds), stream_skip, None)
    else:
        rows = islice((field(record) for record in ds), skip, None)
    try:
        for row, text in enumerate(rows, skip):
            yield check_text(text, f"{hub.dataset} row {row}", hub.text_field)
    except UserError:
        raise
    except KeyError:
        raise UserError(f"{hub.dataset} has no column {hub.text_field!r}: pass --text_field")
    except Exception as e:  # the network failing hours into a stream: the shards so far are kept
        raise UserError(f"{hub_unreachable(hub, e)}. Re-run the same command to resume after the last complete shard")


def hub_row_count(hub, ds):
    """Rows in the dataset, or None for a stream whose metadata does not say."""
    if not hub.streaming:
        return len(ds)
    splits = ds.info.splits
    return splits[hub.split].num_examples if splits and hub.split in splits else None


# ---- where a stream is, for resuming ----------------------------------------------------------
def loads_state(ds, state):
    """Point a stream at a saved state: it jumps over whole files instead of streaming them again."""
    try:
        ds.load_state_dict(state)
        return True
    except Exception as e:  # a state saved by another version of datasets
        print(f"cannot restore the stream's state ({e!r}): skipping rows from the start instead")
        return False


def json_state(ds):
    """A stream's state_dict() as meta.json will hold it, or None (then a resume skips rows)."""
    try:
        return json.loads(json.dumps(ds.state_dict()))
    except (TypeError, ValueError):
        return None


def no_state():
    return None  # local files and downloaded datasets resume from a row number alone


# ---- either source ----------------------------------------------------------------------------
def read_rows(data_files=None, dataset=None, name=None, split=None, text_field="text", streaming=False):
    """The rows of local files, or else of a hub dataset, from the start: what other scripts read
    text with (tokenizer.py train, finetune.py). text_field None: whole records (dicts)."""
    if data_files:
        return local_rows(resolve_data_files(data_files), text_field, 0)
    hub = HubSource(dataset, name, split, text_field, streaming)
    return hub_rows(hub, hub_dataset(hub))


def parse_count(text):
    """'100000000', '1e8' or '100_000_000' -> 100000000: the argparse type of the counts that the
    scripts reading documents take (tokenizer.py --max_chars, fineweb.py --shard_size, --max_tokens)."""
    try:
        value = float(text.replace("_", ""))
        if value >= 1 and value == int(value):
            return int(value)
    except (ValueError, OverflowError):  # not a number, or inf
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number (1e6-style is fine)")
