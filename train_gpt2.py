"""
Train GPT-2 (124M) on 10B tokens of FineWeb-Edu: the recipe of the GPT-2 and GPT-3 papers.

    python fineweb.py                                           # once: writes the shards to edu_fineweb10B/
    python train_gpt2.py                                        # one GPU (or the CPU / Apple MPS)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py      # 8 GPUs on one machine
    python train_gpt2.py --preset cpu --data_dir log/demo/data --log_dir log/demo   # minutes on a laptop

Every flag sets the TrainConfig field of the same name (`python train_gpt2.py --help` lists them).
Into --log_dir go log.txt (the reference format, read by plot.py), metrics.jsonl (every number) and
checkpoints model_XXXXX.pt. Running the same command again continues from the newest checkpoint, with
per-step losses bit-identical to a run that was never interrupted. SIGTERM or Ctrl-C (preemption)
finishes the current step, writes a checkpoint and exits cleanly.
"""

import argparse
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import evals
from checkpoint import (
    check_model_config,
    checkpoint_path,
    clean_state_dict,
    load_checkpoint,
    model_checkpoint,
    prune_checkpoints,
    resume_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dataloader import DEFAULT_DATA_ROOT, DataLoaderLite
from device import (
    all_gather,
    all_reduce_sum,
    any_process,
    compile_model,
    peak_flops,
    setup_distributed,
    setup_precision,
    teardown_distributed,
)
from fineweb import gpt2_tokenizer
from model import GPT, GPTConfig
from training_log import close_logging, log_record, setup_logging

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
SAMPLE_PROMPT = "Hello, I'm a language model,"


def flag(default, help):
    """A TrainConfig field; its help text becomes the --help of the flag of the same name."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data and outputs
    data_dir: str = flag(DEFAULT_DATA_ROOT, "token shards written by fineweb.py")
    log_dir: str = flag(os.path.join(SCRIPT_DIR, "log"), "log.txt, metrics.jsonl and checkpoints go here")
    # model: GPT-2 small
    n_layer: int = flag(12, "transformer blocks (GPT-2 124M: 12)")
    n_head: int = flag(12, "attention heads per block (GPT-2 124M: 12)")
    n_embd: int = flag(768, "width of the residual stream (GPT-2 124M: 768)")
    # batch
    total_batch_size: int = flag(2**19, "tokens per optimizer step: ~0.5M, GPT-3 paper table 2.1 (125M model)")
    batch_size: int = flag(64, "sequences per forward pass on each GPU (B): lower it if memory runs out")
    seq_len: int = flag(1024, "tokens per sequence (T): GPT-2's context length")
    # learning rate schedule
    max_steps: int = flag(19073, "optimizer steps: 10e9 tokens / 2**19 tokens per step")
    warmup_steps: int = flag(715, "steps of linear LR warmup: GPT-3's 375M warmup tokens / 2**19")
    max_lr: float = flag(6e-4, "peak learning rate: GPT-3 paper table 2.1 (125M model)")
    min_lr_ratio: float = flag(0.1, "final LR / max_lr: cosine decay down to 10%, GPT-3 paper appendix B")
    # optimizer: AdamW as in GPT-3 paper appendix B
    weight_decay: float = flag(0.1, "AdamW weight decay, on matrices only: GPT-3 appendix B")
    beta1: float = flag(0.9, "AdamW beta1: GPT-3 appendix B")
    beta2: float = flag(0.95, "AdamW beta2: GPT-3 appendix B")
    adam_eps: float = flag(1e-8, "AdamW epsilon: GPT-3 appendix B")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this: GPT-3 appendix B")
    max_nonfinite_skips: int = flag(0, "skip up to this many updates whose loss or grad norm is inf/nan (0: stop)")
    # evaluation
    eval_interval: int = flag(250, "steps between val loss + eval tasks, and at the end (build-nanogpt; 0: never)")
    val_steps: int = flag(20, "batches per process for the validation loss: 20 x 64 x 1024 = 1.3M tokens")
    evals: str = flag("hellaswag", f"comma-separated eval tasks ({', '.join(evals.TASKS)}), '' for none")
    eval_limit: int = flag(0, "score only the first N examples of each task (0: all; HellaSwag has 10,042)")
    sample_interval: int = flag(250, "steps between text samples, and at the end (0: never)")
    num_samples: int = flag(4, "completions of the prompt per sample")
    sample_tokens: int = flag(32, "tokens per completion")
    # checkpoints
    ckpt_interval: int = flag(5000, "steps between checkpoints (0: only the one always written at the end)")
    keep_last: int = flag(0, "keep only the newest N checkpoints (0: keep all)")
    resume: str = flag("auto", "auto (newest checkpoint in log_dir, else a fresh start), none, or a .pt path")
    # system
    device: str = flag("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    dtype: str = flag("auto", "auto (bf16 on Ampere+ GPUs, fp16 + loss scaling before, fp32 on CPU), bfloat16, ...")
    compile: str = flag("auto", "torch.compile the training step: auto (on CUDA, eager if it fails), 1, 0")
    shuffle: bool = flag(True, "seeded shuffle of the training data, the same on every process")
    seed: int = flag(1337, "seeds the model init, the data shuffle and the samples")


# A preset replaces some defaults; flags given on the command line still win.
# fmt: off
PRESETS = {
    "gpt2": {},  # the 124M / 10B-token recipe above
    # The README demo: "mini" (4 layers of width 64, 3.4M parameters, 3.2M of them the tied embedding,
    # whose 50,304-way output layer is most of the compute) for 1,500 steps of 1,024 tokens: ~6 minutes
    # on 2 CPU cores at ~4,500 tokens/s. Measured on the offline FineWeb sample: width 64 learns as much
    # per token as width 128 at twice the speed; lr 3e-3 beat 1e-3, 2e-3, 6e-3 and 1e-2. The loss is
    # limited by data, not tuning: a count-based bigram model reaches 7.06 after 300K tokens and 6.70
    # after 1M, and this preset's train loss passes 7 after ~500K tokens and ~6.6 after 1.3M.
    # Micro-batches of 4 x 64 and 8 x 64 tokens ran fastest (~4,600-4,900 tokens/s; 1 x 64: 2,900,
    # 16 x 64: 4,000), once device.keep_freed_memory stopped page-faulting the big tensors every step.
    # val_steps=160 reads 41K validation tokens: fewer gives a noisy val loss that depends on which
    # documents come first.
    "cpu": dict(
        n_layer=4, n_head=4, n_embd=64,  # model.MODEL_SIZES["mini"]
        batch_size=4, seq_len=64, total_batch_size=1024,  # 4 micro-batches per step
        max_steps=1500, warmup_steps=30, max_lr=3e-3,
        eval_interval=250, val_steps=160, eval_limit=100, sample_interval=250, num_samples=1, ckpt_interval=250,
    ),
}
# fmt: on


def parse_bool(text):
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0 or true/false, got {text!r}")


def parse_config(argv=None):
    """TrainConfig from the command line: defaults, then the preset, then the flags given."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS
    )
    parser.add_argument("--preset", choices=PRESETS, default="gpt2", help="a set of defaults (default: gpt2)")
    for f in fields(TrainConfig):
        parser.add_argument(
            f"--{f.name}",
            type=parse_bool if f.type is bool else f.type,
            help=f"{f.metadata['help']} (default: {f.default})".replace("%", "%%"),  # argparse formats with %
        )
    flags = vars(parser.parse_args(argv))
    preset = flags.pop("preset")
    return TrainConfig(**{**PRESETS[preset], **flags})


