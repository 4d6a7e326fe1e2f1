r"""
Fine-tune a GPT-2 into a chat model (supervised fine-tuning: full, LoRA or prefix tuning, on a float
or quantized base), or continue its pretraining on your own text, with train_gpt2.py's training loop.

    python finetune.py --init log/model_19073.pt --data_files chats.jsonl --log_dir log/sft
    python finetune.py --init gpt2 --data_files alpaca.json --lora_rank 8 --log_dir log/sft_lora
    python finetune.py --init gpt2 --data_files alpaca.json --lora_rank 8 --base_quant nf4   # QLoRA: a 4-bit base
    python finetune.py --init gpt2 --data_files alpaca.json --peft prefix --prefix_len 16     # prefix tuning
    python finetune.py --plan --init gpt2-xl --lora_rank 8 --base_quant nf4 --gpu_memory 16   # what fits
    python finetune.py --init log/demo/model_01500.pt --data_files input.txt --log_dir log/shakespeare
    python finetune.py --preset cpu --init log/demo/model_01500.pt --data_files data/capitals.jsonl \
        --log_dir log/demo_sft                                # the demo model (make demo) learns to chat, on a CPU
    python sample.py --checkpoint log/sft/model_00500.pt ...   # or python chat.py --checkpoint ...

--init: a train_gpt2.py checkpoint, a Hugging Face GPT-2 folder, or gpt2 / gpt2-medium / ... (OpenAI's
weights). Data (--data_files, or --dataset with a Hugging Face id), one row per example:
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}   chat
    {"instruction": "...", "input": "...", "output": "..."}                             Alpaca-style
    {"text": "..."}, or a .txt file                                                     plain text

The chat format (the template, its loss mask and one rendered conversation) is chat_template.py's,
which chat.py imports too: training and inference can never disagree on it.
"""

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import checkpoint
import documents
import memory_plan
from chat_template import chat_template, check_conversation, render_conversation
from config import flag, parse_layered, preset_layers
from dataloader import permutation
from errors import UserError, exit_on_error
from evals import TASKS
from lora import lora_layers
from model import GPT, MODERN_SWITCHES
from optim import OPTIMIZERS, sft_lr
from quant import FORMATS
from token_rows import chat_token_ids
from tokenizer import CHAT_TOKENS, GPT2, GPT2_CHAT, get_tokenizer
from train_gpt2 import SCRIPT_DIR, Job, TrainConfig, check_config, launch


def targets_of(ids, train):
    """The targets of a row rendered by render_conversation: y[t] = ids[t + 1] where that token is
    trained on, else -1 (left out of the loss)."""
    return [token if trained else -1 for token, trained in zip(ids[1:], train[1:])]


# ---- the examples: chat, instruction or plain text rows -> (ids, targets) rows -----------------
def conversation_of(row):
    """The conversation in a row: its `messages`, or an Alpaca-style instruction as one user turn
    and one assistant turn. None for a row without either (plain text is handled apart)."""
    if isinstance(row, dict) and "messages" in row:
        return row["messages"]
    if isinstance(row, dict) and "instruction" in row and "output" in row:
        prompt = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return None


def text_of(row):
    """The text of a plain-text row (a .txt file, or a row with only a `text` field), else None."""
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and isinstance(row.get("text"), str) and "messages" not in row:
        return row["text"]
    return None


def chat_rows(rows, tokenizer, seq_len, counts):
    """(x, y) token lists of each usable conversation, cut to seq_len + 1 tokens. counts: how many
    rows were skipped, and why."""
    for row in rows:
        messages = conversation_of(row)
        problem = check_conversation(messages) if messages is not None else "no `messages`, instruction or text"
        if problem:
            counts[problem] = counts.get(problem, 0) + 1
            continue
        ids, train = render_conversation(messages, tokenizer)
        if len(ids) > seq_len + 1:  # the rule: keep the first seq_len + 1 tokens, drop the rest
            counts["cut to --seq_len (kept)"] = counts.get("cut to --seq_len (kept)", 0) + 1
            ids, train = ids[: seq_len + 1], train[: seq_len + 1]
            if not any(train[1:]):
                counts["no assistant token within --seq_len"] = counts.get("no assistant token within --seq_len", 0) + 1
                continue
        yield ids[:-1], targets_of(ids, train)


