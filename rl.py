"""
Reinforcement learning on verifiable rewards: a chat model samples several replies to each prompt, a
verifier scores them, and the replies that did better than their siblings are made more likely. The
training loop is train_gpt2.py's; this file brings the batches (rollouts) and the loss.

    python rl.py --init log/sft/model_00500.pt --task gsm8k --num_samples 8 --log_dir log/rl
    python rl.py --init log/sft/model_00500.pt --data_files rows.jsonl --reward contains --log_dir log/rl_rows
    python rl.py --init log/sft/model_00500.pt --data_files rows.jsonl --reward my_rewards:score ...
    torchrun --standalone --nproc_per_node=8 rl.py --init log/sft/model_00500.pt --task gsm8k
    python toy_tasks.py --out_dir data/addition      # the toy task, on a CPU in minutes:
    python rl.py --preset cpu --init log/add_sft/model_00300.pt --data_files data/addition/prompts.jsonl \
        --val_files data/addition/heldout.jsonl --log_dir log/add_rl
    python rl.py --bench_rollouts --preset cpu --init ... --data_files ...   # rollout speed, batched or not

Rows (--data_files) are {"messages": [...a conversation ending with a user turn...], "answer": "..."},
the rows chat_eval.py --task rows reads. --reward scores a reply: exact (the reply, stripped, is the
answer), contains (the answer appears in it), gsm8k (the number after "#### ", --task gsm8k's), or
module:function, your own function(reply, row) -> a reward in [0, 1]. The checkpoints are
finetune.py's: sample.py, chat.py and chat_eval.py load them.

The algorithm, each step (REINFORCE, Williams 1992, with GRPO's group baseline, Shao et al. 2024):
  1. take prompts; sample G = --num_samples replies to each from the model being trained, at
     --temperature 1 (the model's own distribution: the one the loss below differentiates);
  2. reward each reply r in [0, 1]; its advantage A = r - the mean reward of its group (the G replies
     to its prompt), divided by the group's standard deviation with --normalize_std;
  3. loss = -sum over every reply token t of the step of A * log p(t) / N, N the number of those
     tokens in the whole step (all micro-steps and processes): the reply's tokens and the special
     token that closed it (<|end|>), never the prompt or the padding.
A reply better than its siblings is pushed up, a worse one down, and a group whose replies all score
the same teaches nothing (A = 0: `no_signal` counts such groups). Left out, on purpose:
  - PPO/GRPO's clipped ratio p/p_old: it matters when one batch of rollouts is trained on for several
    steps. Here each batch is sampled by the very weights it trains, once, so the ratio is exactly 1
    and the clip never acts (tests/test_rl.py checks the gradient against the ratio form's).
  - by default, a KL penalty towards a reference model: it costs a second model's memory and forward
    pass, and recent recipes for verifiable rewards drop it (DAPO, Yu et al. 2025; Dr. GRPO, Liu et
    al. 2025; nanochat's RL). The small LR and few steps keep the model near its start. --kl_beta B
    adds B x KL(model || the model at step 0), estimated per sampled token with Schulman's k3 (rl_loss):
    a frozen copy of the policy as training starts it (--init; with --base_quant the quantized --init,
    whose copy costs its quantized bytes; with --peft prefix, --init with the prefixes at their start).
"""

import copy
import hashlib
import importlib
import numbers
import os
import sys
import time
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch

import chat_eval
import device
from completions import pad_rows, reply_row, token_logprobs
from config import flag, parse_layered, preset_layers
from dataloader import permutation
from errors import UserError, exit_on_error
from finetune import HIDDEN, FinetuneConfig, load_base, read_rows
from generate import generate_stream
from optim import sft_lr
from train_gpt2 import SCRIPT_DIR, Job, get_grad_accum_steps, launch