def get_grad_accum_steps(cfg, world_size):
    """Micro-batches per optimizer step: how total_batch_size tokens are reached with B x T per process."""
    tokens_per_micro_step = cfg.batch_size * cfg.seq_len * world_size
    if cfg.total_batch_size % tokens_per_micro_step != 0:
        raise SystemExit(
            f"--total_batch_size {cfg.total_batch_size} is not a multiple of batch_size x seq_len x processes = "
            f"{cfg.batch_size} x {cfg.seq_len} x {world_size} = {tokens_per_micro_step}: change --batch_size "
            f"(powers of two divide 2**19) or --total_batch_size"
        )
    return cfg.total_batch_size // tokens_per_micro_step


def due(interval, step, max_steps):
    """Every `interval` steps and at the last one; never with an interval of 0."""
    return interval > 0 and (step % interval == 0 or step == max_steps)


def get_lr(step, cfg):
    """Linear warmup to max_lr, then a cosine down to min_lr_ratio * max_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.max_lr * cfg.min_lr_ratio
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - min_lr)


def grad_sync(model, sync):
    """DDP averages gradients over processes in every backward; with accumulation only the last
    micro-step needs that. no_sync must wrap the forward too: that is where DDP reads the flag."""
    return model.no_sync() if isinstance(model, DDP) and not sync else nullcontext()


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
def evaluate(step, model, val_loader, eval_tasks, cfg, precision, dist_info, log):
    """Validation loss (mean over val_steps batches on every process), then each eval task."""
    model.eval()
    val_loader.reset()  # the same batches every time, so the numbers are comparable
    loss_sum = torch.zeros((), device=dist_info.device)
    for _ in range(cfg.val_steps):
        x, y = val_loader.next_batch()  # (B, T), (B, T)
        with precision.autocast():
            _, loss = model(x, y)
        loss_sum += loss.float()
    val_loss = all_reduce_sum(loss_sum, dist_info.world_size).item() / (cfg.val_steps * dist_info.world_size)
    message = f"step {step:5d} | val loss {val_loss:.4f}"
    log_record(log, message, f"{step} val {val_loss:.4f}", step=step, kind="val", loss=val_loss)
    for name, examples in eval_tasks.items():
        result = evals.evaluate_task(
            name, model, examples, dist_info.device, rank=dist_info.rank, world_size=dist_info.world_size,
            autocast=precision.autocast, progress=dist_info.is_master,
        )  # fmt: skip
        summary = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
        message = f"step {step:5d} | {name} {summary}"
        log_record(log, message, evals.log_line(step, name, result), step=step, kind=name, **result)
    model.train()
    return val_loss


@torch.no_grad()
def sample(step, model, tokenizer, cfg, precision, device, log):
    """Complete SAMPLE_PROMPT; the seed is fixed so that only the model changes from one sample to the next."""
    prompt = tokenizer.encode(SAMPLE_PROMPT)
    idx = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=device)  # (num_samples, T0)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    model.eval()
    with precision.autocast():
        out = model.generate(idx, cfg.sample_tokens, temperature=1.0, top_k=50, generator=generator)
    model.train()
    for i, row in enumerate(out.tolist()):
        text = tokenizer.decode(row).replace("\n", " ")
        log_record(log, f"step {step:5d} | sample {i}: {text}", step=step, kind="sample", text=text)


def save_training_state(path, step, model, optimizer, scaler, train_loader, val_loss, nonfinite_skips, cfg, dist_info):
    """Everything a resume needs. Every process takes part (each one's RNG state is gathered); rank 0
    writes."""
    rngs = all_gather(rng_state(dist_info.device), dist_info.world_size)
    if not dist_info.is_master:
        return
    checkpoint = {
        **model_checkpoint(model),  # weights (never with `_orig_mod.`: `model` is not the compiled one) + config
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "args": asdict(cfg),
        "val_loss": val_loss,  # the latest one
        "dataloader": train_loader.state_dict(),  # the same on every rank
        "rng": rngs,  # one per rank
        "nonfinite_skips": nonfinite_skips,
    }
    save_checkpoint(path, checkpoint)
    prune_checkpoints(cfg.log_dir, cfg.keep_last)


def restore_training_state(checkpoint, model, optimizer, scaler, train_loader):
    """The inverse of save_training_state, on every process."""
    model.load_state_dict(clean_state_dict(checkpoint["model"]))
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler.is_enabled() and checkpoint["scaler"]:  # empty when the run was not float16
        scaler.load_state_dict(checkpoint["scaler"])
    # The data position is one stream for all ranks: a run may resume on a different number of GPUs
    # (at the same total_batch_size) and read exactly the tokens it would have read.
    train_loader.load_state_dict(checkpoint["dataloader"])


def divergence_message(step, loss, grad_norm, last_saved):
    return (
        f"step {step}: loss {loss}, gradient norm {grad_norm}: training diverged. The last good checkpoint is "
        f"{last_saved or 'none (none written yet)'}: resume from it with --resume <checkpoint> and a lower "
        f"--max_lr, or let training skip such updates with --max_nonfinite_skips N"
    )


def log_run_summary(log, cfg, model, precision, compiled, grad_accum_steps, world_size, device, start_step):
    """The setup and the values derived from it, once at the start."""
    B, T = cfg.batch_size, cfg.seq_len
    dtype = str(precision.dtype).removeprefix("torch.")
    if precision.scaler.is_enabled():
        dtype += " with loss scaling"
    log_record(
        log,
        f"{world_size} process(es) on {device}, {dtype}, {'compiled' if compiled else 'eager'}\n"
        f"model: {model.num_params() / 1e6:.2f}M parameters, {model.flops_per_token(T) / 1e9:.3f} GFLOP per token "
        f"(training)\n"
        f"batch: {cfg.total_batch_size:,} tokens per step = batch_size {B} x seq_len {T} x {world_size} process(es) "
        f"x grad_accum_steps {grad_accum_steps}\n"
        f"schedule: {cfg.max_steps} steps = {cfg.max_steps * cfg.total_batch_size / 1e9:.3g}B tokens; "
        f"warmup {cfg.warmup_steps} steps to lr {cfg.max_lr:g}, cosine to {cfg.max_lr * cfg.min_lr_ratio:g}",
        step=start_step,
        kind="config",
        **asdict(cfg),
        grad_accum_steps=grad_accum_steps,
        world_size=world_size,
        num_params=model.num_params(),
    )


def train(cfg, dist_info):
    device, world_size, is_master = dist_info.device, dist_info.world_size, dist_info.is_master
    model_config = GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    if cfg.seq_len > model_config.block_size:
        raise SystemExit(f"--seq_len {cfg.seq_len} is longer than the model's block_size {model_config.block_size}")
    grad_accum_steps = get_grad_accum_steps(cfg, world_size)
    eval_names = [name for name in cfg.evals.split(",") if name]
    unknown = [name for name in eval_names if name not in evals.TASKS]
    if unknown:
        raise SystemExit(f"--evals: unknown task {', '.join(unknown)}; choose from {', '.join(evals.TASKS)}")

    # The data first: without shards there is nothing to do, and nothing should be written to log_dir.
    B, T = cfg.batch_size, cfg.seq_len
    loader_args = dict(process_rank=dist_info.rank, num_processes=world_size, data_root=cfg.data_dir, device=device)
    train_loader = DataLoaderLite(B, T, split="train", shuffle=cfg.shuffle, seed=cfg.seed, **loader_args)
    val_loader = DataLoaderLite(B, T, split="val", **loader_args)

    # Rank 0 picks the checkpoint, so that every process resumes from the same one.
    resume_from = all_gather(resume_path(cfg.resume, cfg.log_dir), world_size)[0]
    checkpoint = load_checkpoint(resume_from) if resume_from else None
    if checkpoint:
        check_model_config(checkpoint, model_config, resume_from)
    start_step = checkpoint["step"] if checkpoint else 0
    log = setup_logging(cfg.log_dir, start_step, is_master)
    precision = setup_precision(cfg.dtype, dist_info.device_type)

    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model = GPT(model_config).to(device)
    optimizer = model.configure_optimizers(
        cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), cfg.adam_eps, dist_info.device_type
    )
    nonfinite_skips, val_loss = 0, None
    if checkpoint:
        restore_training_state(checkpoint, model, optimizer, precision.scaler, train_loader)
        nonfinite_skips, val_loss = checkpoint["nonfinite_skips"], checkpoint["val_loss"]
        log.info(f"resuming from {resume_from} at step {start_step}")
    # `model` stays uncompiled and unwrapped: evaluation, sampling and checkpoints use it directly.
    # `train_model` shares its parameters and is what the training step calls.
    example_batch = (torch.zeros((B, T), dtype=torch.long, device=device),) * 2
    train_model = compile_model(model, cfg.compile, dist_info.device_type, example_batch, precision, log)
    compiled = train_model is not model
    if world_size > 1:
        train_model = DDP(train_model, device_ids=[dist_info.local_rank] if device.startswith("cuda") else None)
    eval_tasks = {name: evals.load_task(name, limit=cfg.eval_limit or None) for name in eval_names}
    tokenizer = gpt2_tokenizer() if is_master and cfg.sample_interval > 0 else None

    flops_per_token = model.flops_per_token(T)
    peak = peak_flops(device, precision.dtype)
    log_run_summary(log, cfg, model, precision, compiled, grad_accum_steps, world_size, device, start_step)
    if checkpoint and dist_info.rank < len(checkpoint["rng"]):
        set_rng_state(checkpoint["rng"][dist_info.rank], device)  # last, after everything that draws at startup
    del checkpoint  # the optimizer state inside is a second copy of it

    step, last_saved = start_step, resume_from
    step_time_ema = None
    stopping = False
    with StopOnSignal() as signals:
        while not stopping:
            if due(cfg.eval_interval, step, cfg.max_steps):
                val_loss = evaluate(step, model, val_loader, eval_tasks, cfg, precision, dist_info, log)
            if tokenizer and due(cfg.sample_interval, step, cfg.max_steps):
                sample(step, model, tokenizer, cfg, precision, device, log)
            if step == cfg.max_steps:
                break

            t0 = time.perf_counter()
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for micro_step in range(grad_accum_steps):
                x, y = train_loader.next_batch()  # (B, T), (B, T)
                with grad_sync(train_model, micro_step == grad_accum_steps - 1):
                    with precision.autocast():
                        _, loss = train_model(x, y)
                    # .grad accumulates a sum over micro-steps; dividing each loss makes it the mean
                    loss = loss / grad_accum_steps
                    loss_sum += loss.detach()
                    precision.scaler.scale(loss).backward()
            train_loss = all_reduce_sum(loss_sum, world_size).item() / world_size  # the mean over processes
            precision.scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
            # With fp16 an inf norm is an overflow: the scaler skips that update and lowers its scale.
            if math.isfinite(train_loss) and (math.isfinite(grad_norm) or precision.scaler.is_enabled()):
                precision.scaler.step(optimizer)
            else:  # the update would put inf/nan into every weight: skip it, or stop
                nonfinite_skips += 1
                if nonfinite_skips > cfg.max_nonfinite_skips:
                    raise SystemExit(divergence_message(step, train_loss, grad_norm, last_saved))
                skipped = f"update skipped ({nonfinite_skips} so far)"
                log.warning(f"step {step}: loss {train_loss}, grad norm {grad_norm}: {skipped}")
            precision.scaler.update()
            if dist_info.device_type == "cuda":
                torch.cuda.synchronize()  # the step is queued, not done, until the GPU catches up
            dt = time.perf_counter() - t0

            tokens_per_sec = cfg.total_batch_size / dt
            mfu = flops_per_token * tokens_per_sec / (peak * world_size) if peak else None
            # the first step of a process compiles and warms up: leave it out of the time estimate
            step_time_ema = dt if step_time_ema is None or step == start_step + 1 else 0.9 * step_time_ema + 0.1 * dt
            eta = timedelta(seconds=round(step_time_ema * (cfg.max_steps - step - 1)))
            log_record(
                log,
                f"step {step:5d}/{cfg.max_steps} | loss {train_loss:.6f} | lr {lr:.4e} | norm {grad_norm:.4f} | "
                f"{dt * 1000:.1f} ms | {tokens_per_sec:,.0f} tok/s | mfu {f'{mfu:.1%}' if mfu else 'n/a'} | eta {eta}",
                f"{step} train {train_loss:.6f}",
                step=step, kind="train", loss=train_loss, lr=lr, grad_norm=grad_norm, dt_ms=dt * 1000,
                tokens_per_sec=tokens_per_sec, mfu=mfu, eta_s=eta.total_seconds(), nonfinite_skips=nonfinite_skips,
                epoch=train_loader.epoch,
            )  # fmt: skip
            step += 1
            # every process must stop after the same step, even if only one of them got the signal
            stopping = any_process(signals.requested, device, world_size)
            # Saved before the evaluations of this step: a crash in them loses no training.
            if due(cfg.ckpt_interval, step, cfg.max_steps) or step == cfg.max_steps or stopping:
                last_saved = checkpoint_path(cfg.log_dir, step)
                save_training_state(
                    last_saved, step, model, optimizer, precision.scaler, train_loader, val_loss, nonfinite_skips,
                    cfg, dist_info,
                )
                log.info(f"step {step:5d} | saved {last_saved}")
    if stopping:
        log.info(f"stopped by a signal after step {step}: resume with the same command (or --resume {last_saved})")


def main(argv=None):
    cfg = parse_config(argv)
    dist_info = setup_distributed(cfg.device)
    finished = False
    try:
        train(cfg, dist_info)
        finished = True
    finally:
        close_logging()
        teardown_distributed(finished)


if __name__ == "__main__":
    main()
