"""
Zero-shot evaluations beyond HellaSwag: LAMBADA and StoryCloze, and the registry train_gpt2.py uses.

    python evals.py lambada --model gpt2                                   # OpenAI's 124M weights
    python evals.py lambada --checkpoint log/model_19073.pt --limit 500
    python evals.py storycloze --model gpt2 --data_dir "cloze_test_test__spring2016 - cloze_test_ALL_test.csv"
    python evals.py hellaswag --model gpt2                                 # same as python hellaswag.py
    offline: --data_dir FOLDER or LAMBADA_DIR=FOLDER (holding lambada_test.jsonl); STORYCLOZE_FILE=CSV

LAMBADA (OpenAI's version: 5,153 passages from novels, whose last word needs the whole passage):
the model reads the passage up to its last word, and scores that word (" " + word, one or a few
tokens). acc: greedy decoding reproduces every token of the word. ppl: exp of the word's loss
(summed over its tokens) averaged over passages. GPT-3 Small zero-shot: 42.7% accuracy.

StoryCloze 2016: four sentences of a story and two possible endings; the model picks the ending
with the lowest mean loss per token. Its authors hand out the CSV on request and it may not be
redistributed, so it is never downloaded: pass its path. GPT-3 Small zero-shot: 63.3%.

All of them run through hellaswag.py's scoring core: batched, sharded across DDP ranks.
"""

import argparse
import csv
import math
import os
import re
from contextlib import nullcontext

from hellaswag import (
    add_eval_args,
    check_row_count,
    data_file,
    evaluate_hellaswag,
    gpt2_tokenizer,
    hellaswag_rows,
    load_hellaswag,
    read_jsonl,
    run_eval,
    score_examples,
)

TASKS = ("hellaswag", "lambada", "storycloze")

LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"
LAMBADA_FILE = "lambada_test.jsonl"
LAMBADA_ROWS = 5153

STORYCLOZE_SENTENCES = tuple(f"InputSentence{i}" for i in range(1, 5))
STORYCLOZE_ENDINGS = ("RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2")
STORYCLOZE_COLUMNS = STORYCLOZE_SENTENCES + STORYCLOZE_ENDINGS + ("AnswerRightEnding",)


# ---- LAMBADA -----------------------------------------------------------------------------------
def lambada_problem(example):
    if not isinstance(example, dict) or not isinstance(example.get("text"), str):
        return "no `text`: is this OpenAI's lambada_test.jsonl?"
    if len(example["text"].split()) < 2:
        return "the passage needs at least two words: a context and the target word"
    return None


def read_lambada(path):
    examples = read_jsonl(path, lambada_problem)
    check_row_count(examples, LAMBADA_ROWS, path)
    return examples


def load_lambada(data_path=None, limit=None):
    """The first `limit` of the 5,153 test passages, from data_path, $LAMBADA_DIR or the cache folder."""
    path = data_file(data_path, "LAMBADA_DIR", LAMBADA_FILE, LAMBADA_URL, read_lambada)
    return read_lambada(path)[:limit]


def lambada_rows(example):
    """(rows, label): one row, the passage up to its last word, then that word with the whitespace
    before it (" signs"), which is how the word is tokenized inside running text."""
    enc = gpt2_tokenizer()
    text = example["text"].rstrip()
    split = re.search(r"\s\S+$", text).start()
    return [(enc.encode(text[:split]), enc.encode(text[split:]))], 0


def evaluate_lambada(
    model, examples, device, batch_size=16, rank=0, world_size=1, autocast=nullcontext, progress=False
):
    """{"acc", "ppl", "count"} over the passages (of all ranks; see hellaswag.score_examples)."""
    totals = score_examples(
        model, examples, lambada_rows, device, batch_size, rank, world_size, autocast, progress, "lambada"
    )
    n = totals["count"]
    return {"acc": totals["greedy"] / n, "ppl": math.exp(totals["loss"] / n), "count": int(n)}


