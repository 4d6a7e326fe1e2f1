"""
HellaSwag: zero-shot commonsense evaluation, and the scoring core that every evaluation here shares.

    python hellaswag.py --model gpt2                          # OpenAI's 124M weights (hub name or local folder)
    python hellaswag.py --checkpoint log/model_19073.pt       # a checkpoint written by train_gpt2.py
    python hellaswag.py --checkpoint log/model_19073.pt --limit 200 --device cpu
    torchrun --standalone --nproc_per_node=8 hellaswag.py --model gpt2-xl   # examples split across GPUs
    offline: --data_dir FOLDER (or HELLASWAG_DIR=FOLDER), FOLDER holding hellaswag_val.jsonl

Each of the 10,042 validation examples is a context and four endings, one of them right. The model
reads the context followed by each ending (" " + ending), and we pick the ending it finds least
surprising. Two ways to measure surprise, both reported:
    acc       lowest loss summed over the ending's tokens (favours short endings)
    acc_norm  lowest loss averaged over the ending's tokens
OpenAI's GPT-2 124M scores acc 0.2859 / acc_norm 0.2955 this way, GPT-2 XL 0.3842 / 0.4893; random
guessing scores 0.25. The EleutherAI harness normalises by characters instead of tokens and cleans
the text first, so its figures differ (GPT-2 124M: acc 0.2892, acc_norm 0.3114).

The scoring core (`score_examples`) is task-agnostic: an example is a few rows of (context tokens,
continuation tokens), and one forward pass scores many examples at once. LAMBADA and StoryCloze
(evals.py) and the periodic evaluation in train_gpt2.py all run through it.
"""

import argparse
import json
import os
import tempfile
import urllib.error
import urllib.request
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import model_from_checkpoint
from device import all_reduce_sum, setup_distributed, setup_precision, teardown_distributed
from fineweb import gpt2_tokenizer  # the same GPT-2 BPE the shards were written with
from model import GPT

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_FILE = "hellaswag_val.jsonl"
HELLASWAG_ROWS = 10042  # examples in the validation split
NUM_ENDINGS = 4

# What score_examples adds up, over every example of every rank. All refer to the labelled row
# (the right ending; LAMBADA's only row): `loss` and `tokens` are its summed loss and token count.
TOTALS = ("count", "correct", "correct_norm", "greedy", "loss", "tokens")


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
            raise SystemExit(
                f"cannot score a {n}-token continuation in a row of {len(sequence)} tokens: it needs at least "
                f"one context token before it, within the model's block_size={max_len}"
            )
        tokens[i, : len(sequence)] = torch.tensor(sequence)
        mask[i, len(sequence) - n : len(sequence)] = 1
    return tokens, mask


@torch.no_grad()
def score_batch(model, tokens, mask, autocast=nullcontext):
    """tokens, mask: (N, L), as pad_rows makes them. Returns, per row, the loss summed over the
    continuation tokens (N,), their number (N,), and whether greedy decoding reproduces every one
    of them (N,) bool. autocast() is the context the forward pass runs in: the `autocast` method of
    device.py's Precision, the same one training uses, or by default none (float32)."""
    with autocast():
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


def batch_totals(sum_loss, n_tokens, greedy, labels, dtype):
    """Scores of a batch of E examples with k rows each, (E, k), and their labels (E,) -> the
    contributions of these examples to TOTALS, a tensor in that order, still on the device."""
    label = labels[:, None]  # (E, 1)
    per_example = [
        torch.ones_like(labels),  # count
        sum_loss.argmin(dim=1) == labels,  # correct
        (sum_loss / n_tokens).argmin(dim=1) == labels,  # correct_norm
        greedy.gather(1, label)[:, 0],
        sum_loss.gather(1, label)[:, 0],  # loss
        n_tokens.gather(1, label)[:, 0],  # tokens
    ]
    return torch.stack([figure.to(dtype) for figure in per_example], dim=1).sum(dim=0)  # (len(TOTALS),)


