"""
The training state and the resume policy: what a training checkpoint holds (docs/checkpoints.md),
saving it, choosing the checkpoint a run resumes from (--resume auto / none / PATH), starting a branch
when an older one is resumed, and restoring every piece of it (RNG included) so that the per-step
losses are bit-identical to a run that was never interrupted.

    resumed = resume_checkpoint(cfg, model_config, dist_info)      # None: a fresh start
    loop = restore_training_state(resumed, model, optimizer, scaler, train_loader)
"""

import glob
import os
import random
import re
from dataclasses import asdict, fields

import numpy as np
import torch

from checkpoint import (
    check_keys,
    clean_state_dict,
    load_checkpoint,
    load_weights,
    model_checkpoint,
    save_checkpoint,
    trained_weights,
)
from device import all_gather, unwrap
from errors import UserError
from fsdp import gather_full, shard_like
from model import GPTConfig

CHECKPOINT_NAME = re.compile(r"model_(\d+)\.pt$")

TRAINING_KEYS = [
    "model",
    "config",
    "step",
    "optimizer",
    "scaler",
    "args",
    "dataloader",
    "rng",
    "nonfinite_skips",
    "last_val",
]


def save_training_state(run, step, model, optimizer, train_loader, loop):
    """Everything a resume needs (docs/checkpoints.md), as log_dir/model_<step>.pt; returns its path.
    Every process takes part (each one's RNG state is gathered); rank 0 writes. loop: the loop's own
    state and the job's extra keys. If the write fails (a full disk), the message names the checkpoint
    before it, which is intact."""
    cfg, dist_info = run.cfg, run.dist
    path = checkpoint_path(cfg.log_dir, step)
    rngs = all_gather(rng_state(dist_info.device), dist_info.world_size)
    # Under FSDP every tensor is a shard: gathered whole here. keep_vars: the parameters themselves,
    # so that the tied wte / lm_head weight is one object, gathered once.
    weights = gather_full(trained_weights(unwrap(model), keep_vars=True), dist_info.is_master)
    optimizer_state = gather_full(optimizer.state_dict(), dist_info.is_master)
    if not dist_info.is_master:
        return path
    checkpoint = {
        **model_checkpoint(model, run.tokenizer, weights),
        "step": step,
        "optimizer": optimizer_state,
        "scaler": run.precision.scaler.state_dict(),
        "args": asdict(cfg),
        "dataloader": train_loader.state_dict(),  # the same on every rank
        "rng": rngs,  # one per rank
        **loop,
    }
    previous = newest_checkpoint(cfg.log_dir)
    try:
        save_checkpoint(path, checkpoint)
    except UserError as e:
        intact = f"the previous checkpoint, {previous}, is intact" if previous else "no checkpoint was written yet"
        raise UserError(f"{e}; {intact}: make room, then resume with --resume auto") from e
    prune_checkpoints(cfg.log_dir, cfg.keep_last)
    return path


def resume_checkpoint(cfg, model_config, dist_info, expected=None):
    """The checkpoint a run starts from (None for a fresh start), checked against the run's flags and
    against `expected`, keys its value must have (finetune.py: the base weights, LoRA, the template).
    Rank 0 picks it and every rank learns its choice (or its error) before anyone loads anything, so
    all resume from the same file and all stop together if there is none to resume from."""
    choice = pick_checkpoint(cfg.resume, cfg.log_dir) if dist_info.is_master else None
    path, skipped, error = all_gather(choice, dist_info.world_size)[0]
    if error:
        raise UserError(error)
    if path is None:
        return None
    # mapped, not read: each tensor is read from disk when used, and under FSDP each rank reads only
    # its shard's rows of the weights and AdamW's moments (fsdp.shard_like), never the whole model
    checkpoint = load_checkpoint(path, mmap=True)
    check_keys(checkpoint, TRAINING_KEYS, path, "a training checkpoint written by train_gpt2.py")
    check_model_config(checkpoint, model_config, path)
    for key, value in (expected or {}).items():
        if checkpoint.get(key) != value:
            # a key newer than the checkpoint: it was off then (docs/checkpoints.md names each key's flag)
            written = f"with {key} {checkpoint[key]}" if key in checkpoint else f"before {key} existed (so without it)"
            raise UserError(
                f"{path} was written {written}, this run has {value}: resume with the same settings "
                f"({key}'s flag: docs/checkpoints.md), or start afresh in a new --log_dir"
            )
    defaults = {f.name: f.default for f in fields(cfg)}  # for checkpoints older than a flag
    # the optimizer's saved parameter groups (their LRs included) replace the run's own at the restore
    optimizer_state = "the optimizer state it holds was built with that"
    for name, why in (
        ("total_batch_size", "the data position and the LR schedule count steps of that size"),
        ("optimizer", optimizer_state),
        ("muon_lr", optimizer_state),
        ("muon_momentum", optimizer_state),
        ("embed_lr", optimizer_state),
        ("head_lr", optimizer_state),
    ):
        saved = checkpoint["args"].get(name, defaults[name])
        if saved != getattr(cfg, name):
            raise UserError(
                f"{path} was trained with --{name} {saved}, this run has {getattr(cfg, name)}: {why}. Resume with "
                f"--{name} {saved}, or start afresh in a new --log_dir"
            )
    checkpoint["path"] = path
    checkpoint["passed_over"] = skipped  # for the run's log: why newer checkpoints were not used
    return checkpoint


