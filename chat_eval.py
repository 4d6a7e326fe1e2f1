"""
Chat evaluations: does a chat model solve problems? Its val loss cannot say; these can.

    python chat_eval.py --checkpoint log/sft/model_00500.pt --task gsm8k                  # greedy accuracy
    python chat_eval.py --checkpoint log/sft/model_00500.pt --task gsm8k --num_samples 8 --temperature 1.0
    python chat_eval.py --checkpoint log/sft/model_00500.pt --task arc_easy,arc_challenge,mmlu --limit 500
    torchrun --standalone --nproc_per_node=8 chat_eval.py --checkpoint log/sft/model_00500.pt --task gsm8k
    offline: --data_file FILE_OR_FOLDER, or GSM8K_DIR / ARC_DIR / MMLU_DIR = a folder holding the task's
    file (test.jsonl; arc_easy_test.jsonl, arc_challenge_test.jsonl; mmlu_test.jsonl)

Two kinds of task:
    gsm8k     1,319 grade-school math problems (Cobbe et al. 2021). The question is the user's turn;
              the model writes a reply, and the number after its first `#### ` is compared with the
              reference's (the dataset's own convention). greedy_acc with --temperature 0; with
              --num_samples k --temperature T, pass@1 (the mean over the k replies) and pass@k (any
              of the k right). Each with its standard error over problems.
    arc_easy, arc_challenge, mmlu    multiple choice: the question and lettered choices are the user's
              turn, and the answer is the letter whose token the model finds most likely as the first
              token of its reply (one forward pass, nothing sampled). acc, and acc_corrected =
              (acc - 1/n) / (1 - 1/n) for n choices, averaged per example: 0 is chance, 1 is perfect.
With several tasks the last line is their mean (gsm8k's chance is 0, so its acc is its corrected acc).

A model whose tokenizer has no chat tokens (OpenAI's GPT-2 through --model, a pretraining checkpoint)
is evaluated as a base model, and a note says so: the prompt is a plain "Question: ...\\nAnswer:", and
a reply ends at <|endoftext|> or after --max_new_tokens. Problems are split over DDP ranks (rank r
takes r, r + W, ...) and the totals all-reduced, as in scoring.py; `evaluate` is the entry point for
Python callers (an RL loop evaluating now and then).
"""

import argparse
import math
import os
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from chat_template import check_conversation, render_prompt
from checkpoint import add_model_args
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
from errors import UserError, exit_on_error
from generate import check_sampling_args, generate_stream, left_pad, next_logits
from sample import load_sampling_model
from scoring import check_row_count, positive_int, read_jsonl
from training_log import format_results

# OpenAI's grade-school-math/dataset.py: the final answer is the number after "#### ".
GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
# The solutions carry calculator annotations, `48/2 = <<48/2=24>>24`: the value the model would have
# computed, which a model trained on the text would learn to "compute" by itself.
CALCULATOR_ANNOTATION = re.compile(r"<<.*?>>")
LETTERS = "ABCDEFGHIJ"  # choice i is letter i, whatever labels the dataset uses (ARC has some "1".."4")


# ---- GSM8K: the answer and its check ----------------------------------------------------------
def gsm8k_number(text):
    """The number after the first "#### " in text, commas removed ("1,200" -> "1200"), or None."""
    match = GSM8K_ANSWER.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def gsm8k_correct(reply, reference):
    """Whether reply's number after "#### " is the reference solution's (compared as text, as
    OpenAI's is_correct does: "18.0" is not "18"). A reply without one is wrong."""
    number = gsm8k_number(reply)
    return number is not None and number == gsm8k_number(reference)


def gsm8k_answer_text(answer):
    """The reference solution without its calculator annotations, "#### N" line kept: what an
    assistant turn of fine-tuning data says.
    "She makes 9 * 2 = $<<9*2=18>>18 every day.\\n#### 18" -> "She makes 9 * 2 = $18 every day.\\n#### 18"."""
    return CALCULATOR_ANNOTATION.sub("", answer)


def gsm8k_totals(correct_counts, num_samples):
    """What problems add up to, from how many of their num_samples replies were right (c per problem):
    [count, sum of c/k (pass@1), sum of (c/k)^2 (its spread), number with c > 0 (pass@k)]."""
    fractions = [c / num_samples for c in correct_counts]
    return [len(fractions), sum(fractions), sum(f * f for f in fractions), sum(c > 0 for c in correct_counts)]