# Defaults, as train_gpt2.PRESETS (flags given still win). "rl": a GPT-2-sized SFT model on GSM8K, 16
# prompts x 8 replies per step (nanochat's RL: 16 x 16, 256 new tokens, temperature 1); its LR of 1e-5
# is a guess for GPT-2 124M, not measured. "cpu": the toy task (toy_tasks.py: single-digit sums,
# replies of a token and <|end|>) from its fine-tuned demo model, in minutes; LR 1e-4 measured against
# 3e-4 and 1e-3, which lost held-out accuracy (README, "Reinforcement learning on verifiable rewards").
RL_PRESETS = {
    "rl": {},
    "cpu": dict(
        batch_size=32,  # 4 prompts x 8 replies per micro-step
        seq_len=32,  # the toy prompts are 12 tokens
        total_batch_size=2048,  # 2 micro-steps: 8 prompts, 64 replies per step
        max_new_tokens=8,
        max_steps=60,
        warmup_steps=0,
        max_lr=1e-4,
        eval_interval=10,
        eval_samples=8,
        ckpt_interval=30,
        log_interval=5,
    ),
}


@dataclass
class RLConfig(FinetuneConfig):
    preset: str = flag(
        "rl",
        "a set of defaults: rl (GPT-2-sized models) or cpu (the toy task on a small model)",
        choices=tuple(RL_PRESETS),
    )
    task: str = flag(None, "gsm8k: train on GSM8K's train split, evaluate on its test split", choices=("gsm8k",))
    reward: str = flag(
        None, "exact, contains, gsm8k, or module:function (function(reply, row) -> [0, 1]); default: the task's"
    )
    num_samples: int = flag(8, "replies sampled per prompt (G): each reply's baseline is their mean reward", low=2)
    temperature: float = flag(1.0, "of the sampled replies: 1 samples the model's own distribution, the one trained")
    max_new_tokens: int = flag(256, "tokens per reply at most (GSM8K's train solutions: 99% under 185)", low=1)
    normalize_std: bool = flag(False, "divide each advantage by its group's reward std (GRPO; Dr. GRPO drops it)")
    kl_beta: float = flag(0.0, "weight of a KL penalty towards the model at step 0, k3 estimator (0: none)", 0)
    eval_samples: int = flag(1, "sampled replies per held-out prompt at each evaluation (pass@1, pass@k)", low=1)
    bench_rollouts: bool = flag(False, "measure rollout tokens/s, batched and one prompt at a time, then exit")
    # the defaults of finetune.py's flags that RL sets otherwise
    log_dir: str = flag(os.path.join(SCRIPT_DIR, "log", "rl"), "log.txt, metrics.jsonl and checkpoints go here")
    batch_size: int = flag(16, "replies per forward pass on each GPU: a multiple of --num_samples", low=1)
    seq_len: int = flag(512, "tokens per row at most: a prompt and its reply of --max_new_tokens", low=1)
    total_batch_size: int = flag(
        65536, "token slots per step: batch_size x seq_len x processes x accumulation (128 replies)", low=1
    )
    max_steps: int = flag(400, "optimizer steps (GSM8K's 7,473 prompts: 467 steps of 16)", low=1)
    warmup_steps: int = flag(0, "steps of linear LR warmup", low=0)
    max_lr: float = flag(1e-5, "peak learning rate, then a linear decay to min_lr_ratio x max_lr", low=0)
    eval_interval: int = flag(50, "steps between evaluations on the held-out prompts, and at the end (0: never)", 0)
    eval_limit: int = flag(0, "evaluate on the first N held-out prompts (0: all; GSM8K's test split has 1,319)", 0)
    ckpt_interval: int = flag(50, "steps between checkpoints (0: only the one written at the end)", low=0)
    log_interval: int = flag(1, "print every N-th step (log.txt and metrics.jsonl get every step)", low=1)


def check_rl_config(cfg, world_size):
    """Refuse, before anything loads, what cannot make a step."""
    if cfg.batch_size % cfg.num_samples:
        raise UserError(
            f"--batch_size {cfg.batch_size} is not a multiple of --num_samples {cfg.num_samples}: a micro-batch "
            f"holds whole groups (a prompt's {cfg.num_samples} replies); pass --batch_size "
            f"{max(1, cfg.batch_size // cfg.num_samples) * cfg.num_samples}"
        )
    if cfg.temperature <= 0:
        raise UserError(f"--temperature {cfg.temperature}: replies must be sampled (> 0), or a group's are all equal")
    if cfg.parallel == "fsdp" and (world_size > 1 or cfg.cpu_offload):
        raise UserError(
            "--parallel fsdp: sampling the replies needs the whole model on every process, which FSDP shards; "
            "train with --parallel ddp (with --lora_rank R if the model and AdamW do not fit otherwise)"
        )
    if cfg.max_new_tokens >= cfg.seq_len:
        raise UserError(f"--max_new_tokens {cfg.max_new_tokens} leaves no room in --seq_len {cfg.seq_len} for a prompt")


