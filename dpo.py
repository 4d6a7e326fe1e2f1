"""
Preference tuning with DPO (Direct Preference Optimization, Rafailov et al. 2023): from pairs of
replies to one prompt, one preferred ("chosen") to the other ("rejected"), teach a chat model to make
the chosen reply more likely than the rejected one, measured from where it started; with
train_gpt2.py's training loop.

    python dpo.py --init log/sft/model_00500.pt --data_files pairs.jsonl --log_dir log/dpo
    python dpo.py --init log/sft/model_00500.pt --data_files pairs.jsonl --lora_rank 8 --max_lr 5e-5
    torchrun --standalone --nproc_per_node=8 dpo.py --init log/sft/model_00500.pt --data_files pairs.jsonl
    python toy_tasks.py --out_dir data/addition              # single-digit addition, on a CPU in minutes:
    python dpo.py --preset cpu --init log/add_sft/model_00300.pt --data_files data/addition/pairs.jsonl \\
        --log_dir log/add_dpo
    python chat.py --checkpoint log/dpo/model_00500.pt       # sample.py, chat_eval.py load it too

--init is the model to improve, usually a chat model from finetune.py. Pairs, one per row, in TRL's
preference formats:
    {"prompt": [{"role": "user", "content": "2 + 3?"}],
     "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}]}
    {"prompt": "2 + 3?", "chosen": "5", "rejected": "6"}              the prompt as one user turn
    {"chosen": [..., {"role": "assistant", ...}], "rejected": [...]}  the prompt is what both share before the reply

The reference model is the model as training starts it: its log-probs of every pair are computed
once, before the first step, and kept with the pairs. That is --init itself, also with LoRA (its B is 0
at step 0: "the adapters off"); on a quantized base (--base_quant) it is the quantized --init, and with
--peft prefix, --init with the prefixes at their start. The flags are finetune.py's (--lora_rank,
--peft, --base_quant, --val_fraction / --val_files, --dtype, ...) with DPO's defaults, and --beta,
--rpo_alpha; --batch_size counts pairs. The checkpoints are finetune.py's.
"""

# The loss of one pair: x the prompt, y+ the chosen reply, y- the rejected one, pi the model being
# trained, ref the model at step 0, log p(y|x) the SUMMED log-probability of a reply's tokens and its
# <|end|> (completions.chat_reply_row: the chat template's tokens, the prompt's ids the same for both):
#
#     reward(y) = beta * (log pi(y|x) - log ref(y|x))                the "implicit reward" of a reply
#     loss = -log sigmoid(reward(y+) - reward(y-))                   ln 2 = 0.6931 at step 0, where pi = ref
#
# The DPO paper shows that this is RLHF's objective (maximise a reward, minus beta x the KL divergence
# from ref) with the reward model solved away: no reward model, no sampling, just the log-probs of
# two replies per pair. beta sets how far pi may move from ref. The gradient, -beta * sigmoid(-margin)
# for log pi(y+|x) and the opposite for log pi(y-|x), is largest for pairs the model still gets wrong.
# Nothing in it keeps log pi(y+|x) itself from falling (both may fall, the rejected one faster):
# --rpo_alpha adds alpha x the chosen reply's mean per-token NLL (RPO, Pang et al. 2024), which does.
#
# The reference log-probs never change, so they are computed once, by the model as training starts it
# (add_reference, before the first step), and stored with the pairs: no second model in memory. DPO's
# ref is the policy's starting point: with LoRA that IS the --init model (B = 0: "the adapters off");
# on a quantized base it is the quantized model, and with prefixes, --init with its initial prefixes.
# Taking ref from the float --init instead would start those runs away from ln 2, with a margin that
# measures the quantization or the prefix, not the preferences.

import functools
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import device
from chat_template import check_conversation
from completions import chat_reply_row, pad_rows, reply_logprobs, token_logprobs
from config import flag, parse_layered, preset_layers
from errors import UserError, exit_on_error
from finetune import HIDDEN, FinetuneConfig, RowLoader, hold_out, load_base, read_rows
from optim import sft_lr
from train_gpt2 import SCRIPT_DIR, Job, launch