def binomial_stderr(p, n):
    """Standard error of a fraction p of n independent right/wrong outcomes."""
    return math.sqrt(p * (1 - p) / n)


def gsm8k_results(totals, num_samples, sampled):
    """greedy_acc (temperature 0) or pass@1 and pass@k, each with its standard error over problems.
    pass@1's is the standard error of the mean of the per-problem fractions c/k (their standard
    deviation, over n, divided by sqrt(n)); with k = 1 it is the binomial one."""
    count, pass1, pass1_squares, passk = totals
    n = int(count)
    if not sampled:
        acc = pass1 / n
        return {"greedy_acc": acc, "stderr": binomial_stderr(acc, n), "count": n}
    mean = pass1 / n
    variance = max(pass1_squares / n - mean * mean, 0.0)  # rounding can take a zero variance below 0
    results = {"pass@1": mean, "stderr": math.sqrt(variance / n)}
    if num_samples > 1:
        k = num_samples
        results |= {f"pass@{k}": passk / n, f"pass@{k}_stderr": binomial_stderr(passk / n, n)}
    return results | {"count": n}


# ---- your own rows: a prompt and the answer, checked by a verifier ------------------------------
def exact_match(reply, answer):
    """The reply, stripped of the whitespace around it, is the answer."""
    return reply.strip() == answer.strip()


def contains_answer(reply, answer):
    """The answer appears in the reply."""
    return answer.strip() in reply


VERIFIERS = {"exact": exact_match, "contains": contains_answer}


def rows_problem(row):
    if not isinstance(row, dict) or not isinstance(row.get("answer"), str):
        return 'each row needs "messages" (the prompt: a conversation ending with a user turn) and an "answer" text'
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return '"messages" must be a non-empty list of {role, content} ending with a user turn'
    problem = check_conversation([*messages, {"role": "assistant", "content": row["answer"]}])
    return problem or (None if messages[-1].get("role") == "user" else "the prompt must end with a user turn")


def rows_prompt(example, tokenizer, chat):
    """The conversation so far, then <|assistant|> (a chat model only: rows are conversations)."""
    if not chat:
        raise UserError(f"--task rows asks a chat model: the {tokenizer.name} tokenizer has no chat tokens")
    return render_prompt(example["messages"], tokenizer)


def gsm8k_check(reply, example, match):
    return gsm8k_correct(reply, example["answer"])


def rows_check(reply, example, match):
    """match: a name of VERIFIERS, or a function (reply, example) -> a score in [0, 1] (rl.py's --reward)."""
    return match(reply, example) if callable(match) else VERIFIERS[match](reply, example["answer"])


# ---- multiple choice: ARC and MMLU as one kind of task -----------------------------------------
def choice_totals(predictions, answers, num_choices):
    """[count, correct, sum of chance-corrected scores] of examples, from the predicted and right
    choices and the number of choices of each."""
    correct = [p == a for p, a in zip(predictions, answers)]
    corrected = [(c - 1 / n) / (1 - 1 / n) for c, n in zip(correct, num_choices)]
    return [len(correct), sum(correct), sum(corrected)]


def choice_results(totals):
    count, correct, corrected = totals
    n = int(count)
    return {"acc": correct / n, "stderr": binomial_stderr(correct / n, n), "acc_corrected": corrected / n, "count": n}


# ---- data: rows, local files or the hub --------------------------------------------------------
def gsm8k_problem(row):
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
        return "each row needs `question` and `answer` texts: is this GSM8K's jsonl?"
    if gsm8k_number(row["answer"]) is None:
        return "the answer has no `#### N` final answer"
    return None


def arc_problem(row):
    choices = row.get("choices") if isinstance(row, dict) else None
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(choices, dict):
        return "each row needs `question` and `choices: {text: [...], label: [...]}`: is this ARC's schema?"
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
        return "`choices` needs lists `text` and `label` of the same length"
    if not 2 <= len(texts) <= len(LETTERS):
        return f"{len(texts)} choices: from 2 to {len(LETTERS)} are possible"
    if row.get("answerKey") not in labels:
        return f"`answerKey` {row.get('answerKey')!r} is none of the labels {labels}"
    return None