# ---- rewards: (reply text, row) -> a number in [0, 1] ------------------------------------------
# One table of verifiers (chat_eval.py's checks); --reward module:function adds yours.
REWARDS = {
    "exact": lambda reply, row: float(chat_eval.exact_match(reply, row["answer"])),
    "contains": lambda reply, row: float(chat_eval.contains_answer(reply, row["answer"])),
    "gsm8k": lambda reply, row: float(chat_eval.gsm8k_correct(reply, row["answer"])),
}


def import_reward(spec):
    """function from "module:function": module importable from here (the current folder included)."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise UserError(f"--reward {spec}: choose {', '.join(REWARDS)}, or module:function for your own")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--reward {spec}: cannot import {module_name} ({e}); run from the folder that holds it")
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"--reward {spec}: {module_name} has no function {function_name}")
    return function


def reward_function(spec):
    """The reward of --reward spec, checked: a reward outside [0, 1] (or not a number) is an error."""
    reward = REWARDS[spec] if spec in REWARDS else import_reward(spec)

    def checked(reply, row):
        value = reward(reply, row)
        if not isinstance(value, numbers.Real) or not 0 <= value <= 1:  # NaN fails the comparison too
            raise UserError(
                f"--reward {spec} gave {value!r} for the reply {reply[:80]!r}: rewards must be numbers in [0, 1]"
            )
        return float(value)

    return checked


# ---- the prompts ------------------------------------------------------------------------------
def checked_rows(rows, what):
    """Rows of {"messages", "answer"}, each checked (chat_eval.rows_problem)."""
    for i, row in enumerate(rows):
        problem = chat_eval.rows_problem(row)
        if problem:
            raise UserError(f"{what}, row {i + 1}: {problem}")
    return rows


def load_examples(cfg):
    """(task, training rows, held-out rows): chat_eval's task name ("gsm8k" or "rows") and its rows."""
    if sum(map(bool, (cfg.task, cfg.data_files, cfg.dataset))) != 1:
        raise UserError("pass the prompts with --task gsm8k, or --data_files (or --dataset): one of them")
    limit = cfg.eval_limit or None
    if cfg.task == "gsm8k":
        val = chat_eval.load_examples("gsm8k", limit=limit, split="test") if cfg.eval_interval else []
        return "gsm8k", chat_eval.load_examples("gsm8k", split="train"), val
    rows = checked_rows(read_rows(cfg.data_files, cfg.dataset, cfg), "training data")
    if cfg.val_files:
        return "rows", rows, checked_rows(read_rows(cfg.val_files, None, cfg), "validation data")[:limit]
    # a seeded split, the same on every rank and at every resume (finetune.py's)
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    n_val = max(1, round(cfg.val_fraction * len(rows))) if cfg.val_fraction > 0 and cfg.eval_interval else 0
    if cfg.eval_interval and (n_val == 0 or n_val >= len(rows)):
        raise UserError(
            f"{len(rows)} row(s): no held-out prompts to evaluate on; pass --val_files, --val_fraction above 0 "
            "with more rows, or --eval_interval 0"
        )
    return "rows", [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]][:limit]


def prompt_ids(task, rows, tokenizer, cfg, what):
    """The ids each row's reply follows (chat_eval's prompt of the task: the chat template), each with
    room for a reply of --max_new_tokens within --seq_len."""
    prompts = [chat_eval.TASKS[task].prompt(row, tokenizer, True) for row in rows]
    room = cfg.seq_len - cfg.max_new_tokens
    too_long = [i for i, prompt in enumerate(prompts) if len(prompt) > room]
    if too_long:
        i = too_long[0]
        raise UserError(
            f"{what}: {len(too_long)} prompt(s) longer than --seq_len {cfg.seq_len} - --max_new_tokens "
            f"{cfg.max_new_tokens} = {room} tokens (row {i + 1} has {len(prompts[i])}): raise --seq_len (at most "
            f"the model's context), lower --max_new_tokens, or leave them out"
        )
    return prompts


