"""
Train GPT-2 (124M) on 10B tokens of FineWeb-Edu: the recipe of the GPT-2 and GPT-3 papers.

    python fineweb.py                                           # once: writes the shards to edu_fineweb10B/
    python train_gpt2.py                                        # one GPU (or the CPU / Apple MPS)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py      # 8 GPUs on one machine
    python train_gpt2.py --plan --model gpt2-xl --nproc 8 --gpu_memory 40       # what fits where (README: FSDP)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --model gpt2-xl --parallel fsdp --batch_size 8
    python train_gpt2.py --preset cpu --data_dir log/demo/data --log_dir log/demo   # minutes on a laptop

Every flag sets the TrainConfig field of the same name (`python train_gpt2.py --help` lists them).
Into --log_dir go log.txt (the reference format, read by plot.py), metrics.jsonl (every number) and
checkpoints model_XXXXX.pt. Running the same command again continues from the newest checkpoint, with
per-step losses bit-identical to a run that was never interrupted. SIGTERM or Ctrl-C (preemption)
finishes the current step, writes a checkpoint and exits cleanly.
"""

import importlib.util
import math
import os
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel as DDP

import device
import fsdp
import memory_plan
import optim
import resume
import scoring
import shards
import training_log
from config import flag, parse_layered
from dataloader import DataLoaderLite
from device import DEVICE_HELP, DTYPE_HELP
from errors import UserError, exit_on_error
from evals import TASKS
from generate import generate
from model import GPT, MODEL_SIZES, GPTConfig

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))

# A preset replaces some defaults; flags given on the command line still win.
PRESETS = {
    "gpt2": {},  # the 124M / 10B-token recipe above
    # The README demo: model.MODEL_SIZES["mini"] (4 layers of width 64, 3.4M parameters) for 1,500
    # steps of 1,024 tokens, about 6 minutes on 2 CPU cores. Its width, learning rate and batch
    # shape won measured comparisons on the offline FineWeb sample: docs/benchmarks.md, "CPU preset".
    "cpu": dict(
        model="mini",
        batch_size=4,
        seq_len=64,
        total_batch_size=1024,  # 4 micro-batches per step
        max_steps=1500,
        warmup_steps=30,
        max_lr=3e-3,
        eval_interval=250,
        val_steps=160,
        eval_limit=100,
        sample_interval=250,
        num_samples=1,
        ckpt_interval=250,
        log_interval=50,
    ),
}

# --recipe: what the modern recipe changes (after --preset and --model; flags given still win). Sources
# are in model.GPTConfig, configure_optimizers and get_lr. The LRs were tuned on the CPU benchmark's
# model (4 layers of width 128, 2,048 tokens per step): docs/benchmarks.md, "Recipes".
RECIPES = {
    "gpt2": {},
    "modern": dict(
        rope=True,
        rmsnorm=True,
        qk_norm=True,
        relu2=True,
        untied_head=True,
        zero_init=True,
        logit_softcap=15.0,
        optimizer="muon",
        muon_lr=0.04,
        max_lr=8e-3,
        lr_schedule="wsd",
        min_lr_ratio=0.0,
    ),
}

# --model: the larger GPT-2s get the batch size (tokens) and peak LR of the GPT-3 model of about their
# size, GPT-3 paper table 2.1 (gpt2 is GPT-3 Small: the defaults above). GPT-3 XL's 2**20 tokens per
# step halve the steps of the 10B-token run and of the 375M-token warmup.
GPT3_TABLE = {
    "gpt2-medium": dict(total_batch_size=2**19, max_lr=3.0e-4),  # GPT-3 Medium, 350M
    "gpt2-large": dict(total_batch_size=2**19, max_lr=2.5e-4),  # GPT-3 Large, 760M (GPT-2 large: 774M)
    "gpt2-xl": dict(total_batch_size=2**20, max_lr=2.0e-4, max_steps=9536, warmup_steps=357),  # GPT-3 XL, 1.3B
}