def mmlu_problem(row):
    if (
        not isinstance(row, dict)
        or not isinstance(row.get("question"), str)
        or not isinstance(row.get("choices"), list)
    ):
        return "each row needs `question` and a list of `choices`: is this MMLU's schema?"
    if not 2 <= len(row["choices"]) <= len(LETTERS):
        return f"{len(row['choices'])} choices: from 2 to {len(LETTERS)} are possible"
    if type(row.get("answer")) is not int or not 0 <= row["answer"] < len(row["choices"]):
        return f"`answer` must be the index of the right choice, not {row.get('answer')!r}"
    return None


def arc_example(row):
    """An ARC row as a choice example: {"question", "choices": [text, ...], "answer": index}."""
    labels = row["choices"]["label"]
    return {"question": row["question"], "choices": row["choices"]["text"], "answer": labels.index(row["answerKey"])}


def mmlu_example(row):
    return {"question": row["question"], "choices": row["choices"], "answer": row["answer"]}


# ---- prompts: the chat template, or a plain one for a base model -------------------------------
def has_chat_tokens(tokenizer):
    return "<|assistant|>" in tokenizer.special_tokens


def choice_question(example):
    """The question and its lettered choices, one per line."""
    lines = [example["question"], *(f"{letter}. {text}" for letter, text in zip(LETTERS, example["choices"]))]
    return "\n".join(lines)


def gsm8k_prompt(example, tokenizer, chat):
    """The ids the model replies to: the question as the user's turn, or "Question: ...\\nAnswer:"."""
    if chat:
        return render_prompt([{"role": "user", "content": example["question"]}], tokenizer)
    return [tokenizer.eot, *tokenizer.encode(f"Question: {example['question']}\nAnswer:")]


def choice_prompt(example, tokenizer, chat):
    """The ids after which the model's first token is its answer. With the chat template:
        <|endoftext|><|user|>Which is a mammal?\nA. trout\nB. whale\nAnswer with the letter.<|end|><|assistant|>
    and the answer is "B"; a base model's, after "Question: ...\nAnswer:", is " B"."""
    if chat:
        question = choice_question(example) + "\nAnswer with the letter."
        return render_prompt([{"role": "user", "content": question}], tokenizer)
    return [tokenizer.eot, *tokenizer.encode(f"Question: {choice_question(example)}\nAnswer:")]


def letter_ids(tokenizer, chat):
    """The token of each letter as the reply's first token: "A" after <|assistant|>, " A" after "Answer:"."""
    ids = [tokenizer.encode(letter if chat else " " + letter) for letter in LETTERS]
    if any(len(i) != 1 for i in ids):
        raise UserError(f"the {tokenizer.name} tokenizer splits the letters A-J: multiple choice needs one token each")
    return [i[0] for i in ids]


@dataclass(frozen=True)
class ChatTask:
    name: str
    kind: str  # "generate": replies sampled and checked; "choice": the most likely letter
    hub: tuple  # (path, config) for datasets.load_dataset
    env_var: str  # a folder holding the local copy
    filename: str  # the local copy's name, {split} filled in
    rows: dict  # {split: rows}: a copy with another count is truncated or another file
    problem: Callable  # (row) -> what is wrong with it, or None
    example: Callable  # (row) -> the example the evaluation uses
    prompt: Callable = None  # generate: (example, tokenizer, chat) -> the ids the model replies to
    check: Callable = None  # generate: (reply, example, match) -> whether the reply is right


# fmt: off
TASKS = {
    "gsm8k": ChatTask(
        "gsm8k", "generate", ("openai/gsm8k", "main"), "GSM8K_DIR", "{split}.jsonl",
        {"train": 7473, "test": 1319}, gsm8k_problem, dict, gsm8k_prompt, gsm8k_check,
    ),
    # your own rows, {"messages": [...a prompt...], "answer": "..."}, from --data_file only
    "rows": ChatTask("rows", "generate", None, None, None, {}, rows_problem, dict, rows_prompt, rows_check),
    "arc_easy": ChatTask(
        "arc_easy", "choice", ("allenai/ai2_arc", "ARC-Easy"), "ARC_DIR", "arc_easy_{split}.jsonl",
        {"train": 2251, "validation": 570, "test": 2376}, arc_problem, arc_example,
    ),
    "arc_challenge": ChatTask(
        "arc_challenge", "choice", ("allenai/ai2_arc", "ARC-Challenge"), "ARC_DIR", "arc_challenge_{split}.jsonl",
        {"train": 1119, "validation": 299, "test": 1172}, arc_problem, arc_example,
    ),
    "mmlu": ChatTask(
        "mmlu", "choice", ("cais/mmlu", "all"), "MMLU_DIR", "mmlu_{split}.jsonl",
        {"dev": 285, "validation": 1531, "test": 14042}, mmlu_problem, mmlu_example,
    ),
}
# fmt: on