# ---- rollouts: replies sampled in one batch, and their advantages -------------------------------
@dataclass
class Reply:
    ids: list  # the sampled ids, the special token that ended the reply included (if one did)
    text: str  # the text before that token: what the verifier reads
    cut: bool  # no special token within max_new_tokens: cut short


@torch.no_grad()
def sample_replies(model, prompts, max_new_tokens, temperature, generator, tokenizer):
    """A Reply to each prompt (lists of ids), all sampled in one batched generation (left-padded, with
    the KV cache: generate.py). A reply ends at its first special token, as chat_eval.generate_replies
    has it; that token is kept in ids, as the model's choice to stop."""
    specials = set(tokenizer.special_tokens.values())
    stops = torch.tensor(sorted(specials), device=model.transformer.wte.weight.device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=stops.device)
    columns = []
    end = tokenizer.special("<|end|>")
    for next_id in generate_stream(model, prompts, max_new_tokens, temperature, generator=generator, eot=end):
        columns.append(next_id)  # (B,)
        done |= torch.isin(next_id, stops)
        if done.all():
            break  # generate_stream stops at <|end|> alone; any special token ends a reply
    replies = []
    for ids in torch.stack(columns, dim=1).tolist():
        stop = next((j for j, token in enumerate(ids) if token in specials), None)
        kept = ids if stop is None else ids[: stop + 1]
        replies.append(Reply(kept, tokenizer.decode(ids[:stop]), stop is None))
    return replies


def group_advantages(rewards, group_size, normalize_std=False):
    """(n,) float32 advantages of n rewards in consecutive groups of group_size: each reward minus its
    group's mean, divided by the group's standard deviation with normalize_std (a group whose rewards
    are all equal gets 0s either way)."""
    r = torch.tensor(rewards, dtype=torch.float32).view(-1, group_size)  # (groups, G)
    advantages = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        advantages = advantages / (r.std(dim=1, unbiased=False, keepdim=True) + 1e-6)
    return advantages.view(-1)


@dataclass
class Rollout:
    prompt: list  # ids
    reply: Reply
    reward: float


@dataclass
class RolloutBatch:
    """One micro-batch: rows = prompt + reply, the reply's tokens the targets (completions.reply_row)."""

    x: torch.Tensor  # (B, L) right-padded
    y: torch.Tensor  # (B, L) the reply's ids, -1 elsewhere
    weights: torch.Tensor  # (B, L) float32: each target's advantage x the step's scale (below), 0 elsewhere
    figures: dict  # 0-dim tensors: this micro-batch's means, which train_step averages into the step's
    tokens: int  # real tokens (prompt + reply)
    scale: float  # grad_accum_steps x world_size / N: a sum over this micro-batch x scale is its share of the step's
    ref_logp: torch.Tensor = None  # (B, L) log p_ref(y) of the reference model (--kl_beta), 0 off the reply


def step_batches(rollouts, group_size, batch_size, normalize_std, world_size, pad_id, device_name):
    """This rank's rollouts of one optimizer step as micro-batches of batch_size rows, whole groups each.

    The step's loss is -sum(A * log p(t)) / N over all reply tokens t of the step, N their number on
    all processes: N is all-reduced here, once per step (every rank calls this at the same micro-step).
    train_step divides each micro-step's loss by grad_accum_steps, and DDP averages the gradients over
    world_size processes; so each micro-batch's summed loss is weighted by grad_accum_steps x
    world_size / N, and what the update sees is the sum over the whole step over N, whatever the split
    into micro-steps and processes. A micro-batch sums: one with no target contributes 0, not NaN."""
    grad_accum_steps = len(rollouts) // batch_size
    advantages = group_advantages([r.reward for r in rollouts], group_size, normalize_std)
    n = torch.tensor(float(sum(len(r.reply.ids) for r in rollouts)), dtype=device.sum_dtype(device_name))
    n = device.all_reduce_sum(n.to(device_name), world_size).item()
    scale = grad_accum_steps * world_size / max(n, 1.0)
    batches = []
    for start in range(0, len(rollouts), batch_size):
        part = rollouts[start : start + batch_size]
        rows = [reply_row(r.prompt, r.reply.ids) for r in part]
        x, y = pad_rows(rows, pad_id, device_name)
        weights = (y >= 0).float() * (advantages[start : start + batch_size] * scale).to(device_name)[:, None]
        rewards = torch.tensor([r.reward for r in part]).view(-1, group_size)  # (groups, G)
        figures = {
            "reward": rewards.mean(),
            "no_signal": (rewards.amax(dim=1) == rewards.amin(dim=1)).float().mean(),  # groups with all A = 0
            "reply_len": torch.tensor([float(len(r.reply.ids)) for r in part]).mean(),
            "cut": torch.tensor([float(r.reply.cut) for r in part]).mean(),
        }
        figures = {name: value.to(device_name) for name, value in figures.items()}
        batches.append(RolloutBatch(x, y, weights, figures, sum(len(xs) for xs, _ in rows), scale))
    return batches