@dataclass
class TrainConfig:
    # data and outputs
    preset: str = flag(
        "gpt2", "a set of defaults: gpt2 (the 124M / 10B-token recipe) or cpu (PRESETS)", choices=tuple(PRESETS)
    )
    data_dir: str = flag(shards.DEFAULT_DATA_DIR, "token shards written by fineweb.py")
    tokenizer: str = flag(
        "auto",
        "auto (the one the shards were written with, per their meta.json; else gpt2), gpt2, "
        "or a folder written by `python tokenizer.py train`",
    )
    log_dir: str = flag(os.path.join(SCRIPT_DIR, "log"), "log.txt, metrics.jsonl and checkpoints go here")
    # model: GPT-2 small
    model: str = flag(
        "gpt2",
        "a model size: sets n_layer, n_head, n_embd (model.MODEL_SIZES) and, for larger "
        "GPT-2s, GPT-3's batch size and LR (GPT3_TABLE)",
        choices=tuple(MODEL_SIZES),
    )
    n_layer: int = flag(12, "transformer blocks (GPT-2 124M: 12)", low=1)
    n_head: int = flag(12, "attention heads per block (GPT-2 124M: 12)", low=1)
    n_embd: int = flag(768, "width of the residual stream (GPT-2 124M: 768)", low=1)
    # the recipe: GPT-2's, or the modern one (RECIPES), whose changes are switches of their own
    recipe: str = flag(
        "gpt2",
        "gpt2 (the papers') or modern (the speedrun lessons: turns on every switch below, "
        "--optimizer muon and --lr_schedule wsd, with their LRs; README: Two recipes)",
        choices=tuple(RECIPES),
    )
    rope: bool = flag(False, "rotary position embeddings instead of learned ones (model.GPTConfig lists the sources)")
    rmsnorm: bool = flag(False, "RMSNorm without a gain instead of LayerNorm, also on the embeddings")
    qk_norm: bool = flag(False, "RMSNorm of each attention head's queries and keys")
    relu2: bool = flag(False, "ReLU^2 instead of GELU in the MLP")
    untied_head: bool = flag(False, "an output layer of its own instead of the token embedding's")
    zero_init: bool = flag(False, "the blocks' output projections (and an untied head) start at zero")
    logit_softcap: float = flag(0.0, "squash the logits into (-cap, cap) with cap * tanh(logits / cap) (0: off)", 0)
    # batch
    total_batch_size: int = flag(2**19, "tokens per optimizer step: ~0.5M, GPT-3 paper table 2.1 (125M model)", low=1)
    batch_size: int = flag(64, "sequences per forward pass on each GPU (B): lower it if memory runs out", low=1)
    seq_len: int = flag(1024, "tokens per sequence (T): GPT-2's context length", low=1)
    # learning rate schedule
    max_steps: int = flag(19073, "optimizer steps: 10e9 tokens / 2**19 tokens per step", low=1)
    warmup_steps: int = flag(715, "steps of linear LR warmup: GPT-3's 375M warmup tokens / 2**19", low=0)
    max_lr: float = flag(6e-4, "peak learning rate: GPT-3 paper table 2.1 (125M model)", low=0)
    min_lr_ratio: float = flag(0.1, "final LR / max_lr: a decay down to 10%, GPT-3 paper appendix B", 0, 1)
    lr_schedule: str = flag(
        "cosine",
        "cosine (warmup, then a cosine down to min_lr_ratio: GPT-3) or wsd (warmup, "
        "stable at max_lr, then a linear decay over the last decay_frac of the steps)",
        choices=("cosine", "wsd"),
    )
    decay_frac: float = flag(
        0.4,
        "--lr_schedule wsd: the fraction of max_steps spent decaying (0: none), modded-nanogpt's cooldown_frac",
        0,
        1,
    )
    # optimizer: AdamW as in GPT-3 paper appendix B
    weight_decay: float = flag(0.1, "weight decay (AdamW's and Muon's), on matrices only: GPT-3 appendix B", low=0)
    beta1: float = flag(0.9, "AdamW beta1: GPT-3 appendix B", 0, 1)
    beta2: float = flag(0.95, "AdamW beta2: GPT-3 appendix B", 0, 1)
    adam_eps: float = flag(1e-8, "AdamW epsilon: GPT-3 appendix B", low=0)
    optimizer: str = flag(
        "adamw",
        "adamw; muon: Muon for the blocks' matrices, AdamW for the rest; or a rule of optim.py's lesson "
        "(sgd, momentum, nesterov, adagrad, rmsprop, adam), with the same groups and LRs",
        choices=(*optim.OPTIMIZERS, "muon"),
    )
    muon_lr: float = flag(0.04, "--optimizer muon: Muon's peak LR (the schedule scales it like max_lr)", low=0)
    muon_momentum: float = flag(0.95, "--optimizer muon: Muon's momentum (Jordan et al. 2024)", 0, 1)
    embed_lr: float = flag(0.0, "peak AdamW LR of the embeddings, and of a tied output layer (0: max_lr)", low=0)
    head_lr: float = flag(0.0, "peak AdamW LR of an untied output layer (0: max_lr; --untied_head 1 only)", low=0)
    grad_clip: float = flag(1.0, "clip the global gradient norm to this: GPT-3 appendix B", low=0)
    max_nonfinite_skips: int = flag(0, "skip up to this many updates whose loss or grad norm is inf/nan (0: stop)", 0)
    # evaluation
    eval_interval: int = flag(250, "steps between val loss + eval tasks, and at the end (build-nanogpt; 0: never)", 0)
    val_steps: int = flag(20, "batches per process for the validation loss: 20 x 64 x 1024 = 1.3M tokens", low=1)
    eval_tasks: str = flag("hellaswag", f"comma-separated eval tasks ({', '.join(TASKS)}), '' for none")
    eval_limit: int = flag(0, "score only the first N examples of each task (0: all; HellaSwag has 10,042)", low=0)
    sample_interval: int = flag(250, "steps between text samples, and at the end (0: never)", low=0)
    num_samples: int = flag(4, "completions of the prompt per sample", low=1)
    sample_prompt: str = flag("Hello, I'm a language model,", "the prompt of the samples (build-nanogpt's)")
    sample_tokens: int = flag(32, "tokens per completion", low=1)
    wandb_project: str = flag("", "log every metrics.jsonl record to this Weights & Biases project too ('': off)")
    log_interval: int = flag(1, "print every N-th training step (log.txt and metrics.jsonl get every step)", low=1)
    # checkpoints
    ckpt_interval: int = flag(5000, "steps between checkpoints (0: only the one always written at the end)", low=0)
    keep_last: int = flag(0, "keep only the newest N checkpoints (0: keep all)", low=0)
    resume: str = flag("auto", "auto (newest checkpoint in log_dir, else a fresh start), none, or a .pt path")
    # system
    device: str = flag("auto", DEVICE_HELP)
    dtype: str = flag("auto", DTYPE_HELP)
    compile: str = flag("auto", "torch.compile the training step: auto (on CUDA, eager if it fails), 1, 0")
    shuffle: bool = flag(True, "seeded shuffle of the training data, the same on every process")
    seed: int = flag(1337, "seeds the model init, the data shuffle and the samples", low=0)
    # processes and memory (README, "Larger models: FSDP")
    parallel: str = flag(
        "ddp",
        "ddp (every process holds the whole model) or fsdp (weights, gradients and AdamW "
        "state sharded over the processes: FSDP2, see fsdp.shard_model)",
        choices=("ddp", "fsdp"),
    )
    reshard_after_forward: bool = flag(
        True,
        "fsdp: free a block's gathered weights after its forward, gather "
        "them again in backward (1: ZeRO-3, least memory; 0: ZeRO-2-like)",
    )
    cpu_offload: bool = flag(
        False,
        "fsdp: keep the shards of the weights, gradients and optimizer state in host memory and step "
        "the optimizer on the CPU (FSDP2's CPUOffloadPolicy): the GPU holds only gathered blocks and activations",
    )
    activation_checkpointing: bool = flag(
        False,
        "keep only each block's input and recompute the rest in backward "
        "(model.py): far fewer activations, ~1/3 more compute",
    )
    plan: bool = flag(
        False,
        "print the memory per GPU of these flags (ddp and fsdp, with and without activation "
        "checkpointing, fsdp with CPU offload) and the largest batch_size that fits, then exit (needs no shards)",
    )
    gpu_memory: float = flag(0.0, "--plan: GiB per GPU (0: this GPU's, if there is one)", low=0)
    nproc: int = flag(0, "--plan: processes to plan for (0: $WORLD_SIZE, else 1)", low=0)
    # where each value that differs from its default came from (config.parse_config; the run summary)
    sources: dict = field(default_factory=dict, repr=False, compare=False)