def parse_tasks(text):
    """ "arc_easy,gsm8k" -> ["arc_easy", "gsm8k"], each a name of TASKS."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise UserError(f"--task {text}: choose one or more (comma-separated) of {', '.join(TASKS)}")
    return names


def local_file(data_path, env_var, filename):
    """data_path (a file, or a folder holding filename), else the folder in $env_var, else None."""
    origin = "--data_file"
    if data_path is None and os.environ.get(env_var):
        data_path, origin = os.environ[env_var], env_var
    if data_path is None:
        return None
    path = os.path.join(data_path, filename) if os.path.isdir(data_path) else data_path
    if not os.path.isfile(path):
        raise UserError(f"{origin}={data_path}: no {path}; point it at {filename} or the folder holding it")
    return path


def hub_rows(task, split, filename):
    """The rows of task's split from the Hugging Face hub (downloaded once, then datasets' cache)."""
    import datasets  # imported here: a second of startup that local files do not need

    path, config = task.hub
    try:
        return list(datasets.load_dataset(path, config, split=split))
    except Exception as e:  # offline, a hub that is down, an unknown split: datasets raises many types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"could not load {path} ({config}, {split}) from the Hugging Face hub ({reason}). Offline? Set "
            f"{task.env_var}=FOLDER, a folder holding {filename}, or pass --data_file"
        )


def load_examples(name, data_path=None, limit=None, split="test"):
    """The first `limit` examples of task `name`'s split, from data_path, $GSM8K_DIR (etc.), or the hub.
    GSM8K's are its rows ({"question", "answer"}); multiple choice ones {"question", "choices", "answer"}."""
    task = TASKS[name]
    if task.hub is None:  # your own rows: a file, and no count to expect
        if data_path is None or not os.path.isfile(data_path):
            raise UserError(f"--task {name} reads your rows from a file: pass --data_file ROWS.jsonl (not {data_path})")
        return [task.example(row) for row in read_jsonl(data_path, task.problem)[:limit]]
    if split not in task.rows:
        raise UserError(f"{name} has no split {split!r}: choose {', '.join(task.rows)}")
    filename = task.filename.format(split=split)
    path = local_file(data_path, task.env_var, filename)
    if path is None:
        rows, where = hub_rows(task, split, filename), f"{task.hub[0]} ({task.hub[1]}, {split})"
        problems = [(i, error) for i, row in enumerate(rows) if (error := task.problem(row))]
        if problems:
            raise UserError(f"{where}, row {problems[0][0]}: {problems[0][1]}")
    else:
        rows, where = read_jsonl(path, task.problem), path
    check_row_count(rows, task.rows[split], where)
    return [task.example(row) for row in rows[:limit]]


# ---- evaluation: sharded over ranks, batched, totals all-reduced -------------------------------
@dataclass
class EvalSettings:
    max_new_tokens: int = 256  # GSM8K: every test solution fits (the longest is 238 tokens with <|end|>)
    num_samples: int = 1  # replies per GSM8K problem: pass@1 and pass@k over them
    temperature: float = 0.0  # 0: greedy, one reply per problem
    batch_size: int = 8  # rows generated (or scored) at once
    seed: int = 1337  # of the sampling; rank r uses seed + r
    match: object = "exact"  # your rows: how a reply is checked (a name of VERIFIERS, or rows_check's function)


def check_settings(settings):
    check_sampling_args(settings.max_new_tokens, settings.temperature, None, None)
    if settings.num_samples < 1 or settings.batch_size < 1:
        raise UserError(f"num_samples={settings.num_samples}, batch_size={settings.batch_size}: each must be >= 1")
    if settings.num_samples > 1 and settings.temperature == 0:
        raise UserError(
            f"--num_samples {settings.num_samples} at --temperature 0 gives {settings.num_samples} identical "
            "replies: sample with a temperature (e.g. 1.0), or ask for one greedy reply"
        )