def pick_checkpoint(resume, log_dir):
    """(path or None, [why newer checkpoints were passed over], error or None), never raising: see
    resume_checkpoint. With --resume auto, a damaged newest checkpoint (a zero-byte or truncated
    file that no atomic write leaves, but a copy or a failing disk can) gives way to the newest
    readable one."""
    try:
        if resume != "auto":
            return explicit_resume(resume, log_dir), [], None
        skipped = []
        for path in reversed(list_checkpoints(log_dir).values()):
            try:
                checkpoint = load_checkpoint(path, mmap=True)
                check_keys(checkpoint, TRAINING_KEYS, path, "a training checkpoint written by train_gpt2.py")
                return path, skipped, None
            except UserError as e:
                skipped.append(str(e))
        if skipped:
            return None, [], f"--resume auto: no checkpoint in {log_dir} can be read ({'; '.join(skipped)})"
        return None, [], None
    except UserError as e:
        return None, [], str(e)


def start_branch(log_dir, step):
    """Resuming from step `step` while log_dir holds later checkpoints (an older checkpoint picked
    with --resume PATH, say after a divergence) starts a new branch of the run. The later
    checkpoints belong to the abandoned branch: they move to log_dir/abandoned_after_<step>/, so that
    --resume auto and --keep_last see only this branch. Nothing is deleted. Returns what moved."""
    later = [path for s, path in list_checkpoints(log_dir).items() if s > step]
    if later:
        folder = os.path.join(log_dir, f"abandoned_after_{step:05d}")
        os.makedirs(folder, exist_ok=True)
        for path in later:
            os.replace(path, os.path.join(folder, os.path.basename(path)))
    return later


def restore_training_state(checkpoint, model, optimizer, scaler, train_loader):
    """The inverse of save_training_state, on every process. Returns the loop's saved state."""
    own = model.state_dict()  # under FSDP, this rank's shards: the saved tensors are cut like them
    weights = {
        name: shard_like(t, own[name]) if name in own else t
        for name, t in clean_state_dict(checkpoint["model"]).items()
    }
    load_weights(model, weights, checkpoint["path"])
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the ids the saved state uses
    state = {
        i: {key: shard_like(t, params[i]) if t.shape == params[i].shape else t for key, t in moments.items()}
        for i, moments in checkpoint["optimizer"]["state"].items()
    }
    optimizer.load_state_dict({**checkpoint["optimizer"], "state": state})
    if scaler.is_enabled() and checkpoint["scaler"]:  # empty when the run was not float16
        scaler.load_state_dict(checkpoint["scaler"])
    # The data position is one stream for all ranks: a run may resume on a different number of GPUs
    # (at the same total_batch_size) and read exactly the tokens it would have read.
    train_loader.load_state_dict(checkpoint["dataloader"])
    return {"nonfinite_skips": checkpoint["nonfinite_skips"], "last_val": checkpoint["last_val"]}


def restore_rng(checkpoint, dist_info):
    """This rank's generators as they were at the save. Call it last, after everything that draws
    random numbers at startup (the model's initialisation). A rank the saving run did not have
    keeps its fresh seed: its data does not depend on it, only its samples would."""
    if dist_info.rank < len(checkpoint["rng"]):
        set_rng_state(checkpoint["rng"][dist_info.rank], dist_info.device)


# ---- where checkpoints live ----


def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f"model_{step:05d}.pt")


def newest_checkpoint(log_dir):
    """The path of the newest checkpoint in log_dir, or None."""
    found = list_checkpoints(log_dir)
    return found[max(found)] if found else None


def list_checkpoints(log_dir):
    """{step: path} of the finished checkpoints in log_dir (never the `.tmp` of an interrupted write)."""
    found = {}
    for path in glob.glob(os.path.join(log_dir, "model_*.pt")):
        match = CHECKPOINT_NAME.search(os.path.basename(path))
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def explicit_resume(resume, log_dir):
    """--resume none (None: a fresh start, refused if log_dir holds checkpoints) or --resume PATH."""
    if resume == "none":
        existing = list_checkpoints(log_dir)
        if existing:
            raise UserError(
                f"--resume none, but {log_dir} already holds checkpoints (the newest: {existing[max(existing)]}) "
                "from an earlier run: continue it with --resume auto, or pick another --log_dir"
            )
        return None
    if not os.path.isfile(resume):
        raise UserError(f"--resume {resume}: no such checkpoint file (or pass --resume auto / none)")
    return resume


def prune_checkpoints(log_dir, keep_last):
    """Delete all but the keep_last newest checkpoints (keep_last=0 keeps them all)."""
    if keep_last <= 0:
        return
    steps = list(list_checkpoints(log_dir).items())
    for _, path in steps[:-keep_last]:
        os.remove(path)


def check_model_config(checkpoint, config, path):
    """A checkpoint only loads into a model of the same shape: say which flags differ."""
    saved = {**asdict(GPTConfig()), **checkpoint["config"]}  # a switch a checkpoint predates was off
    wanted = asdict(config)
    diffs = [f"{k}={saved[k]} (flags say {wanted[k]})" for k in wanted if saved.get(k) != wanted[k]]
    if diffs:
        raise UserError(
            f"checkpoint {path} holds a model with {', '.join(diffs)}: pass the same model flags "
            "(--n_layer --n_head --n_embd and the recipe's switches, or the same --preset and --recipe) to resume it, "
            "or a new --log_dir to start afresh"
        )


# ---- random number generators ----


def rng_state(device):
    """Every generator training could draw from. numpy's state is a tuple holding an array, which
    weights_only loading refuses: its key array is stored as a list of ints instead."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    """Inverse of rng_state."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)
    elif "mps" in state and device == "mps":
        torch.mps.set_rng_state(state["mps"])