def model_defaults(name):
    """The defaults --model sets: the shape of model.MODEL_SIZES[name], and GPT3_TABLE's batch and LR."""
    n_layer, n_head, n_embd = MODEL_SIZES[name]
    return dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, **GPT3_TABLE.get(name, {}))


def pretraining_layers(flags):
    """The defaults under the flags, in order (each wins over the ones before): --preset's, --model's,
    --recipe's. The run summary names the layer of every value that differs from TrainConfig's."""
    preset = flags.get("preset", "gpt2")
    model = flags.get("model", PRESETS[preset].get("model", "gpt2"))
    recipe = flags.get("recipe", PRESETS[preset].get("recipe", "gpt2"))
    return [
        (f"preset {preset}", PRESETS[preset]),
        (f"model {model}", model_defaults(model)),
        (f"recipe {recipe}", RECIPES[recipe]),
    ]


def get_grad_accum_steps(cfg, world_size):
    """Micro-batches per optimizer step: how total_batch_size tokens are reached with B x T per process."""
    tokens_per_micro_step = cfg.batch_size * cfg.seq_len * world_size
    if cfg.total_batch_size % tokens_per_micro_step != 0:
        raise UserError(
            f"--total_batch_size {cfg.total_batch_size} is not a multiple of batch_size x seq_len x processes = "
            f"{cfg.batch_size} x {cfg.seq_len} x {world_size} = {tokens_per_micro_step}: change --batch_size "
            f"(powers of two divide 2**19) or --total_batch_size"
        )
    return cfg.total_batch_size // tokens_per_micro_step


