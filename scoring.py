"""
The scoring core that every zero-shot evaluation shares (HellaSwag, LAMBADA, StoryCloze), its data
files, and the command line of hellaswag.py and evals.py.

An evaluation is a Task: how to load its examples, how to render one example as a few rows of
(context tokens, continuation tokens) plus the index of the right row, and how to turn the summed
scores into figures. One forward pass scores the rows of many examples at once:

    task = evals.TASKS["hellaswag"]
    examples = task.load(None, 500)                       # data file: local, or downloaded once
    results = evaluate(task, model, examples, tokenizer)  # {"acc": ..., "acc_norm": ..., "count": 500}

Under DDP, rank r scores examples r, r + world_size, ...; the totals are all-reduced, so every rank
gets the same figures.
"""

import argparse
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import add_model_args, load_model
from device import (
    DistInfo,
    add_device_args,
    all_reduce_sum,
    setup_distributed,
    setup_precision,
    sum_dtype,
    teardown_distributed,
    unwrap,
)
from errors import UserError
from files import atomic_write
from training_log import format_results

# What score_examples adds up over the examples of every rank (see batch_totals).
TOTALS = ("count", "correct", "correct_norm", "greedy", "loss", "tokens")


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable  # (data_file or None, limit or None) -> list of examples
    render: Callable  # (example, tokenizer) -> ([(context ids, continuation ids), ...], index of the right row)
    summarize: Callable  # {name in TOTALS: sum over all examples} -> {"acc": ..., ..., "count": n}
    log_key: str  # its name in log.txt: `250 hella 0.2641`
    log_metric: str  # the figure log.txt holds


