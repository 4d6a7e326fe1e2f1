"""
HellaSwag: zero-shot commonsense evaluation of a checkpoint or of OpenAI's GPT-2 weights.

    python hellaswag.py --model gpt2                          # OpenAI's 124M weights (hub name or local folder)
    python hellaswag.py --checkpoint log/model_19073.pt       # a checkpoint written by train_gpt2.py
    python hellaswag.py --checkpoint log/model_19073.pt --limit 200 --device cpu
    torchrun --standalone --nproc_per_node=8 hellaswag.py --model gpt2-xl   # examples split across GPUs
    offline: --data_file FILE_OR_FOLDER (or HELLASWAG_DIR=FOLDER), holding hellaswag_val.jsonl

Each of the 10,042 validation examples is a context and four endings, one of them right. The model
reads the context followed by each ending (" " + ending), and we pick the ending it finds least
surprising. Two ways to measure surprise, both reported:
    acc       lowest loss summed over the ending's tokens (favours short endings)
    acc_norm  lowest loss averaged over the ending's tokens
OpenAI's GPT-2 124M scores acc 0.2859 / acc_norm 0.2955 this way, GPT-2 XL 0.3842 / 0.4893; random
guessing scores 0.25. The EleutherAI harness normalises by characters instead of tokens and cleans
the text first, so its figures differ (GPT-2 124M: acc 0.2892, acc_norm 0.3114).

This file defines the task (its data, and how an example becomes four rows of context + ending
tokens); scoring.py scores it, as it does LAMBADA and StoryCloze (evals.py), batched and sharded
across DDP ranks, for this command line and for the periodic evaluation in train_gpt2.py.
"""

from errors import exit_on_error
from scoring import Task, check_row_count, data_file, eval_parser, read_jsonl, run_eval

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_FILE = "hellaswag_val.jsonl"
HELLASWAG_ROWS = 10042  # examples in the validation split
NUM_ENDINGS = 4


def hellaswag_problem(example):
    if not isinstance(example, dict) or not isinstance(example.get("ctx"), str):
        return "no `ctx` text: is this HellaSwag's jsonl?"
    endings = example.get("endings")
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS or not all(isinstance(e, str) for e in endings):
        return f"`endings` must be a list of {NUM_ENDINGS} texts"
    label = example.get("label")
    if type(label) is not int or not 0 <= label < NUM_ENDINGS:
        return f"`label` must be an integer 0..{NUM_ENDINGS - 1}, not {label!r}"
    return None


def read_hellaswag(path):
    """The validation examples in path, validated by content: the byte hash of a faithful copy can
    differ from the original's (key order, float formatting), its content cannot."""
    examples = read_jsonl(path, hellaswag_problem)
    check_row_count(examples, HELLASWAG_ROWS, path)
    return examples


def load_hellaswag(data_path=None, limit=None):
    """The first `limit` validation examples (all 10,042 by default), from data_path, $HELLASWAG_DIR
    or the cache folder (downloaded the first time)."""
    path = data_file(data_path, "HELLASWAG_DIR", HELLASWAG_FILE, HELLASWAG_URL, read_hellaswag)
    return read_hellaswag(path)[:limit]


def hellaswag_rows(example, tokenizer):
    """(rows, label): one row per ending, the context followed by " " + ending."""
    context = tokenizer.encode(example["ctx"])
    return [(context, tokenizer.encode(" " + ending)) for ending in example["endings"]], example["label"]


def hellaswag_results(totals):
    n = totals["count"]
    return {"acc": totals["correct"] / n, "acc_norm": totals["correct_norm"] / n, "count": int(n)}


# "hella" and acc_norm in log.txt: the reference recipe's format, which plot.py reads
HELLASWAG = Task("hellaswag", load_hellaswag, hellaswag_rows, hellaswag_results, log_key="hella", log_metric="acc_norm")


@exit_on_error
def main(argv=None):
    run_eval(HELLASWAG, eval_parser(__doc__).parse_args(argv))


if __name__ == "__main__":
    main()