def due(interval, step, max_steps):
    """Every `interval` steps and at the last one; never with an interval of 0."""
    return interval > 0 and (step % interval == 0 or step == max_steps)


def grad_sync(model, sync):
    """DDP averages gradients over processes in every backward, FSDP reduce-scatters them; with
    accumulation only the last micro-step needs that. no_sync must wrap the forward too: that is where
    DDP reads the flag. FSDP reads its own in backward."""
    if isinstance(device.unwrap(model), FSDPModule):
        device.unwrap(model).set_requires_gradient_sync(sync)
    return model.no_sync() if isinstance(model, DDP) and not sync else nullcontext()


@dataclass
class Run:
    """What every part of the loop needs, passed along instead of long parameter lists."""

    cfg: object  # TrainConfig, or a subclass (finetune.FinetuneConfig)
    dist: device.DistInfo  # this process: rank, world_size, device
    precision: device.Precision  # autocast dtype and the fp16 loss scaler
    log: object  # training_log.setup_logging's logger
    tokenizer: object


def lm_loss(model, batch):
    """Next-token prediction: the mean cross-entropy over the targets of batch = (x, y), each (B, T);
    no other figures. Pretraining's and fine-tuning's loss; dpo.py and rl.py bring their own."""
    x, y = batch
    _, loss = model(x, y)
    return loss, {}


@dataclass
class StepResult:
    loss: float  # the mean over micro-steps and processes
    grad_norm: float  # before clipping
    finite: bool  # False: the loss or the norm was inf/nan and the update was skipped
    tokens: int  # the real tokens of the step, all processes (fewer than the token slots where rows are padded)
    figures: dict  # the job's loss's own figures (DPO's rewards, ...), means like the loss


def train_step(run, job, train_model, model, optimizer, grad_accum_steps):
    """One optimizer step: grad_accum_steps micro-steps of forward and backward on batches of
    job.train_loader with job.loss, the clip, the update."""
    precision, world_size = run.precision, run.dist.world_size
    optimizer.zero_grad(set_to_none=True)
    sums = None  # the loss, the real tokens, then the loss's own figures
    for micro_step in range(grad_accum_steps):
        batch = job.train_loader.next_batch()  # pretraining and fine-tuning: x, y (B, T) each
        # Offloaded, FSDP reduce-scatters every micro-step and adds the shards up in host memory: held
        # back, the whole float32 gradients would wait on the GPU, 4 bytes per parameter
        with grad_sync(train_model, micro_step == grad_accum_steps - 1 or run.cfg.cpu_offload):
            with precision.autocast():
                loss, figures = job.loss(train_model, batch)
            # .grad accumulates a sum over micro-steps; dividing each loss makes it the mean
            loss = loss / grad_accum_steps
            tokens = loss.new_tensor(float(job.train_loader.last_batch_tokens))
            own = [v.detach().float() / grad_accum_steps for v in figures.values()]
            values = torch.stack([loss.detach().float(), tokens.float(), *own])
            sums = values if sums is None else sums + values
            precision.scaler.scale(loss).backward()
    sums = device.all_reduce_sum(sums, world_size).tolist()  # one collective for all of them
    loss, tokens, means = sums[0] / world_size, round(sums[1]), [v / world_size for v in sums[2:]]
    precision.scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run.cfg.grad_clip).item()
    # With fp16 an inf norm is an overflow: the scaler skips that update itself and lowers its scale.
    finite = math.isfinite(loss) and (math.isfinite(grad_norm) or precision.scaler.is_enabled())
    if finite:
        precision.scaler.step(optimizer)
    precision.scaler.update()
    return StepResult(loss, grad_norm, finite, tokens, dict(zip(figures, means)))