# ---- the scoring core --------------------------------------------------------------------------
def pad_rows(rows, max_len=None):
    """rows: (context tokens, continuation tokens) pairs. Returns tokens (N, L) right-padded with 0
    and mask (N, L), 1 on the continuation tokens, L the longest row. Right padding is safe with
    causal attention: a real token never attends to the padding that comes after it. A row longer
    than max_len (the model's block_size) loses the start of its context."""
    sequences = [(context + continuation)[-max_len if max_len else None :] for context, continuation in rows]
    lengths = [len(continuation) for _, continuation in rows]
    L = max(len(sequence) for sequence in sequences)
    tokens = torch.zeros((len(rows), L), dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, (sequence, n) in enumerate(zip(sequences, lengths)):
        if not 0 < n < len(sequence):  # the first continuation token is predicted from the token before it
            raise UserError(
                f"cannot score a {n}-token continuation in a row of {len(sequence)} tokens: it needs at least "
                f"one context token before it, within the model's block_size={max_len}"
            )
        tokens[i, : len(sequence)] = torch.tensor(sequence)
        mask[i, len(sequence) - n : len(sequence)] = 1
    return tokens, mask


@torch.no_grad()
def score_batch(model, tokens, mask, precision=None):
    """tokens, mask: (N, L), as pad_rows makes them. Returns, per row, the loss summed over the
    continuation tokens (N,), their number (N,), and whether greedy decoding reproduces every one
    of them (N,) bool. The forward pass runs in precision's autocast (device.py's Precision, the
    same as training), or in float32 without one."""
    with precision.autocast() if precision else nullcontext():
        logits, _ = model(tokens)  # (N, L, vocab_size)
    # The logits at position t predict token t+1. Only the continuation tokens are scored, so pick
    # out their positions before the float32 log-softmax: a fraction of the (N, L, vocab) logits.
    is_target = mask[:, 1:].bool()  # (N, L-1)
    predictions = logits[:, :-1][is_target].float()  # (M, vocab_size), M continuation tokens in all
    targets = tokens[:, 1:][is_target]  # (M,)
    row = torch.arange(len(tokens), device=tokens.device)[:, None].expand_as(is_target)[is_target]  # (M,)
    losses = F.cross_entropy(predictions, targets, reduction="none")  # (M,)
    misses = (predictions.argmax(dim=-1) != targets).float()  # (M,)
    sum_loss = torch.zeros(len(tokens), device=tokens.device).index_add_(0, row, losses)
    n_misses = torch.zeros(len(tokens), device=tokens.device).index_add_(0, row, misses)
    return sum_loss, is_target.sum(dim=1), n_misses == 0


def batch_totals(sum_loss, n_tokens, greedy, labels):
    """Scores of a batch of E examples with k rows each, (E, k), and their labels (E,) -> what the
    batch adds to each of TOTALS, by name. `greedy`, `loss` and `tokens` are those of the right row."""
    label = labels[:, None]  # (E, 1)
    per_example = {
        "count": torch.ones_like(labels),
        "correct": sum_loss.argmin(dim=1) == labels,  # lowest summed loss
        "correct_norm": (sum_loss / n_tokens).argmin(dim=1) == labels,  # lowest loss per token
        "greedy": greedy.gather(1, label)[:, 0],
        "loss": sum_loss.gather(1, label)[:, 0],
        "tokens": n_tokens.gather(1, label)[:, 0],
    }
    return {name: figure.sum() for name, figure in per_example.items()}


def default_batch_size(device_type):
    """Examples per forward pass when --batch_size is not given. On a CPU one: the logits of a
    16-example batch are over a gigabyte, and one example per forward ran 1.5x faster
    (docs/benchmarks.md); on a GPU, batching pays."""
    return 1 if device_type == "cpu" else 16


def score_examples(
    model, examples, render, tokenizer, dist, precision=None, batch_size=None, progress=False, desc=None
):
    """Score examples, batch_size examples per forward pass (default: default_batch_size of the
    device); returns the totals of batch_totals summed over all ranks, as floats. Every rank must
    call it, even one with no examples."""
    batch_size = batch_size or default_batch_size(dist.device_type)
    model = unwrap(model)  # uncompiled: every batch has a new shape, and recompiling each costs more than it saves
    rendered = [render(example, tokenizer) for example in examples[dist.rank :: dist.world_size]]
    # Longest first: neighbours in a batch have similar lengths, so little of it is padding, and a
    # batch too large for memory fails at once rather than after most of the work.
    rendered.sort(key=lambda item: max(len(c) + len(e) for c, e in item[0]), reverse=True)
    # The totals stay on the device until the end: reading them after every batch would make the
    # CPU wait for the GPU instead of preparing the next batch.
    dtype = sum_dtype(dist.device)
    totals = torch.zeros(len(TOTALS), dtype=dtype, device=dist.device)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(rendered), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = rendered[start : start + batch_size]
        rows = [row for example_rows, _ in batch for row in example_rows]
        tokens, mask = pad_rows(rows, model.config.block_size)
        scores = score_batch(model, tokens.to(dist.device), mask.to(dist.device), precision)
        labels = torch.tensor([label for _, label in batch], device=dist.device)
        sums = batch_totals(*[score.view(len(batch), -1) for score in scores], labels)  # each score (E, k)
        totals += torch.stack([sums[name].to(dtype) for name in TOTALS])
    model.train(was_training)
    totals = dict(zip(TOTALS, all_reduce_sum(totals, dist.world_size).tolist()))
    if totals["count"] == 0:
        raise UserError("no examples to evaluate")
    return totals


def evaluate(task, model, examples, tokenizer, dist=None, precision=None, batch_size=None, progress=False):
    """task.summarize of the scores of examples: a flat dict of figures, the same on every rank.
    dist says on which device and rank to score (default: one process, on the CPU)."""
    dist = dist or DistInfo.single("cpu")
    totals = score_examples(model, examples, task.render, tokenizer, dist, precision, batch_size, progress, task.name)
    return task.summarize(totals)


def log_line(task, step, results):
    """`{step} {log_key} {figure:.4f}`: the reference format of log.txt, e.g. `250 hella 0.2641`."""
    return f"{step} {task.log_key} {results[task.log_metric]:.4f}"


# ---- data files: a local copy, or downloaded once into a cache folder --------------------------
def cache_dir():
    """Where downloaded evaluation data lives: $EVALS_CACHE_DIR, else ~/.cache/gpt2-evals."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gpt2-evals")
    return os.environ.get("EVALS_CACHE_DIR", default)


def read_jsonl(path, problem):
    """The rows of a JSON-lines file; problem(row) returns what is wrong with a row, or None."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}, line {line_number}: not valid JSON ({e.msg}); fix or replace the file")
                error = problem(row)
                if error:
                    raise UserError(f"{path}, line {line_number}: {error}")
                rows.append(row)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: fix or replace the file")
    return rows