def unwrap(model):
    """The plain GPT under DDP and torch.compile wrappers. Evaluation runs it uncompiled: every batch
    has a new shape, and recompiling for each would cost more than it saves (it shares the compiled
    model's weights, so training stays compiled). DDP's forward is not needed without gradients."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def score_examples(
    model,
    examples,
    render,
    device,
    batch_size=16,
    rank=0,
    world_size=1,
    autocast=nullcontext,
    progress=False,
    desc=None,
):
    """Score examples, batch_size examples per forward pass; returns TOTALS summed over all ranks.

    render(example) -> (rows, label): rows is a list of (context tokens, continuation tokens), the
    same number for every example; label is the index of the right row. Rank r scores examples
    r, r + world_size, ...; with world_size > 1 the totals are all-reduced, so every rank returns
    the same figures, and every rank must call this, even one with no examples."""
    model = unwrap(model)
    rendered = [render(example) for example in examples[rank::world_size]]
    # Longest first: neighbours in a batch have similar lengths, so little of it is padding, and a
    # batch too large for memory fails at once rather than after most of the work.
    rendered.sort(key=lambda item: max(len(c) + len(e) for c, e in item[0]), reverse=True)
    # The totals stay on the device until the end: reading them after every batch would make the
    # CPU wait for the GPU instead of preparing the next batch. float64 keeps the sums exact (MPS has none).
    dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
    totals = torch.zeros(len(TOTALS), dtype=dtype, device=device)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(rendered), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = rendered[start : start + batch_size]
        rows = [row for example_rows, _ in batch for row in example_rows]
        tokens, mask = pad_rows(rows, model.config.block_size)
        scores = score_batch(model, tokens.to(device), mask.to(device), autocast)
        labels = torch.tensor([label for _, label in batch], device=device)
        per_example = [score.view(len(batch), -1) for score in scores]  # each (E, k)
        totals += batch_totals(*per_example, labels, dtype)
    model.train(was_training)
    totals = dict(zip(TOTALS, all_reduce_sum(totals, world_size).tolist()))
    if totals["count"] == 0:
        raise SystemExit("no examples to evaluate")
    return totals


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
                    raise SystemExit(
                        f"{path}, line {line_number}: not valid JSON ({e.msg}); fix or re-download the file"
                    )
                error = problem(row)
                if error:
                    raise SystemExit(f"{path}, line {line_number}: {error}")
                rows.append(row)
    except UnicodeDecodeError:
        raise SystemExit(f"{path} is not UTF-8 text: fix or re-download the file")
    return rows


def check_row_count(rows, expected, path):
    if len(rows) != expected:
        raise SystemExit(
            f"{path} holds {len(rows):,} examples, expected {expected:,}: it is truncated or another "
            f"file; delete it to download it again, or point at a complete copy"
        )


def download(url, path, read):
    """Fetch url into path through a temporary file; read(temporary path) validates the content
    before the rename, so a partial or wrong download never sits under the final name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
            total = getattr(response, "length", None)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(path)}") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        try:
            read(tmp_path)
        except SystemExit as e:
            raise SystemExit(f"downloaded {url}, but its content is wrong: {e}")
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def data_file(data_path, env_var, filename, url, read):
    """The path of a task's data file: data_path (a folder holding filename, or the file itself),
    else the folder in $env_var, else the cached copy, downloaded from url the first time."""
    origin = "--data_dir"
    if data_path is None and os.environ.get(env_var):
        data_path, origin = os.environ[env_var], env_var
    if data_path is not None:
        path = os.path.join(data_path, filename) if os.path.isdir(data_path) else data_path
        if not os.path.isfile(path):
            raise SystemExit(f"{origin}={data_path}: no {path}; point it at a folder holding {filename}")
        return path
    path = os.path.join(cache_dir(), filename)
    if not os.path.isfile(path):
        try:
            download(url, path, read)
        except (urllib.error.URLError, OSError) as e:  # no network, DNS, timeout, HTTP error
            raise SystemExit(
                f"could not download {url} ({e}).\n"
                f"Offline? Put {filename} in a folder and pass --data_dir FOLDER, or set {env_var}=FOLDER."
            )
    return path


# ---- HellaSwag ---------------------------------------------------------------------------------
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


def hellaswag_rows(example):
    """(rows, label): one row per ending, the context followed by " " + ending."""
    enc = gpt2_tokenizer()
    context = enc.encode(example["ctx"])
    return [(context, enc.encode(" " + ending)) for ending in example["endings"]], example["label"]


def render_example(example):
    """One example as the model sees it: tokens (4, L), mask (4, L) with 1 on the ending tokens,
    and the label (index of the right ending)."""
    rows, label = hellaswag_rows(example)
    tokens, mask = pad_rows(rows)
    return tokens, mask, label


def evaluate_hellaswag(
    model, examples, device, batch_size=16, rank=0, world_size=1, autocast=nullcontext, progress=False
):
    """{"acc", "acc_norm", "count"} over the examples (of all ranks; see score_examples)."""
    totals = score_examples(
        model, examples, hellaswag_rows, device, batch_size, rank, world_size, autocast, progress, "hellaswag"
    )
    n = totals["count"]
    return {"acc": totals["correct"] / n, "acc_norm": totals["correct_norm"] / n, "count": int(n)}


# ---- command line, shared with evals.py --------------------------------------------------------
def add_eval_args(parser):
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument(
        "--model", help="OpenAI GPT-2 weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local Hugging Face folder"
    )
    weights.add_argument("--checkpoint", help="a checkpoint written by train_gpt2.py, e.g. log/model_19073.pt")
    parser.add_argument(
        "--data_dir",
        help="folder holding the data file, or the file itself (default: $HELLASWAG_DIR etc., else download)",
    )
    parser.add_argument("--limit", type=positive_int, help="evaluate only the first LIMIT examples")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="examples per forward pass")
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:1 or mps")
    parser.add_argument(
        "--dtype",
        default="float32",
        help="auto, bfloat16, float16 or float32, as train_gpt2.py's --dtype (on CUDA float32 matmuls run in TF32, "
        "as in training); bfloat16 is faster on a GPU, float32 gives the reference figures",
    )


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def load_model(args, device):
    if args.checkpoint:
        return model_from_checkpoint(args.checkpoint, device)
    return GPT.from_pretrained(args.model).to(device)


def format_results(name, results):
    """One line: `hellaswag acc 0.2859 acc_norm 0.2955 count 10042`."""
    return " ".join([name] + [f"{k} {v}" if k == "count" else f"{k} {v:.4f}" for k, v in results.items()])


def run_eval(name, args, load, evaluate):
    """The whole command line run: load(data_path, limit) -> examples, evaluate(model, examples,
    device, ...) -> results, printed by rank 0."""
    dist_info = setup_distributed(args.device)  # the same checks and torchrun setup as train_gpt2.py
    precision = setup_precision(args.dtype, dist_info.device_type)
    examples = load(args.data_dir, args.limit)  # before the model: a data problem shows up in a second
    model = load_model(args, dist_info.device)
    results = evaluate(
        model, examples, dist_info.device, batch_size=args.batch_size, rank=dist_info.rank,
        world_size=dist_info.world_size, autocast=precision.autocast, progress=dist_info.is_master,
    )  # fmt: skip
    if dist_info.is_master:
        print(format_results(name, results))
    teardown_distributed()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser)
    run_eval("hellaswag", parser.parse_args(), load_hellaswag, evaluate_hellaswag)


if __name__ == "__main__":
    main()