# ---- the loss ----------------------------------------------------------------------------------
def preference_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta):
    """DPO's loss of each pair and the implicit rewards of its two replies, all (B,), from the summed
    log-probs of the replies under the model and under the reference."""
    chosen_reward = beta * (logp_chosen - ref_chosen)
    rejected_reward = beta * (logp_rejected - ref_rejected)
    # -log sigmoid(m) = log(1 + e^-m): logsigmoid computes it without overflow for any margin m
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


def pair_figures(model, batch, beta, rpo_alpha):
    """{figure: (B,) one value per pair} of a batch of B pairs: the loss (with RPO's term), the rewards,
    their margin, whether the chosen reply wins (accuracy), and with rpo_alpha the chosen reply's NLL."""
    x, y, ref = batch  # (2B, L), (2B, L), (2B,): the chosen replies in rows 0..B-1, the rejected in B..2B-1
    logps = token_logprobs(model, x, y)  # (2B, L), 0 off the replies: one forward for both replies
    B = x.size(0) // 2
    logp = logps.sum(dim=1)  # (2B,)
    loss, chosen_reward, rejected_reward = preference_loss(logp[:B], logp[B:], ref[:B], ref[B:], beta)
    figures = dict(
        loss=loss,
        chosen_reward=chosen_reward,
        rejected_reward=rejected_reward,
        margin=chosen_reward - rejected_reward,
        accuracy=(chosen_reward > rejected_reward).float(),
    )
    if rpo_alpha:
        figures["nll"] = -logp[:B] / (y[:B] >= 0).sum(dim=1)  # per token of each chosen reply
        figures["loss"] = loss + rpo_alpha * figures["nll"]
    return figures


def dpo_loss(model, batch, beta, rpo_alpha):
    """Job.loss: the mean over the pairs of the batch of the loss, and of the other figures (the step line's)."""
    figures = {name: values.mean() for name, values in pair_figures(model, batch, beta, rpo_alpha).items()}
    return figures.pop("loss"), figures


# ---- the pairs: rows of the data -> token rows -------------------------------------------------
@dataclass
class Pair:
    """A preference pair as two token rows, (x, y) each (completions.chat_reply_row): the prompt then
    the chosen reply, the prompt then the rejected reply; and their summed log-probs under the
    reference model (add_reference)."""

    chosen: tuple
    rejected: tuple
    ref_chosen: float = None
    ref_rejected: float = None


def reply_text(reply):
    """The text of a reply given as a string or as [one assistant message], else None."""
    if isinstance(reply, str):
        return reply
    if isinstance(reply, list) and len(reply) == 1 and isinstance(reply[0], dict):
        if reply[0].get("role") == "assistant" and isinstance(reply[0].get("content"), str):
            return reply[0]["content"]
    return None