def count_nonfinite(run, nonfinite_skips, step, result):
    """A skipped update: allowed up to --max_nonfinite_skips times, then training stops."""
    loss, grad_norm = result.loss, result.grad_norm
    nonfinite_skips += 1
    if nonfinite_skips > run.cfg.max_nonfinite_skips:
        last_saved = resume.newest_checkpoint(run.cfg.log_dir)
        raise UserError(
            f"step {step}: loss {loss}, gradient norm {grad_norm}: training diverged. The last good checkpoint is "
            f"{last_saved or 'none (none written yet)'}: resume from it with --resume <checkpoint> and a lower "
            f"--max_lr, or let training skip such updates with --max_nonfinite_skips N"
        )
    run.log.warning(f"step {step}: loss {loss}, grad norm {grad_norm}: update skipped ({nonfinite_skips} so far)")
    return nonfinite_skips


class StopOnSignal:
    """SIGTERM (preemption, `kill`, torchrun shutting down) and SIGINT (Ctrl-C) ask training to stop
    after the current step, with a checkpoint. A second Ctrl-C stops at once."""

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@torch.no_grad()
def evaluate(run, job, step, model, eval_tasks):
    """The job's validation (the val loss and bits per byte, unless the job has its own), then each
    eval task: returns {"val": {figure: value}, task name: its results}, all of them logged."""
    model.eval()
    val = job.validate(run, model) if job.validate else val_loss(run, job, model)
    names = {"loss": "loss", "bpb": "bits per byte"}  # how the console names a figure
    message = f"step {step:5d} | " + " | ".join(f"val {names.get(k, k)} {v:.4f}" for k, v in val.items())
    log_lines = "\n".join(f"{step} val{'' if k == 'loss' else '_' + k} {v:.4f}" for k, v in val.items())
    training_log.log_record(run.log, message, log_lines, step=step, kind="val", **val)
    figures = {"val": val}
    for task, examples in eval_tasks:
        results = scoring.evaluate(
            task, model, examples, run.tokenizer, run.dist, run.precision, progress=run.dist.is_master
        )
        message = f"step {step:5d} | {training_log.format_results(task.name, results)}"
        training_log.log_record(
            run.log, message, scoring.log_line(task, step, results), step=step, kind=task.name, **results
        )
        figures[task.name] = results
    model.train()
    return figures


def val_loss(run, job, model):
    """The mean loss over job.val_steps batches of every process, and bits per byte. Bits per byte
    compare tokenizers, loss per token cannot: the summed loss of the target tokens in bits (/ ln 2)
    over the UTF-8 bytes they stand for (0 for special tokens)."""
    token_bytes = torch.tensor(run.tokenizer.token_bytes(), device=run.dist.device)  # (vocab_size,)
    job.val_loader.reset()  # the same batches every time, so the numbers are comparable
    dtype = device.sum_dtype(run.dist.device)
    sums = torch.zeros(3, dtype=dtype, device=run.dist.device)  # summed loss (nats), targets, their bytes
    for _ in range(job.val_steps):
        x, y = job.val_loader.next_batch()  # (B, T), (B, T); -1 marks a position that is no target (fine-tuning)
        with run.precision.autocast():
            _, loss = model(x, y)  # the mean over the targets
        is_target = y >= 0
        n = is_target.sum()  # a tensor on the device: no wait for the GPU inside the loop
        sums += torch.stack([loss.to(dtype) * n, n.to(dtype), token_bytes[y[is_target]].sum().to(dtype)])
    loss_sum, n_targets, bytes_sum = device.all_reduce_sum(sums, run.dist.world_size).tolist()
    return {"loss": loss_sum / n_targets, "bpb": loss_sum / (math.log(2) * bytes_sum)}


@torch.no_grad()
def sample(run, step, model):
    """Complete --sample_prompt; the seed is fixed so that only the model changes from one sample to the next."""
    cfg, tokenizer = run.cfg, run.tokenizer
    prompt = tokenizer.encode(cfg.sample_prompt)
    idx = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=run.dist.device)  # (num_samples, T0)
    generator = torch.Generator(device=run.dist.device).manual_seed(cfg.seed)
    model.eval()
    with run.precision.autocast():
        out = generate(model, idx, cfg.sample_tokens, temperature=1.0, top_k=50, generator=generator)
    model.train()
    for i, row in enumerate(out.tolist()):
        text = tokenizer.decode(row).replace("\n", " ")
        training_log.log_record(run.log, f"step {step:5d} | sample {i}: {text}", step=step, kind="sample", text=text)