# ---- StoryCloze --------------------------------------------------------------------------------
def read_storycloze(path):
    """The stories of a StoryCloze CSV, in HellaSwag's layout ({"ctx", "endings", "label"}), so they
    render the same way."""
    examples = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in STORYCLOZE_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise SystemExit(f"{path}: no column {', '.join(missing)}: is this the StoryCloze 2016 CSV?")
            for row in reader:
                if any(not (row[c] or "").strip() for c in STORYCLOZE_COLUMNS):
                    raise SystemExit(f"{path}, line {reader.line_num}: a column is empty or missing")
                if row["AnswerRightEnding"].strip() not in ("1", "2"):
                    raise SystemExit(f"{path}, line {reader.line_num}: AnswerRightEnding must be 1 or 2")
                context = " ".join(row[c].strip() for c in STORYCLOZE_SENTENCES)
                endings = [row[c].strip() for c in STORYCLOZE_ENDINGS]
                examples.append({"ctx": context, "endings": endings, "label": int(row["AnswerRightEnding"]) - 1})
    except UnicodeDecodeError:
        raise SystemExit(f"{path} is not UTF-8 text")
    if not examples:
        raise SystemExit(f"{path} holds no stories")
    return examples


def load_storycloze(data_path=None, limit=None):
    """The first `limit` stories of the CSV at data_path, else $STORYCLOZE_FILE."""
    path = data_path or os.environ.get("STORYCLOZE_FILE")
    if not path:
        raise SystemExit(
            "StoryCloze cannot be downloaded (its licence forbids redistribution): request the 2016 CSV "
            "from https://cs.rochester.edu/nlp/rocstories/ and pass it with --data_dir FILE or STORYCLOZE_FILE=FILE"
        )
    if not os.path.isfile(path):
        raise SystemExit(f"StoryCloze: {path} is not a file; pass the CSV itself")
    return read_storycloze(path)[:limit]


def evaluate_storycloze(
    model, examples, device, batch_size=16, rank=0, world_size=1, autocast=nullcontext, progress=False
):
    """{"acc", "count"}: the ending with the lowest mean loss per token is the model's choice."""
    totals = score_examples(
        model, examples, hellaswag_rows, device, batch_size, rank, world_size, autocast, progress, "storycloze"
    )
    return {"acc": totals["correct_norm"] / totals["count"], "count": int(totals["count"])}


# ---- the registry ------------------------------------------------------------------------------
def task_functions(name):
    """(load, evaluate) of the task called name."""
    functions = {
        "hellaswag": (load_hellaswag, evaluate_hellaswag),
        "lambada": (load_lambada, evaluate_lambada),
        "storycloze": (load_storycloze, evaluate_storycloze),
    }
    if name not in functions:
        raise SystemExit(f"unknown evaluation {name!r}: choose from {', '.join(TASKS)}")
    return functions[name]


def load_task(name, data_path=None, limit=None):
    """The examples of a task: from data_path (a folder or the file itself), else the task's variable
    (HELLASWAG_DIR, LAMBADA_DIR, STORYCLOZE_FILE), else a download into the cache folder."""
    load, _ = task_functions(name)
    return load(data_path, limit)


def evaluate_task(
    name, model, examples, device, batch_size=16, rank=0, world_size=1, autocast=nullcontext, progress=False
):
    """A flat dict of figures, the same on every rank: {"acc", "acc_norm", "count"} for hellaswag,
    {"acc", "ppl", "count"} for lambada, {"acc", "count"} for storycloze. Rank r scores examples
    r, r + world_size, ...; all ranks must call it. autocast() is the context the forward
    pass runs in (see hellaswag.score_batch)."""
    _, evaluate = task_functions(name)
    return evaluate(model, examples, device, batch_size, rank, world_size, autocast, progress)


def log_line(step, name, results):
    """The line train_gpt2.py writes to its log: `{step} hella {acc_norm:.4f}` (the reference
    format, "hella" being acc_norm), `{step} lambada {acc:.4f}`, `{step} storycloze {acc:.4f}`."""
    key, metric = {
        "hellaswag": ("hella", "acc_norm"),
        "lambada": ("lambada", "acc"),
        "storycloze": ("storycloze", "acc"),
    }[name]
    return f"{step} {key} {results[metric]:.4f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=TASKS)
    add_eval_args(parser)
    args = parser.parse_args()
    run_eval(args.task, args, *task_functions(args.task))


if __name__ == "__main__":
    main()