def generate_replies(model, tokenizer, prompts, settings, device, precision=None, progress=False, desc=None):
    """The text of the reply to each prompt (a list of ids), generated settings.batch_size prompts at
    a time, left-padded (generate.py). A reply ends before its first special token: <|end|>, or any
    other (<|endoftext|>, <|user|>, ...), never part of the text."""
    model = unwrap(model)
    block_size = model.config.block_size
    specials = set(tokenizer.special_tokens.values())
    stops = torch.tensor(sorted(specials), device=device)
    eot = tokenizer.special("<|end|>") if has_chat_tokens(tokenizer) else tokenizer.eot
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    # Longest first: neighbours in a batch have similar lengths, so little of it is padding, and a
    # batch too large for memory fails at once rather than after most of the work.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    replies = [None] * len(prompts)
    batches = range(0, len(order), settings.batch_size)
    for start in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        rows = order[start : start + settings.batch_size]
        batch = [prompts[i][-block_size:] for i in rows]  # a prompt too long loses its start
        columns = []
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        with precision.autocast() if precision else nullcontext():
            steps = generate_stream(
                model, batch, settings.max_new_tokens, settings.temperature, generator=generator, eot=eot
            )
            for next_id in steps:  # (B,)
                columns.append(next_id)
                done |= torch.isin(next_id, stops)
                if done.all():
                    break  # generate_stream stops early at eot alone; here any special token ends a row
        for i, ids in zip(rows, torch.stack(columns, dim=1).tolist()):
            ids = next((ids[:j] for j, token in enumerate(ids) if token in specials), ids)
            replies[i] = tokenizer.decode(ids)
    return replies