def text_rows(texts, tokenizer, seq_len):
    """Continued pretraining: [<|endoftext|>] + tokens of each text, one stream, cut into windows of
    seq_len + 1 tokens (the last one shorter), every token a target."""
    stream = [token for text in texts for token in [tokenizer.eot, *tokenizer.encode(text)]]
    for start in range(0, len(stream) - 1, seq_len):
        window = stream[start : start + seq_len + 1]
        yield window[:-1], window[1:]


# ---- batches ----------------------------------------------------------------------------------
class RowLoader:
    """next_batch() -> (x, y), each (B, L) int64 on `device`: B rows of a list of (x, y) token lists,
    right-padded to L, the longest row of the batch rounded up to a multiple of 64 (a few distinct
    shapes, so torch.compile does not recompile for every batch). y is -1 on padding.

    Padding rather than packing, and how micro-batches are weighed: docs/data.md.

    The rows are dealt out exactly as DataLoaderLite deals out windows: one endless stream (each
    epoch a new seeded permutation of the rows when shuffled), rank r of W taking batch s*W + r at
    its s-th call; the position is one integer, so resuming is exact on any number of processes."""

    pads_rows = True  # last_batch_tokens: the real tokens of the last batch, its padding left out
    rows_per_example = 1

    def __init__(self, rows, B, process_rank=0, num_processes=1, shuffle=False, seed=0, device="cpu", pad_id=0):
        self.rows, self.B, self.T = rows, B, max(len(x) for x, _ in rows)  # T: the longest row
        self.process_rank, self.num_processes = process_rank, num_processes
        self.shuffle, self.seed, self.device, self.pad_id = shuffle, seed, torch.device(device), pad_id
        lengths = np.array([len(x) for x, _ in rows])
        self.fingerprint = hashlib.sha256(lengths.tobytes() + np.array([x[-1] for x, _ in rows]).tobytes()).hexdigest()
        self._order_epoch = self._order = None
        self.last_batch_tokens = 0
        self.reset()

    def reset(self):
        self.position = 0  # the stream index of the next step's first batch

    @property
    def epoch(self):
        return self.position * self.B // len(self.rows)

    def row(self, i):
        """Row i of the endless stream of rows."""
        epoch, within = divmod(i, len(self.rows))
        if self.shuffle:
            if self._order_epoch != epoch:  # one permutation per epoch, the same on every rank
                self._order = permutation(len(self.rows), self.seed, epoch, 0)
                self._order_epoch = epoch
            within = int(self._order[within])
        return self.rows[within]

    def next_batch(self):
        first = (self.position + self.process_rank) * self.B
        self.position += self.num_processes
        batch = [self.row(i) for i in range(first, first + self.B)]
        L = min(self.T, -(-max(len(x) for x, _ in batch) // 64) * 64)
        x = torch.full((self.B, L), self.pad_id, dtype=torch.long)
        y = torch.full((self.B, L), -1, dtype=torch.long)
        for b, (xs, ys) in enumerate(batch):
            x[b, : len(xs)], y[b, : len(ys)] = torch.tensor(xs), torch.tensor(ys)
        self.last_batch_tokens = sum(len(xs) for xs, _ in batch)
        return x.to(self.device), y.to(self.device)

    def state_dict(self):
        return {
            "position": self.position,
            "B": self.B,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "rows": len(self.rows),
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state):
        mine = self.state_dict()
        for key in ("B", "shuffle", "seed", "rows", "fingerprint"):
            if state[key] != mine[key]:
                raise UserError(
                    f"cannot resume: the checkpoint's data had {key}={state[key]}, this run's has {mine[key]} (other "
                    f"--data_files, --seq_len, --val_fraction or --seed?): resume with the same data and flags"
                )
        self.position = state["position"]


# ---- the run ----------------------------------------------------------------------------------
# Defaults, as train_gpt2.PRESETS (flags given still win). "cpu": a small model (the demo's, 4 x 64)
# on a small chat set (data/capitals.jsonl) in minutes: the base recipe's LR of 1e-4 and rows of 512
# token slots leave such a model unable to learn the format in hundreds of steps (docs/benchmarks.md,
# "Fine-tuning the demo model").
FINETUNE_PRESETS = {
    "sft": {},
    "cpu": dict(
        batch_size=16,
        seq_len=64,
        total_batch_size=1024,
        max_lr=3e-3,
        warmup_steps=10,
        max_steps=300,
        eval_interval=50,
        ckpt_interval=100,
        log_interval=25,
    ),
}


@dataclass
class FinetuneConfig(TrainConfig):
    preset: str = flag(
        "sft",
        "a set of defaults: sft (models of GPT-2's size) or cpu (a small model in minutes)",
        choices=tuple(FINETUNE_PRESETS),
    )
    # what to start from, and the data
    init: str = flag(
        None, "base weights: a train_gpt2.py checkpoint, a Hugging Face GPT-2 folder, or gpt2, gpt2-medium..."
    )
    data_files: list = flag(
        None, "local .jsonl / .json / .parquet / .txt files, folders or globs (as documents.py reads)"
    )
    dataset: str = flag(None, "or a Hugging Face dataset id (with --name, --split)")
    name: str = flag(None, "the dataset's config")
    split: str = flag("train", "the dataset's split")
    val_files: list = flag(None, "held-out rows for the val loss (default: --val_fraction of the data)")
    val_fraction: float = flag(
        0.05, "share of the rows held out for the val loss, when there are no --val_files", 0, 0.5
    )
    # what trains: LoRA (lora.py; rank 0 is full fine-tuning) or a prefix per layer (prefix.py)
    peft: str = flag(
        "lora",
        "lora (with --lora_rank R; rank 0 trains every weight) or prefix (--prefix_len)",
        choices=("lora", "prefix"),
    )
    lora_rank: int = flag(0, "rank r of the LoRA adapters (0: train every weight)", low=0)
    lora_alpha: float = flag(16.0, "LoRA's alpha: the adapters' output is scaled by alpha / r", low=0)
    lora_targets: str = flag("attn,mlp", "the layers that get adapters: attn (c_attn, c_proj), mlp (c_fc, c_proj)")
    prefix_len: int = flag(0, "--peft prefix: P, the learned key and value positions of every layer", low=0)
    train_chat_tokens: bool = flag(
        True,
        "with a frozen base (--lora_rank, --peft prefix) on chat data, train the chat tokens' embedding rows "
        "too, which GPT-2 never trained (token_rows.py; 0: keep them frozen)",
    )
    # QLoRA: the frozen base's block matrices stored in 8 or 4 bits, dequantized on the fly (quant.py)
    base_quant: str = flag(
        "none", "the frozen base in int8 or nf4 (4-bit NormalFloat), or none", choices=("none", *FORMATS)
    )
    # the defaults of train_gpt2.py's flags that fine-tuning sets otherwise
    log_dir: str = flag(os.path.join(SCRIPT_DIR, "log", "sft"), "log.txt, metrics.jsonl and checkpoints go here")
    batch_size: int = flag(8, "rows per forward pass on each GPU", low=1)
    seq_len: int = flag(512, "tokens per row at most: longer conversations are cut (and counted)", low=1)
    total_batch_size: int = flag(
        4096, "token slots per optimizer step: batch_size x seq_len x processes x accumulation", low=1
    )
    max_steps: int = flag(500, "optimizer steps", low=1)
    warmup_steps: int = flag(20, "steps of linear LR warmup", low=0)
    max_lr: float = flag(1e-4, "peak learning rate (LoRA usually takes more, e.g. 1e-3)", low=0)
    min_lr_ratio: float = flag(0.0, "final LR / max_lr: a linear decay down to 0, the usual SFT schedule", 0, 1)
    plan: bool = flag(
        False,
        "print the memory per GPU of a fine-tuning step (one process, or DDP) with a float32, int8 and nf4 "
        "base, these adapters or prefixes (and the chat tokens' rows, as for chat data) and this batch, then "
        "exit: no data and no weights are read",
    )
    optimizer: str = flag(
        "adamw",
        "adamw, or a rule of optim.py's lesson (sgd, momentum, nesterov, adagrad, rmsprop, adam)",
        choices=OPTIMIZERS,
    )
    weight_decay: float = flag(0.0, "weight decay on matrices (decoupled for adamw, L2 for the others)", low=0)
    eval_interval: int = flag(100, "steps between val losses, and at the end (0: never)", low=0)
    val_steps: int = flag(20, "batches per process for the val loss, at most one pass over the validation rows", low=1)
    eval_tasks: str = flag("", f"comma-separated eval tasks ({', '.join(TASKS)}), '' for none")
    sample_interval: int = flag(0, "steps between text samples (0: never; talk to it with chat.py)", low=0)
    ckpt_interval: int = flag(100, "steps between checkpoints (0: only the one written at the end)", low=0)
    log_interval: int = flag(10, "print every N-th step (log.txt and metrics.jsonl get every step)", low=1)


# Fine-tuning takes the model (shape and recipe's switches) and tokenizer from --init, its data from
# --data_files, and its LR schedule from sft_lr. Its --optimizer is AdamW or a rule of optim.py's lesson,
# whatever trained the base; never Muon: the modern recipe's Muon LR is a pretraining one, and LoRA's
# thin (out, rank) matrices are not what Muon's orthogonalised updates are for.
HIDDEN = (
    "data_dir",
    "tokenizer",
    "model",
    "n_layer",
    "n_head",
    "n_embd",
    "recipe",
    *MODERN_SWITCHES,
    "lr_schedule",
    "decay_frac",
    "muon_lr",
    "muon_momentum",
    "embed_lr",
    "head_lr",
)


def read_rows(files, dataset, cfg):
    """Every row of --data_files (or of --dataset), as documents.py's readers give them: dicts, or the
    text of a .txt file."""
    return list(documents.read_rows(files, dataset, cfg.name, cfg.split, text_field=None))


def tokenized_rows(rows, is_chat, tokenizer, seq_len, what):
    """(x, y) rows of chat/instruction rows, or of plain text (when the data has no conversation)."""
    if is_chat:
        counts = {}
        tokenized = list(chat_rows(rows, tokenizer, seq_len, counts))
        for reason, n in counts.items():
            print(f"{what}: {n:,} row(s): {reason}" + ("" if "kept" in reason else " (skipped)"))
    else:
        texts = [text for text in map(text_of, rows) if text]
        tokenized = list(text_rows(texts, tokenizer, seq_len))
    if not tokenized:
        raise UserError(f"{what}: no usable rows (need `messages`, instruction/output, or text)")
    return tokenized


def hold_out(rows, val_fraction, seed):
    """(training rows, validation rows): a seeded val_fraction of the rows held out, the same on every
    rank and at every resume (dpo.py splits its pairs with it too)."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_val = max(1, round(val_fraction * len(rows))) if val_fraction > 0 else 0
    if n_val == 0 or n_val >= len(rows):
        raise UserError(
            f"{len(rows)} row(s): cannot hold out a validation set; pass --val_files, or --val_fraction above 0 "
            f"with more rows"
        )
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]


@dataclass
class Base:
    """The weights fine-tuning (and dpo.py, rl.py) start from, and what their checkpoints record of them."""

    tokenizer: object
    model: object  # a GPT on the CPU, without adapters yet
    make_model: Callable  # () -> the model on the device, with LoRA adapters if asked (Job.make_model)
    record: dict  # init (path, fingerprint), lora and template: every checkpoint's, checked at resume


def load_base(cfg, dist_info, is_chat):
    """--init as a Base: its tokenizer (gpt2-chat for chat data on GPT-2's BPE), the model, checked
    against the flags before any data work."""
    if not cfg.init:
        raise UserError("--init: pass the weights to start from (a checkpoint, a Hugging Face folder, or gpt2)")
    tokenizer = checkpoint.checkpoint_tokenizer(cfg.init) if os.path.isfile(cfg.init) else get_tokenizer(GPT2)
    if is_chat and tokenizer.name == GPT2:
        tokenizer = get_tokenizer(GPT2_CHAT)  # the chat tokens, in rows GPT-2's padded embedding has
    model = checkpoint.load_init(cfg.init, tokenizer.vocab_size)
    check_config(cfg, model.config, dist_info.world_size)
    check_peft(cfg)
    if cfg.lora_rank:
        lora_layers(model, cfg.lora_targets.split(","))  # an unknown target is an error before any data work
    record = {
        "init": {
            "path": os.path.abspath(cfg.init) if os.path.exists(cfg.init) else cfg.init,
            "fingerprint": checkpoint.fingerprint(model),  # of the weights as loaded, before any quantization
        },
        "template": chat_template(tokenizer) if is_chat else None,
        "base_quant": None if cfg.base_quant == "none" else cfg.base_quant,
        **adapter_record(cfg, chat_token_ids(tokenizer) if is_chat else None),
    }

    def make_model():  # called once, after the seed is set: LoRA's A matrices and the prefix's tokens are random
        return checkpoint.adapt(model, record, init=True).to(dist_info.device)

    return Base(tokenizer, model, make_model, record)


def adapter_record(cfg, chat_ids):
    """The lora, prefix and token_rows entries of a checkpoint's record: what trains on a frozen base
    (checkpoint.adapt builds it). chat_ids: the chat tokens' ids, None for data that is not chat. None
    when off, as in checkpoints written before these existed: those still resume and load."""
    frozen_base = cfg.lora_rank > 0 or cfg.peft == "prefix"
    return {
        "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets.split(",")}
        if cfg.lora_rank
        else None,
        "prefix": {"len": cfg.prefix_len} if cfg.peft == "prefix" else None,
        "token_rows": {"ids": chat_ids} if chat_ids and frozen_base and cfg.train_chat_tokens else None,
    }


def check_peft(cfg):
    """UserError for --peft, --lora_rank, --prefix_len and --base_quant that do not go together."""
    if cfg.peft == "prefix" and (cfg.prefix_len < 1 or cfg.lora_rank):
        raise UserError("--peft prefix: pass --prefix_len P (at least 1), and no --lora_rank (LoRA is the other way)")
    if cfg.peft == "lora" and cfg.prefix_len:
        raise UserError("--prefix_len: prefix tuning needs --peft prefix as well")
    if cfg.base_quant != "none" and cfg.peft == "lora" and not cfg.lora_rank:
        raise UserError(
            f"--base_quant {cfg.base_quant} freezes the base: train adapters on it with --lora_rank R or --peft prefix"
        )


def finetuning_job(cfg, dist_info):
    """The Job of train_gpt2.train: the base model (with LoRA adapters if asked), the rows, the schedule."""
    if bool(cfg.data_files) == bool(cfg.dataset):
        raise UserError("pass the data with --data_files (local files) or --dataset (a Hugging Face id), one of them")
    rows = read_rows(cfg.data_files, cfg.dataset, cfg)
    is_chat = any(conversation_of(row) is not None for row in rows)
    base = load_base(cfg, dist_info, is_chat)
    tokenizer = base.tokenizer

    train_rows = tokenized_rows(rows, is_chat, tokenizer, cfg.seq_len, "training data")
    if cfg.val_files:
        val_rows = read_rows(cfg.val_files, None, cfg)
        val_rows = tokenized_rows(val_rows, is_chat, tokenizer, cfg.seq_len, "validation data")
    else:  # a seeded split of the rows (of the windows, for plain text)
        train_rows, val_rows = hold_out(train_rows, cfg.val_fraction, cfg.seed)
    if len(train_rows) < cfg.batch_size * dist_info.world_size:  # a step would read some rows twice
        raise UserError(
            f"{len(train_rows)} training rows, fewer than one micro-step's {dist_info.world_size} x "
            f"{cfg.batch_size}: lower --batch_size, or add rows"
        )
    # the val loss reads the validation rows once (val_steps batches per process), not round and round
    val_steps = min(cfg.val_steps, math.ceil(len(val_rows) / (cfg.batch_size * dist_info.world_size)))
    if dist_info.is_master:
        filled = sum(len(x) for x, _ in train_rows) / (len(train_rows) * cfg.seq_len)
        kind = "chat" if is_chat else "plain text"
        print(
            f"{len(train_rows):,} training rows ({filled:.0%} of --seq_len filled), {len(val_rows):,} validation "
            f"rows; {kind}"
            + (
                f"; the val loss reads them once: {val_steps} batches, not --val_steps {cfg.val_steps}"
                if val_steps < cfg.val_steps
                else ""
            )
        )
    loader_args = dict(
        process_rank=dist_info.rank, num_processes=dist_info.world_size, device=dist_info.device, pad_id=tokenizer.eot
    )
    train_loader = RowLoader(train_rows, cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed, **loader_args)
    val_loader = RowLoader(val_rows, cfg.batch_size, **loader_args)

    return Job(
        tokenizer,
        base.model.config,
        train_loader,
        val_loader,
        val_steps,
        base.make_model,
        get_lr=lambda step: sft_lr(step, cfg),
        checkpoint_extra=base.record,
    )


def print_plan(cfg):
    """finetune.py --plan: the memory of a step on each GPU with these flags (memory_plan.finetune_report),
    counted from --init's shapes and the parameters the adapters, prefixes and chat rows train. Neither the
    data nor --init's weights are read: its config is enough (checkpoint.init_config)."""
    check_peft(cfg)
    if not cfg.init:
        raise UserError("--plan counts --init's shapes: pass --init")
    if cfg.parallel == "fsdp" or cfg.cpu_offload:
        raise UserError("finetune.py --plan counts one process or DDP: drop --parallel fsdp and --cpu_offload")
    with torch.device("meta"):  # shapes only: the weights are never read
        model = GPT(checkpoint.init_config(cfg.init))
    # as for chat data, the usual case: the chat tokens' rows count (their ids do not matter here)
    adapters = adapter_record(cfg, chat_ids=list(range(len(CHAT_TOKENS))))
    trainable = sum(p.numel() for p in checkpoint.adapt(model, adapters, init=False).parameters() if p.requires_grad)
    gpu_gib = cfg.gpu_memory or (
        torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0
    )
    dtype, dtype_name = memory_plan.planned_dtype(cfg.dtype)
    print(
        memory_plan.finetune_report(
            model.config,
            cfg.batch_size,
            cfg.seq_len,
            dtype,
            trainable,
            cfg.base_quant,
            gpu_gib,
            dtype_name,
            cfg.optimizer,
        )
    )


@exit_on_error
def main(argv=None):
    cfg = parse_layered(argv, FinetuneConfig, preset_layers(FINETUNE_PRESETS), __doc__, HIDDEN)
    if cfg.plan:  # the memory plan only: no processes, no data
        return print_plan(cfg)
    launch(cfg, finetuning_job)


if __name__ == "__main__":
    main()