def rl_loss(model, batch, kl_beta=0.0):
    """The policy-gradient loss of a RolloutBatch, -sum(weight x log p(target)), and its figures; with
    kl_beta (and the batch's ref_logp) plus kl_beta x the KL estimate, itself a figure."""
    logp = token_logprobs(model, batch.x, batch.y)  # (B, L), 0 off the reply
    loss = -(batch.weights * logp).sum()
    if not kl_beta:
        return loss, batch.figures
    # k3 (Schulman 2020, "Approximating KL Divergence"): exp(r) - r - 1 with r = log p_ref - log p of a
    # token sampled from p is >= 0 and, in expectation, KL(p || p_ref); 0 off the reply, where r = 0.
    # Summed x scale as the loss is, the step's figure is the mean over its reply tokens.
    r = batch.ref_logp - logp
    kl = ((torch.exp(r) - r - 1) * (batch.y >= 0)).sum() * batch.scale
    return loss + kl_beta * kl, {**batch.figures, "kl": kl.detach()}


class RolloutLoader:
    """next_batch() -> a RolloutBatch of batch_size replies: batch_size / G prompts, G replies each.

    At the first micro-step of every optimizer step it samples the replies of the whole step of this
    rank, grad_accum_steps x batch_size of them, in one batched generation by the current weights
    (`policy`, set by the job's make_model), rewards them and hands them out one micro-batch at a time.

    The prompts are dealt out as RowLoader deals out rows: one endless stream (each epoch a seeded
    permutation), each step taking the next world_size x grad_accum_steps x batch_size / G of them,
    rank r the r-th share. `position` (prompts taken) is the whole state: saved in checkpoints, it
    makes a resumed run take the same prompts, and the sampling's generator, seeded from (seed,
    position, rank), the same replies."""

    pads_rows, rows_per_example = True, 1

    def __init__(self, prompts, rows, reward, tokenizer, cfg, dist_info, grad_accum_steps):
        self.prompts, self.rows, self.reward, self.tokenizer, self.cfg = prompts, rows, reward, tokenizer, cfg
        self.rank, self.world_size, self.device = dist_info.rank, dist_info.world_size, dist_info.device
        self.grad_accum_steps = grad_accum_steps
        self.prompts_per_rank = grad_accum_steps * cfg.batch_size // cfg.num_samples  # per step
        self.precision = device.setup_precision(cfg.dtype, dist_info.device_type)  # the loop's autocast dtype
        ids = np.array([token for prompt in prompts for token in [len(prompt), *prompt]], dtype=np.int64)
        self.fingerprint = hashlib.sha256(ids.tobytes()).hexdigest()  # which prompts, in which order
        self.policy = None  # the model being trained: Job.make_model sets it
        self.reference = None  # --kl_beta: the policy at step 0, frozen (set by make_model too), else None
        self.last_batch_tokens = 0
        self._order_epoch = self._order = None
        self.reset()

    def reset(self):
        self.position = 0
        self.pending = []  # the step's micro-batches not handed out yet

    @property
    def epoch(self):
        return self.position // len(self.prompts)

    def row(self, i):
        """(prompt ids, row) of prompt i of the endless stream."""
        epoch, within = divmod(i, len(self.prompts))
        if self.cfg.shuffle:
            if self._order_epoch != epoch:
                self._order, self._order_epoch = permutation(len(self.prompts), self.cfg.seed, epoch, 0), epoch
            within = int(self._order[within])
        return self.prompts[within], self.rows[within]

    def step_prompts(self):
        """This rank's prompts of the next step, and the seed of its sampling; moves the position on."""
        first = self.position + self.rank * self.prompts_per_rank
        seed = np.random.SeedSequence([self.cfg.seed, self.position, self.rank]).generate_state(1)[0]
        self.position += self.world_size * self.prompts_per_rank
        return [self.row(i) for i in range(first, first + self.prompts_per_rank)], int(seed)

    def sample_step(self):
        G, cfg = self.cfg.num_samples, self.cfg
        chosen, seed = self.step_prompts()
        generator = torch.Generator(self.device).manual_seed(seed)
        prompts = [prompt for prompt, _ in chosen for _ in range(G)]  # each prompt's group side by side
        self.policy.eval()
        with self.precision.autocast():
            replies = sample_replies(
                self.policy, prompts, cfg.max_new_tokens, cfg.temperature, generator, self.tokenizer
            )
        self.policy.train()
        rollouts = [
            Rollout(prompt, reply, self.reward(reply.text, chosen[i // G][1]))
            for i, (prompt, reply) in enumerate(zip(prompts, replies))
        ]
        args = (cfg.batch_size, cfg.normalize_std, self.world_size, self.tokenizer.eot, self.device)
        batches = step_batches(rollouts, G, *args)
        if self.reference is not None:
            with torch.no_grad(), self.precision.autocast():
                for batch in batches:
                    batch.ref_logp = token_logprobs(self.reference, batch.x, batch.y)
        return batches

    def next_batch(self):
        if not self.pending:
            self.pending = self.sample_step()
        batch = self.pending.pop(0)
        self.last_batch_tokens = batch.tokens
        return batch

    def state_dict(self):
        keys = ("seed", "shuffle", "num_samples", "batch_size", "max_new_tokens", "temperature")
        return {"position": self.position, "prompts": len(self.prompts), "fingerprint": self.fingerprint} | {
            key: getattr(self.cfg, key) for key in keys
        }

    def load_state_dict(self, state):
        mine = self.state_dict()
        for key, value in mine.items():
            if key != "position" and state.get(key) != value:
                raise UserError(
                    f"cannot resume: the checkpoint's rollouts had {key}={state.get(key)}, this run's {value} (other "
                    f"prompts, --val_fraction or sampling flags?): resume with the same ones"
                )
        self.position, self.pending = state["position"], []


# ---- evaluation: accuracy on held-out prompts (chat_eval.evaluate) ------------------------------
def validate(run, model, task, rows, reward):
    """Greedy accuracy (the mean reward of the greedy replies) on the held-out rows, and with
    --eval_samples k > 1 pass@1 and pass@k of k replies sampled at --temperature: the Job's validate."""
    cfg = run.cfg
    settings = chat_eval.EvalSettings(cfg.max_new_tokens, 1, 0.0, cfg.batch_size, cfg.seed, match=reward)
    greedy = chat_eval.evaluate(task, model, run.tokenizer, rows, run.dist, run.precision, settings)
    figures = {"greedy_acc": greedy["greedy_acc"]}
    if cfg.eval_samples > 1:
        settings = replace(settings, num_samples=cfg.eval_samples, temperature=cfg.temperature)
        sampled = chat_eval.evaluate(task, model, run.tokenizer, rows, run.dist, run.precision, settings)
        figures |= {name: value for name, value in sampled.items() if name.startswith("pass@") and "stderr" not in name}
    return figures


# ---- the run ----------------------------------------------------------------------------------
def rl_job(cfg, dist_info):
    """The Job of train_gpt2.train: the --init model, the rollouts as batches, the RL loss, the accuracy."""
    check_rl_config(cfg, dist_info.world_size)
    task, rows, val_rows = load_examples(cfg)
    reward = reward_function(cfg.reward or ("gsm8k" if task == "gsm8k" else "exact"))
    base = load_base(cfg, dist_info, is_chat=True)  # a chat model: the rows are conversations
    tokenizer = base.tokenizer
    prompts = prompt_ids(task, rows, tokenizer, cfg, "training prompts")
    prompt_ids(task, val_rows, tokenizer, cfg, "held-out prompts")
    grad_accum_steps = get_grad_accum_steps(cfg, dist_info.world_size)
    loader = RolloutLoader(prompts, rows, reward, tokenizer, cfg, dist_info, grad_accum_steps)
    per_step = loader.prompts_per_rank * dist_info.world_size
    if len(prompts) < per_step:  # a step would take some prompts twice
        raise UserError(
            f"{len(prompts)} training prompts, fewer than one step's {per_step}: lower --total_batch_size or "
            "--batch_size, or add prompts"
        )
    if dist_info.is_master:
        print(
            f"{len(prompts):,} training prompts, {len(val_rows):,} held out; each step {per_step} prompts x "
            f"{cfg.num_samples} replies = {per_step * cfg.num_samples} replies ({cfg.batch_size} per micro-step, "
            f"{grad_accum_steps} micro-step(s) x {dist_info.world_size} process(es)), "
            f"{len(prompts) / per_step:.1f} steps per epoch"
        )

    def make_model():  # called once by train, seeded, before a checkpoint's weights are restored into it
        loader.policy = base.make_model()
        if cfg.kl_beta:  # the reference: the policy at step 0, frozen
            loader.reference = copy.deepcopy(loader.policy).eval().requires_grad_(False)
        return loader.policy

    return Job(
        tokenizer,
        base.model.config,
        loader,
        None,  # no val loss: validate measures accuracy
        0,
        make_model,
        get_lr=lambda step: sft_lr(step, cfg),
        checkpoint_extra=base.record,
        loss=partial(rl_loss, kl_beta=cfg.kl_beta),
        validate=lambda run, model: validate(run, model, task, val_rows, reward),
    )


# ---- rollout speed ----------------------------------------------------------------------------
def bench_rollouts(model, prompts, group_size, max_new_tokens, temperature, tokenizer, seed=0):
    """Reply tokens per second of sampling group_size replies to each prompt: all in one batch, a
    prompt's group at a time, and one reply at a time. -> {mode: (reply tokens, seconds)}."""
    dev = model.transformer.wte.weight.device

    def timed(batches):
        generator = torch.Generator(dev).manual_seed(seed)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start, tokens = time.perf_counter(), 0
        for batch in batches:
            replies = sample_replies(model, batch, max_new_tokens, temperature, generator, tokenizer)
            tokens += sum(len(reply.ids) for reply in replies)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return tokens, time.perf_counter() - start

    rows = [prompt for prompt in prompts for _ in range(group_size)]
    timed([rows[:group_size]])  # warm-up: the first generation allocates and (on a GPU) initialises
    return {
        "all at once": timed([rows]),
        "a prompt at a time": timed([rows[i : i + group_size] for i in range(0, len(rows), group_size)]),
        "a reply at a time": timed([[row] for row in rows]),
    }


def run_bench(cfg):
    """--bench_rollouts: the first step's prompts of this run, its model, its sampling; nothing written."""
    dist_info = device.setup_distributed(cfg.device)
    if dist_info.world_size > 1:
        raise UserError("--bench_rollouts measures one process: run it with python, not torchrun")
    job = rl_job(cfg, dist_info)
    model = job.make_model().eval()
    chosen, _ = job.train_loader.step_prompts()
    prompts = [prompt for prompt, _ in chosen]
    with job.train_loader.precision.autocast():
        results = bench_rollouts(model, prompts, cfg.num_samples, cfg.max_new_tokens, cfg.temperature, job.tokenizer)
    print(f"{len(prompts)} prompts x {cfg.num_samples} replies, on {dist_info.device}:")
    for mode, (tokens, seconds) in results.items():
        print(f"  {mode:>18}: {tokens:6d} reply tokens in {seconds:7.2f} s = {tokens / seconds:9,.0f} tokens/s")
    return results


@exit_on_error
def main(argv=None):
    cfg = parse_layered(argv, RLConfig, preset_layers(RL_PRESETS), __doc__, (*HIDDEN, "val_steps"))
    if cfg.bench_rollouts:
        return run_bench(cfg)
    launch(cfg, rl_job)


if __name__ == "__main__":
    main()
