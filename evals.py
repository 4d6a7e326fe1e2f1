"""
Zero-shot evaluations beyond HellaSwag (LAMBADA, StoryCloze), and TASKS, the table of all of them.

    python evals.py lambada --model gpt2                                   # OpenAI's 124M weights
    python evals.py lambada --checkpoint log/model_19073.pt --limit 500
    python evals.py storycloze --model gpt2 --data_file "cloze_test_test__spring2016 - cloze_test_ALL_test.csv"
    python evals.py hellaswag --model gpt2                                 # same as python hellaswag.py
    offline: --data_file FILE_OR_FOLDER or LAMBADA_DIR=FOLDER (holding lambada_test.jsonl); STORYCLOZE_FILE=CSV

LAMBADA (OpenAI's version: 5,153 passages from novels, whose last word needs the whole passage):
the model reads the passage up to its last word, and scores that word (" " + word, one or a few
tokens). acc: greedy decoding reproduces every token of the word. ppl: exp of the word's loss
(summed over its tokens) averaged over passages. GPT-3 Small zero-shot: 42.7% accuracy.

StoryCloze 2016: four sentences of a story and two possible endings; the model picks the ending
with the lowest mean loss per token. Its authors hand out the CSV on request and it may not be
redistributed, so it is never downloaded: pass its path. GPT-3 Small zero-shot: 63.3%.

All of them run through scoring.py: batched, sharded across DDP ranks. train_gpt2.py's --eval_tasks
names tasks of TASKS.
"""

import csv
import math
import os
import re

from errors import UserError, exit_on_error
from hellaswag import HELLASWAG, hellaswag_rows
from scoring import Task, check_row_count, data_file, eval_parser, read_jsonl, run_eval

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


def lambada_rows(example, tokenizer):
    """(rows, label): one row, the passage up to its last word, then that word with the whitespace
    before it (" signs"), which is how the word is tokenized inside running text."""
    text = example["text"].rstrip()
    split = re.search(r"\s\S+$", text).start()
    return [(tokenizer.encode(text[:split]), tokenizer.encode(text[split:]))], 0


def lambada_results(totals):
    """acc: greedy decoding reproduces the whole word; ppl: exp of the word's mean summed loss."""
    n = totals["count"]
    return {"acc": totals["greedy"] / n, "ppl": math.exp(totals["loss"] / n), "count": int(n)}


LAMBADA = Task("lambada", load_lambada, lambada_rows, lambada_results, log_key="lambada", log_metric="acc")


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
                raise UserError(f"{path}: no column {', '.join(missing)}: is this the StoryCloze 2016 CSV?")
            for row in reader:
                if any(not (row[c] or "").strip() for c in STORYCLOZE_COLUMNS):
                    raise UserError(f"{path}, line {reader.line_num}: a column is empty or missing")
                if row["AnswerRightEnding"].strip() not in ("1", "2"):
                    raise UserError(f"{path}, line {reader.line_num}: AnswerRightEnding must be 1 or 2")
                context = " ".join(row[c].strip() for c in STORYCLOZE_SENTENCES)
                endings = [row[c].strip() for c in STORYCLOZE_ENDINGS]
                examples.append({"ctx": context, "endings": endings, "label": int(row["AnswerRightEnding"]) - 1})
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text")
    if not examples:
        raise UserError(f"{path} holds no stories")
    return examples


def load_storycloze(data_path=None, limit=None):
    """The first `limit` stories of the CSV at data_path, else $STORYCLOZE_FILE."""
    path = data_path or os.environ.get("STORYCLOZE_FILE")
    if not path:
        raise UserError(
            "StoryCloze cannot be downloaded (its licence forbids redistribution): request the 2016 CSV "
            "from https://cs.rochester.edu/nlp/rocstories/ and pass it with --data_file FILE or STORYCLOZE_FILE=FILE"
        )
    if not os.path.isfile(path):
        raise UserError(f"StoryCloze: {path} is not a file; pass the CSV itself")
    return read_storycloze(path)[:limit]


def storycloze_results(totals):
    """The ending with the lowest mean loss per token is the model's choice."""
    return {"acc": totals["correct_norm"] / totals["count"], "count": int(totals["count"])}


# the stories render exactly as HellaSwag's examples do: context, then " " + each ending
STORYCLOZE = Task(
    "storycloze", load_storycloze, hellaswag_rows, storycloze_results, log_key="storycloze", log_metric="acc"
)

# ---- the table ---------------------------------------------------------------------------------
TASKS = {task.name: task for task in (HELLASWAG, LAMBADA, STORYCLOZE)}


@exit_on_error
def main(argv=None):
    parser = eval_parser(__doc__)
    parser.add_argument("task", choices=TASKS)
    args = parser.parse_args(argv)
    run_eval(TASKS[args.task], args)


if __name__ == "__main__":
    main()