def check_row_count(rows, expected, path):
    if len(rows) != expected:
        downloaded = os.path.abspath(path).startswith(os.path.abspath(cache_dir()))
        fix = "delete it to download it again" if downloaded else "point --data_file at a complete copy"
        raise UserError(
            f"{path} holds {len(rows):,} examples, expected {expected:,}: it is truncated or another file; {fix}"
        )


def download(url, path, read, env_var):
    """Fetch url into path; read(temporary path) validates the content before it takes the name, so
    a partial or wrong download never sits under the final name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    filename = os.path.basename(path)
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except (urllib.error.URLError, OSError) as e:  # no network, DNS, timeout, HTTP error
        raise UserError(
            f"could not download {url} ({e}). Offline? Set {env_var}=FOLDER, a folder holding {filename} "
            f"(hellaswag.py and evals.py also take --data_file); to train without this evaluation, --eval_tasks ''"
        )

    def fetch(f):
        total = getattr(response, "length", None)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {filename}") as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))

    def check(tmp_path):
        try:
            read(tmp_path)
        except UserError as e:
            raise UserError(f"downloaded {url}, but its content is wrong: {e}")

    with response:
        atomic_write(path, fetch, check)


def data_file(data_path, env_var, filename, url, read):
    """The path of a task's data file: data_path (a folder holding filename, or the file itself),
    else the folder in $env_var, else the cached copy, downloaded from url the first time."""
    origin = "--data_file"
    if data_path is None and os.environ.get(env_var):
        data_path, origin = os.environ[env_var], env_var
    if data_path is not None:
        path = os.path.join(data_path, filename) if os.path.isdir(data_path) else data_path
        if not os.path.isfile(path):
            raise UserError(f"{origin}={data_path}: no {path}; point it at {filename} or the folder holding it")
        return path
    path = os.path.join(cache_dir(), filename)
    if not os.path.isfile(path):
        download(url, path, read, env_var)
    return path


# ---- command line: python hellaswag.py / python evals.py TASK -----------------------------------
def eval_parser(description):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument(
        "--data_file",
        help="the task's data file, or the folder holding it (default: $HELLASWAG_DIR etc., else download)",
    )
    parser.add_argument("--limit", type=positive_int, help="evaluate only the first LIMIT examples")
    parser.add_argument(
        "--batch_size",
        type=positive_int,
        help="examples per forward pass (default: 1 on a CPU, where batching is slower, 16 on a GPU)",
    )
    # float32 by default: the reference figures (on CUDA its matmuls run in TF32, as in training)
    add_device_args(parser, dtype="float32")
    return parser


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def run_eval(task, args):
    """The whole command line run: examples, model, scores; rank 0 prints the figures."""
    dist = setup_distributed(args.device)  # the same checks and torchrun setup as train_gpt2.py
    finished = False
    try:
        precision = setup_precision(args.dtype, dist.device_type)
        examples = task.load(args.data_file, args.limit)  # before the model: a data problem shows up in a second
        model, tokenizer = load_model(args, dist.device)
        results = evaluate(task, model, examples, tokenizer, dist, precision, args.batch_size, dist.is_master)
        if dist.is_master:
            print(format_results(task.name, results))
        finished = True
        return results
    finally:
        teardown_distributed(finished)