def make_model_config(cfg, vocab_size):
    """The GPTConfig of these flags: the shape and the recipe's switches (the fields of both classes)."""
    return GPTConfig(
        vocab_size=vocab_size,
        **{f.name: getattr(cfg, f.name) for f in fields(GPTConfig) if f.name != "vocab_size" and hasattr(cfg, f.name)},
    )


def check_config(cfg, model_config, world_size):
    """Refuse what can be refused before any data is read or any process talks to another."""
    if cfg.seq_len > model_config.block_size:
        raise UserError(f"--seq_len {cfg.seq_len} is longer than the model's block_size {model_config.block_size}")
    if cfg.optimizer == "muon" and cfg.muon_lr == 0:
        raise UserError("--optimizer muon with --muon_lr 0 would never move the blocks' matrices: give it a peak LR")
    if cfg.head_lr and not model_config.untied_head:
        raise UserError(
            "--head_lr is for an untied output layer (--untied_head 1); a tied one is the token embedding, "
            "whose LR is --embed_lr"
        )
    if cfg.optimizer == "muon" and cfg.parallel == "fsdp" and world_size > 1:
        raise UserError(
            "--optimizer muon with --parallel fsdp: FSDP shards every matrix by rows and Muon's Newton-Schulz "
            "steps need whole matrices; train with --parallel ddp, or --optimizer adamw under FSDP"
        )
    check_cpu_offload(cfg)
    if cfg.wandb_project and importlib.util.find_spec("wandb") is None:
        raise UserError("--wandb_project needs the wandb package: pip install wandb (or leave the flag out)")
    unknown = [name for name in cfg.eval_tasks.split(",") if name and name not in TASKS]
    if unknown:
        raise UserError(f"--eval_tasks: unknown task {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    get_grad_accum_steps(cfg, world_size)


def check_cpu_offload(cfg):
    """check_config's refusal of --cpu_offload where it cannot work; train repeats it for the jobs
    that have their own checks (dpo.py, rl.py)."""
    if cfg.cpu_offload and cfg.parallel != "fsdp":
        raise UserError(
            "--cpu_offload 1 offloads FSDP's shards: add --parallel fsdp (on one process too); DDP keeps a "
            "whole model on every GPU"
        )


@dataclass
class Job:
    """What the training loop trains: pretraining (pretraining_job, below), or finetune.py's own."""

    tokenizer: object
    model_config: GPTConfig
    # next_batch() -> a batch (pretraining: x, y), last_batch_tokens (the real ones), pads_rows,
    # rows_per_example, reset(), epoch, state_dict(), load_state_dict()
    train_loader: object
    val_loader: object
    val_steps: int  # batches per process of each validation loss
    make_model: Callable  # () -> a fresh GPT (train moves it to the device), before a checkpoint is restored into it
    get_lr: Callable  # step -> learning rate
    checkpoint_extra: dict = field(default_factory=dict)  # more keys for every checkpoint (finetune: the base)
    loss: Callable = lm_loss  # (model, batch) -> (loss, {figure: tensor}): what the step minimises
    validate: Callable = None  # (run, model) -> {figure: value}, instead of the val loss (val_loss)
    # make_model() builds an untrained GPT from the seed alone, so FSDP may build it on the meta device
    meta_init: bool = False


def pretraining_job(cfg, dist_info):
    """GPT-2 from scratch on the shards in --data_dir."""
    tokenizer = shards.tokenizer_for(cfg.data_dir, cfg.tokenizer)
    model_config = make_model_config(cfg, tokenizer.vocab_size)
    check_config(cfg, model_config, dist_info.world_size)
    # The data next: without shards there is nothing to do, and nothing should be written to log_dir.
    B, T = cfg.batch_size, cfg.seq_len
    loader_args = dict(
        process_rank=dist_info.rank,
        num_processes=dist_info.world_size,
        data_dir=cfg.data_dir,
        device=dist_info.device,
        vocab_size=model_config.vocab_size,
    )
    train_loader = DataLoaderLite(B, T, split="train", shuffle=cfg.shuffle, seed=cfg.seed, **loader_args)
    val_loader = DataLoaderLite(B, T, split="val", **loader_args)
    return Job(
        tokenizer,
        model_config,
        train_loader,
        val_loader,
        cfg.val_steps,
        make_model=lambda: GPT(model_config),
        get_lr=lambda step: optim.get_lr(step, cfg),
        checkpoint_extra={"init": None},
        meta_init=True,
    )  # a fine-tuning checkpoint has its base here: never resumed by this job


def train(cfg, dist_info, job):
    """Resume or start, then the training loop, for any Job."""
    grad_accum_steps = get_grad_accum_steps(cfg, dist_info.world_size)
    check_cpu_offload(cfg)
    B, T = cfg.batch_size, cfg.seq_len
    # the evaluation data too before anything is written: a missing file (offline) stops the run here
    eval_tasks = [
        (TASKS[name], TASKS[name].load(None, cfg.eval_limit or None)) for name in cfg.eval_tasks.split(",") if name
    ]

    resumed = resume.resume_checkpoint(cfg, job.model_config, dist_info, job.checkpoint_extra)
    start_step = resumed["step"] if resumed else 0
    if start_step > cfg.max_steps:
        raise UserError(
            f"{resumed['path']} is at step {start_step}, past --max_steps {cfg.max_steps}: nothing to train. "
            f"Raise --max_steps to train longer, or pass a new --log_dir to start afresh"
        )
    if start_step == cfg.max_steps:  # a finished run, started again (`make demo` twice): nothing to redo
        return training_log.say_complete(cfg, resumed["path"], dist_info.is_master)
    # takes the folder's lock first
    log = training_log.setup_logging(cfg.log_dir, start_step, dist_info.is_master, cfg.wandb_project)
    if cfg.warmup_steps >= cfg.max_steps:
        log.warning(
            f"--warmup_steps {cfg.warmup_steps} >= --max_steps {cfg.max_steps}: the LR never reaches --max_lr "
            f"{cfg.max_lr:g} (it ends at {job.get_lr(cfg.max_steps - 1):.3g}) and never decays; pass --warmup_steps "
            f"below {cfg.max_steps} (a few % of it)"
        )
    for reason in resumed["passed_over"] if resumed else []:
        log.warning(f"{reason}: resuming from an older checkpoint")
    if dist_info.is_master and resumed:
        for path in resume.start_branch(cfg.log_dir, start_step):
            log.warning(f"{path} is later than the checkpoint resumed from: moved aside (see resume.start_branch)")
    # Offloaded, FSDP runs on one process too: nothing to shard, everything to offload (a group of one)
    sharded = cfg.parallel == "fsdp" and (dist_info.world_size > 1 or cfg.cpu_offload)
    if cfg.parallel == "fsdp" and not sharded:
        log.warning(
            "--parallel fsdp on one process: there is nothing to shard over, so the model trains whole, as "
            "with --parallel ddp (to shard it, launch N processes: torchrun --nproc_per_node=N)"
        )
    precision = device.setup_precision(cfg.dtype, dist_info.device_type, sharded=sharded)
    run = Run(cfg, dist_info, precision, log, job.tokenizer)

    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    # Sharded from scratch, the model is built on the meta device (shapes, no memory) and sharded, then
    # each rank draws its shards' weights (fsdp.initialise_shards): no rank ever holds it whole.
    on_meta = sharded and job.meta_init
    with torch.device("meta") if on_meta else nullcontext():
        model = job.make_model()
    if not on_meta:
        model = model.to(dist_info.device)
    model.activation_checkpointing = cfg.activation_checkpointing
    empty = fsdp.empty_copy(model, "meta") if sharded else None  # the shape of the whole copies evaluations use
    if sharded:  # in place, and before the optimizer is built: it must hold the shards
        fsdp.shard_model(model, cfg.reshard_after_forward, precision, dist_info, cfg.cpu_offload)
    # offloaded, the shards and so the optimizer step are on the CPU: a CUDA fused kernel would refuse them
    host = "cpu" if cfg.cpu_offload else dist_info.device
    if on_meta:
        fsdp.initialise_shards(model, host)
    optimizer = optim.make_optimizer(model, cfg, host.split(":")[0])
    loop = {"nonfinite_skips": 0, "last_val": None}  # what a checkpoint carries of the loop itself
    if resumed:
        loop = resume.restore_training_state(resumed, model, optimizer, precision.scaler, job.train_loader)
        log.info(f"resuming from {resumed['path']} at step {start_step}")
    # `model` stays uncompiled and unwrapped: evaluation, sampling and checkpoints use it directly.
    # `train_model` shares its parameters and is what the training step calls.
    # two tensors, not one twice: a graph compiled for `idx is targets` would be compiled again at step 0
    example_batch = tuple(torch.zeros((B, T), dtype=torch.long, device=dist_info.device) for _ in range(2))
    train_model = device.compile_model(model, cfg.compile, dist_info.device_type, example_batch, precision, log)
    compiled = train_model is not model
    if dist_info.world_size > 1 and not sharded:
        # broadcast_buffers=False: GPT has no buffers that change; a quantized base's codes (quant.py) are
        # the same on every rank, and sending them from rank 0 at every forward would cost a base's bytes
        device_ids = [dist_info.local_rank] if dist_info.device_type == "cuda" else None
        train_model = DDP(train_model, device_ids=device_ids, broadcast_buffers=False)
    timer = training_log.StepTimer(
        training_log.token_slots(cfg, job.train_loader),
        model.flops_per_token(T),
        device.peak_flops(dist_info.device, precision.dtype),
        cfg.max_steps,
        start_step,
    )
    training_log.log_run_summary(run, job.train_loader, model, compiled, grad_accum_steps, start_step)
    if resumed:
        resume.restore_rng(resumed, dist_info)  # last, after everything that draws at startup
    del resumed  # the optimizer state inside is a second copy of it

    started, final = time.perf_counter(), {}
    with StopOnSignal() as signals:
        for step in range(start_step, cfg.max_steps + 1):
            evaluating = due(cfg.eval_interval, step, cfg.max_steps)
            sampling = due(cfg.sample_interval, step, cfg.max_steps)
            # FSDP: a gathered copy, on the device even when the shards are offloaded
            whole = fsdp.whole_model(model, empty, dist_info.device) if evaluating or sampling else None
            if evaluating:
                final = evaluate(run, job, step, whole, eval_tasks)
                loop["last_val"] = {"step": step, **final["val"]}
            if dist_info.is_master and sampling:
                sample(run, step, whole)
            del whole
            if step == cfg.max_steps:
                training_log.log_run_end(run, step - start_step, time.perf_counter() - started, final)
                break

            t0 = time.perf_counter()
            lr = job.get_lr(step)
            optim.set_lr(optimizer, lr)
            result = train_step(run, job, train_model, model, optimizer, grad_accum_steps)
            if not result.finite:
                loop["nonfinite_skips"] = count_nonfinite(run, loop["nonfinite_skips"], step, result)
            if dist_info.device_type == "cuda":
                torch.cuda.synchronize()  # the step is queued, not done, until the GPU catches up
            speed = timer.measure(step, time.perf_counter() - t0, result.tokens)
            figures = dict(loss=result.loss, lr=lr, grad_norm=result.grad_norm, **result.figures, **speed)
            figures.update(nonfinite_skips=loop["nonfinite_skips"], epoch=job.train_loader.epoch)
            training_log.log_train_step(run, step, figures, shown=tuple(result.figures))

            # every process must stop after the same step, even if only one of them got the signal
            stopping = device.any_process(signals.requested, dist_info.device, dist_info.world_size)
            done = step + 1  # optimizer steps done: the checkpoint's step, where a resume starts
            # Saved before the evaluations of step `done`: a crash in them loses no training.
            if due(cfg.ckpt_interval, done, cfg.max_steps) or done == cfg.max_steps or stopping:
                saved = resume.save_training_state(
                    run, done, model, optimizer, job.train_loader, {**loop, **job.checkpoint_extra}
                )
                log.info(f"step {done:5d} | saved {saved}")
            if stopping:
                log.info(f"stopped by a signal after step {done}, saved in {saved}: continue with --resume auto")
                break


def launch(cfg, make_job):
    """Set up this process (one of torchrun's, or alone), train make_job(cfg, dist_info), tear down."""
    dist_info = device.setup_distributed(cfg.device, cpu_offload=cfg.cpu_offload)
    finished = False
    try:
        train(cfg, dist_info, make_job(cfg, dist_info))
        finished = True
    except Exception as error:
        if dist_info.world_size > 1:  # see device.end_failed_rank: a failed rank's normal exit can hang
            training_log.close_logging()
            device.end_failed_rank(error)
        raise
    finally:
        training_log.close_logging()
        device.teardown_distributed(finished)  # a finished rank of several ends there (device.end_finished_rank)


def parse_config(argv=None):
    """TrainConfig from the command line, over the layers of defaults (pretraining_layers)."""
    return parse_layered(argv, TrainConfig, pretraining_layers, __doc__)


@exit_on_error
def main(argv=None):
    cfg = parse_config(argv)
    if cfg.plan:  # the memory plan only: no processes, no shards
        world_size = cfg.nproc or int(os.environ.get("WORLD_SIZE", "1"))
        model_config = make_model_config(cfg, memory_plan.planned_vocab_size(cfg.tokenizer))
        check_config(cfg, model_config, world_size)
        return memory_plan.print_plan(cfg, model_config, world_size)
    launch(cfg, pretraining_job)


if __name__ == "__main__":
    main()