def pair_of(row):
    """(prompt messages, chosen text, rejected text) of a row in one of the formats of the docstring,
    or what is wrong with it (a string)."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        return "no `chosen` and `rejected`"
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if prompt is None:  # the implicit prompt: two conversations that differ in their last turn only
        if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen[:-1] == rejected[:-1]):
            return "no `prompt`, and `chosen` and `rejected` are not conversations that differ in their last turn only"
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    chosen, rejected = reply_text(chosen), reply_text(rejected)
    if chosen is None or rejected is None:
        return "`chosen` and `rejected` must each be a reply: a string, or [one assistant message]"
    if not isinstance(prompt, list):
        return "`prompt` must be a string or a list of messages"
    problem = check_conversation([*prompt, {"role": "assistant", "content": chosen}])
    if problem:  # the prompt's roles must alternate and end with the user's turn
        return f"the prompt and its reply: {problem}"
    if chosen == rejected:
        return "`chosen` and `rejected` are the same reply: nothing to prefer"
    return prompt, chosen, rejected


def pair_rows(rows, tokenizer, seq_len, counts):
    """The Pair of each usable row; counts: how many rows were skipped or cut, and why. A row (prompt +
    reply) longer than seq_len tokens is cut to its first seq_len, as in finetune.py: the prompt and
    the start of the reply, whose <|end|> is then lost."""

    def count(reason):
        counts[reason] = counts.get(reason, 0) + 1

    for row in rows:
        pair = pair_of(row)
        if isinstance(pair, str):
            count(pair)
            continue
        prompt, chosen, rejected = pair
        chosen, rejected = (chat_reply_row(prompt, reply, tokenizer) for reply in (chosen, rejected))
        if max(len(chosen[0]), len(rejected[0])) > seq_len:
            chosen, rejected = ((x[:seq_len], y[:seq_len]) for x, y in (chosen, rejected))
            if all(t == -1 for t in chosen[1]) or all(t == -1 for t in rejected[1]):
                count("a reply with no token within --seq_len")
                continue
            if chosen == rejected:
                count("`chosen` and `rejected` the same within --seq_len")
                continue
            count("cut to --seq_len (kept)")
        yield Pair(chosen, rejected)


def tokenized_pairs(rows, tokenizer, seq_len, what, is_master):
    """pair_rows, with the rows skipped or cut said once; no usable pair at all is an error."""
    counts = {}
    pairs = list(pair_rows(rows, tokenizer, seq_len, counts))
    reasons = [f"{n:,} row(s): {reason}" + ("" if "kept" in reason else " (skipped)") for reason, n in counts.items()]
    if not pairs:
        raise UserError(
            f"{what}: no usable preference pairs ({'; '.join(reasons) or 'no rows'}); a row needs `prompt`, `chosen` "
            f"and `rejected` in one of TRL's formats (python dpo.py --help)"
        )
    if is_master:
        for reason in reasons:
            print(f"{what}: {reason}")
    return pairs


# ---- batches -----------------------------------------------------------------------------------
def pad_pairs(pairs, pad_id, device, max_len):
    """x, y (2B, L) of B pairs: the chosen rows, then the rejected rows, right-padded (y -1) to their
    longest rounded up to a multiple of 64, at most max_len (RowLoader's few shapes, for torch.compile)."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return pad_rows(rows, pad_id, device, min(max_len, -(-max(len(x) for x, _ in rows) // 64) * 64))


def pair_batch(pairs, pad_id, device, max_len):
    """(x, y, ref) of B pairs: pad_pairs' x and y, and ref (2B,) float32, the rows' reference log-probs."""
    ref = [p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs]
    return *pad_pairs(pairs, pad_id, device, max_len), torch.tensor(ref, dtype=torch.float32, device=device)


class PairLoader(RowLoader):
    """next_batch() -> pair_batch of the next B pairs of this rank. The pairs are dealt out as
    RowLoader deals rows (one seeded stream, its position one integer): resume is exact on any
    number of processes, and the reference log-probs come with each pair."""

    rows_per_example = 2  # a chosen and a rejected reply, in one forward

    def __init__(self, pairs, B, **kwargs):
        # RowLoader's set-up over the token rows (its T, and the fingerprint a resume checks), then
        # its dealing over the pairs
        super().__init__([row for p in pairs for row in (p.chosen, p.rejected)], B, **kwargs)
        self.rows = pairs

    def first_epoch(self):
        """The batches of pairs of the stream's first pass over the pairs, every rank's, in order."""
        return [[self.row(i) for i in range(k * self.B, (k + 1) * self.B)] for k in range(-(-len(self.rows) // self.B))]

    def next_batch(self):
        first = (self.position + self.process_rank) * self.B
        self.position += self.num_processes
        pairs = [self.row(i) for i in range(first, first + self.B)]
        self.last_batch_tokens = sum(len(p.chosen[0]) + len(p.rejected[0]) for p in pairs)
        return pair_batch(pairs, self.pad_id, self.device, self.T)


@torch.no_grad()
def add_reference(model, batches, max_len, pad_id, precision, dist_info):
    """Set ref_chosen and ref_rejected of the pairs in batches (lists of Pairs): the summed log-probs of
    their replies under model (as training starts it), once, before the first step. Each batch is padded as
    training (or validation) will pad it: a row's numbers change in their last bits with the padding
    around them, and so at step 0 the model's log-probs equal the reference's exactly (on a CPU; a GPU's
    compiled kernels round otherwise), the loss is ln 2 and no reply wins. Batch k is computed by rank
    k % world_size, and every rank gets all of them."""
    mine = {}
    model.eval()
    for k in range(dist_info.rank, len(batches), dist_info.world_size):
        x, y = pad_pairs(batches[k], pad_id, dist_info.device, max_len)
        with precision.autocast():
            mine[k] = reply_logprobs(model, x, y).tolist()
    model.train()
    logps = {k: values for part in device.all_gather(mine, dist_info.world_size) for k, values in part.items()}
    for k, batch in enumerate(batches):
        B = len(batch)
        for pair, chosen, rejected in zip(batch, logps[k][:B], logps[k][B:]):
            if pair.ref_chosen is None:  # a pair read twice (the epoch's last batch wraps around) keeps its first
                pair.ref_chosen, pair.ref_rejected = chosen, rejected


def validation_batches(pairs, batch_size, val_steps, world_size):
    """The batches of held-out pairs each validation reads: the first val_steps x batch_size x processes
    pairs at most, each once, in batches of batch_size (batch k on rank k % world_size)."""
    pairs = pairs[: val_steps * batch_size * world_size]
    return [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]


@torch.no_grad()
def validate(run, model, batches, pad_id):
    """Job.validate: pair_figures' means over the held-out pairs (validation_batches, dealt out to the
    ranks), the sums all-reduced as train_gpt2.val_loss does."""
    cfg, rank, world_size = run.cfg, run.dist.rank, run.dist.world_size
    names = ["loss", "chosen_reward", "rejected_reward", "margin", "accuracy"] + (["nll"] if cfg.rpo_alpha else [])
    sums = torch.zeros(len(names) + 1, dtype=device.sum_dtype(run.dist.device), device=run.dist.device)
    for batch in batches[rank::world_size]:
        with run.precision.autocast():
            figures = pair_figures(
                model, pair_batch(batch, pad_id, run.dist.device, cfg.seq_len), cfg.beta, cfg.rpo_alpha
            )
        sums += torch.stack([*(figures[name].sum().to(sums.dtype) for name in names), sums.new_tensor(len(batch))])
    *totals, n = device.all_reduce_sum(sums, world_size).tolist()
    return {name: total / n for name, total in zip(names, totals)}


# ---- the run -----------------------------------------------------------------------------------
# Defaults, as finetune.FINETUNE_PRESETS (flags given still win). "cpu": toy_tasks.py's pairs (rows of
# ~12 tokens) on the demo's model size after finetune.py --preset cpu, a few minutes on 2 CPU cores.
# With RPO's term: in those pairs the rejected answer is always the right one + 1, and plain DPO
# learns "say a smaller number": its greedy replies said a + b - 1 or - 2, right on 2 of the 80
# training sums (3 at --max_lr 3e-5), from 33 after fine-tuning, with a preference accuracy of 1.0 all
# the same. The NLL of the chosen replies anchors them: 73 of 80 right (held-out sums: 15 of 20, from 10).
DPO_PRESETS = {
    "dpo": {},
    "cpu": dict(
        batch_size=16,
        seq_len=32,
        total_batch_size=512,  # 16 pairs per step, one micro-step
        max_lr=1e-4,
        rpo_alpha=1.0,
        warmup_steps=10,
        max_steps=150,
        eval_interval=25,
        ckpt_interval=50,
        log_interval=10,
    ),
}


@dataclass
class DPOConfig(FinetuneConfig):
    preset: str = flag(
        "dpo",
        "a set of defaults: dpo (models of GPT-2's size) or cpu (toy_tasks.py's pairs on a small model)",
        choices=tuple(DPO_PRESETS),
    )
    init: str = flag(None, "the model to improve (usually finetune.py's): a checkpoint, a Hugging Face folder, gpt2...")
    data_files: list = flag(None, "local .jsonl / .json / .parquet files of preference pairs (the formats above)")
    val_files: list = flag(None, "held-out pairs for the validation figures (default: --val_fraction of the pairs)")
    val_fraction: float = flag(
        0.05, "share of the pairs held out for the validation figures, when there are no --val_files", 0, 0.5
    )
    beta: float = flag(
        0.1, "the weight of the KL penalty: how far the model may move from --init (DPO paper: 0.1; 0.01-0.5 usual)"
    )
    rpo_alpha: float = flag(
        0.0, "weight of the chosen replies' per-token NLL added to the loss (RPO, Pang et al. 2024: 1.0; 0: DPO)", 0
    )
    log_dir: str = flag(os.path.join(SCRIPT_DIR, "log", "dpo"), "log.txt, metrics.jsonl and checkpoints go here")
    batch_size: int = flag(8, "pairs per forward pass on each GPU: 2 x batch_size rows (chosen, rejected)", low=1)
    seq_len: int = flag(512, "tokens per row (prompt + reply) at most: longer pairs are cut (and counted)", low=1)
    total_batch_size: int = flag(
        32768,
        "pairs per optimizer step x seq_len (batch_size x seq_len x processes x accumulation): 64 pairs, the DPO "
        "paper's batch",
        low=1,
    )
    max_lr: float = flag(
        5e-6, "peak learning rate: DPO moves a model little (DPO paper: 1e-6; LoRA takes more, e.g. 5e-5)", low=0
    )
    val_steps: int = flag(20, "batches of pairs per process for the validation figures, each pair read once", low=1)


def dpo_job(cfg, dist_info):
    """The Job of train_gpt2.train: the --init model (with LoRA adapters, prefixes or a quantized base if
    asked), the pairs with their reference log-probs (by that model at step 0), DPO's loss and validation,
    fine-tuning's LR schedule."""
    if not cfg.beta > 0:
        raise UserError(f"--beta {cfg.beta}: it must be above 0 (the DPO paper's is 0.1)")
    if bool(cfg.data_files) == bool(cfg.dataset):
        raise UserError("pass the pairs with --data_files (local files) or --dataset (a Hugging Face id), one of them")
    rows = read_rows(cfg.data_files, cfg.dataset, cfg)
    base = load_base(cfg, dist_info, is_chat=True)
    tokenizer, is_master = base.tokenizer, dist_info.is_master
    train_pairs = tokenized_pairs(rows, tokenizer, cfg.seq_len, "training data", is_master)
    if cfg.val_files:
        val_rows = read_rows(cfg.val_files, None, cfg)
        val_pairs = tokenized_pairs(val_rows, tokenizer, cfg.seq_len, "validation data", is_master)
    else:
        train_pairs, val_pairs = hold_out(train_pairs, cfg.val_fraction, cfg.seed)
    if len(train_pairs) < cfg.batch_size * dist_info.world_size:  # a step would read some pairs twice
        raise UserError(
            f"{len(train_pairs)} training pairs, fewer than one micro-step's {dist_info.world_size} x "
            f"{cfg.batch_size}: lower --batch_size, or add pairs"
        )

    loader_args = dict(
        process_rank=dist_info.rank, num_processes=dist_info.world_size, device=dist_info.device, pad_id=tokenizer.eot
    )
    train_loader = PairLoader(train_pairs, cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed, **loader_args)
    val_batches = validation_batches(val_pairs, cfg.batch_size, cfg.val_steps, dist_info.world_size)

    precision = device.setup_precision(cfg.dtype, dist_info.device_type)  # the autocast training will use

    def make_model():  # called once by train, seeded: the policy at step 0 is the reference
        started = time.perf_counter()
        model = base.make_model()
        add_reference(model, train_loader.first_epoch(), train_loader.T, tokenizer.eot, precision, dist_info)
        add_reference(model, val_batches, cfg.seq_len, tokenizer.eot, precision, dist_info)
        if is_master:
            print(
                f"{len(train_pairs):,} training pairs, {len(val_pairs):,} validation pairs (each validation reads "
                f"{sum(map(len, val_batches)):,} in {len(val_batches)} batches); their reference log-probs, by "
                f"the model at step 0: {time.perf_counter() - started:.1f} s"
            )
        return model

    return Job(
        tokenizer,
        base.model.config,
        train_loader,
        None,  # no val_loader: validate reads the held-out pairs itself
        cfg.val_steps,
        make_model,
        get_lr=lambda step: sft_lr(step, cfg),
        checkpoint_extra=base.record,
        loss=functools.partial(dpo_loss, beta=cfg.beta, rpo_alpha=cfg.rpo_alpha),
        validate=functools.partial(validate, batches=val_batches, pad_id=tokenizer.eot),
    )


@exit_on_error
def main(argv=None):
    launch(parse_layered(argv, DPOConfig, preset_layers(DPO_PRESETS), __doc__, HIDDEN), dpo_job)


if __name__ == "__main__":
    main()