def reply_scores(task, model, tokenizer, examples, settings, device, precision=None, progress=False):
    """How many of each problem's settings.num_samples replies are right: a list, one count per example."""
    chat = has_chat_tokens(tokenizer)
    k = settings.num_samples
    prompts = [task.prompt(example, tokenizer, chat) for example in examples for _ in range(k)]
    replies = generate_replies(model, tokenizer, prompts, settings, device, precision, progress, task.name)
    right = [task.check(reply, examples[i // k], settings.match) for i, reply in enumerate(replies)]
    return [sum(right[i * k : (i + 1) * k]) for i in range(len(examples))]


@torch.no_grad()
def choice_predictions(model, tokenizer, examples, settings, device, precision=None, progress=False, desc=None):
    """The index of the choice whose letter the model finds most likely as its reply's first token."""
    model = unwrap(model)
    chat = has_chat_tokens(tokenizer)
    letters = letter_ids(tokenizer, chat)
    block_size = model.config.block_size
    prompts = [choice_prompt(example, tokenizer, chat)[-block_size:] for example in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    predictions = [None] * len(examples)
    for start in tqdm(range(0, len(order), settings.batch_size), desc=desc, unit="batch", disable=not progress):
        rows = order[start : start + settings.batch_size]
        idx, real = left_pad([prompts[i] for i in rows], block_size, device)
        with precision.autocast() if precision else nullcontext():
            logits = next_logits(model, idx, real)  # (B, vocab_size) at the assistant's first position
        for row, i in enumerate(rows):
            n = len(examples[i]["choices"])
            predictions[i] = logits[row, letters[:n]].argmax().item()
    return predictions


def evaluate(name, model, tokenizer, examples, dist=None, precision=None, settings=None, progress=False):
    """The figures of task `name` on examples (load_examples'), the same on every rank: rank r takes
    examples r, r + world_size, ... and the totals are all-reduced. dist: where and as which rank to
    run (default: one process, on the CPU); precision: device.py's, or float32 without one. Every
    rank must call it, even one with no examples. The model is put in eval mode, then back."""
    dist = dist or DistInfo.single("cpu")
    settings = settings or EvalSettings()
    check_settings(settings)
    task = TASKS[name]
    mine = examples[dist.rank :: dist.world_size]
    model = unwrap(model)
    was_training = model.training
    model.eval()
    if task.kind == "generate":
        # each rank samples its own replies: the same seed on every rank would draw the same randomness
        seeded = replace(settings, seed=settings.seed + dist.rank)
        counts = reply_scores(task, model, tokenizer, mine, seeded, dist.device, precision, progress)
        totals = gsm8k_totals(counts, settings.num_samples)
    else:
        predictions = choice_predictions(model, tokenizer, mine, settings, dist.device, precision, progress, name)
        totals = choice_totals(predictions, [e["answer"] for e in mine], [len(e["choices"]) for e in mine])
    model.train(was_training)
    totals = torch.tensor(totals, dtype=sum_dtype(dist.device), device=dist.device)
    totals = all_reduce_sum(totals, dist.world_size).tolist()
    if totals[0] == 0:
        raise UserError(f"no {name} examples to evaluate")
    if task.kind == "generate":
        return gsm8k_results(totals, settings.num_samples, sampled=settings.temperature > 0)
    return choice_results(totals)


def headline(results):
    """(acc, acc_corrected) of one task's results: GSM8K's chance is 0, so both are its accuracy."""
    if "acc" in results:
        return results["acc"], results["acc_corrected"]
    acc = results.get("greedy_acc", results.get("pass@1"))
    return acc, acc


def mean_results(results_by_task):
    """The mean over tasks of their accuracies and chance-corrected accuracies."""
    pairs = [headline(results) for results in results_by_task.values()]
    n = len(pairs)
    return {"acc": sum(a for a, _ in pairs) / n, "acc_corrected": sum(c for _, c in pairs) / n, "tasks": n}


# ---- command line ------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--task", required=True, help=f"one or more, comma-separated: {', '.join(TASKS)}")
    parser.add_argument(
        "--data_file",
        help="the task's local file, or a folder holding each task's (default: $GSM8K_DIR etc., else the hub)",
    )
    parser.add_argument("--limit", type=positive_int, help="evaluate only the first LIMIT examples of each task")
    parser.add_argument("--num_samples", type=positive_int, default=1, help="GSM8K replies per problem (pass@k)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; sampling needs > 0")
    parser.add_argument("--max_new_tokens", type=positive_int, default=256, help="tokens per GSM8K reply, at most")
    parser.add_argument("--batch_size", type=positive_int, help="rows per batch (default: 64 on CUDA, else 8)")
    parser.add_argument("--seed", type=int, default=1337, help="of the sampling (rank r uses seed + r)")
    parser.add_argument(
        "--match",
        choices=tuple(VERIFIERS),
        default="exact",
        help="--task rows: a reply is right if it is the answer (exact) or contains it",
    )
    add_device_args(parser)
    return parser.parse_args(argv)


@exit_on_error
def main(argv=None):
    args = parse_args(argv)
    names = parse_tasks(args.task)
    if len(names) > 1 and args.data_file and not os.path.isdir(args.data_file):
        raise UserError(f"--data_file {args.data_file}: with several tasks, pass a folder holding each task's file")
    dist = setup_distributed(args.device)  # the same checks and torchrun setup as train_gpt2.py
    batch_size = args.batch_size or (64 if dist.device_type == "cuda" else 8)
    settings = EvalSettings(args.max_new_tokens, args.num_samples, args.temperature, batch_size, args.seed, args.match)
    finished = False
    try:
        check_settings(settings)
        precision = setup_precision(args.dtype, dist.device_type)
        # before the model: a data problem shows up in a second
        examples = {name: load_examples(name, args.data_file, args.limit) for name in names}
        model, tokenizer = load_sampling_model(args, dist.device)
        if not has_chat_tokens(tokenizer) and dist.is_master:
            print(
                f"note: the {tokenizer.name} tokenizer has no chat tokens, so this is a base model's evaluation: "
                'plain "Question: ...\\nAnswer:" prompts, replies ending at <|endoftext|> or --max_new_tokens'
            )
        results = {}
        for name in names:
            results[name] = evaluate(name, model, tokenizer, examples[name], dist, precision, settings, dist.is_master)
            if dist.is_master:
                print(format_results(name, results[name]))
        if len(names) > 1:
            results["mean"] = mean_results(results)
            if dist.is_master:
                print(format_results("mean", results["mean"]))
        finished = True
        return results
    finally:
        teardown_distributed(finished)


if __name__ == "__main__":
    main()
