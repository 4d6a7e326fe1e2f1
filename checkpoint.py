"""
Checkpoints: written atomically, read without running code, complete enough to resume exactly.

A checkpoint is a dict saved with torch.save:
    model       state_dict, without torch.compile's `_orig_mod.` or DDP's `module.` prefixes
    config      dataclasses.asdict(GPTConfig): enough to rebuild the model with no other file
    step        optimizer updates done (0-based steps 0..step-1); training resumes at step `step`
    optimizer, scaler, args, val_loss, nonfinite_skips (updates skipped for an inf/nan loss)
    dataloader  the train loader's state_dict(): one stream position, the same on every rank
    rng         [rng_state() of each rank]

Every value is a tensor, a number, a string or a list/dict/tuple of those, so
`torch.load(..., weights_only=True)` reads it: opening a checkpoint cannot run code.

    model = model_from_checkpoint("log/model_19073.pt", "cuda")     # for evaluation or sampling

Export a checkpoint as a Hugging Face GPT2LMHeadModel folder (for the EleutherAI evaluation harness,
transformers' pipelines, or `python hellaswag.py --model FOLDER`):

    python checkpoint.py log/model_19073.pt --hf_dir gpt2-fineweb
"""

import argparse
import glob
import os
import random
import re
from dataclasses import asdict

import numpy as np
import torch

from model import GPT, GPTConfig

CHECKPOINT_NAME = re.compile(r"model_(\d+)\.pt$")


def clean_state_dict(state_dict):
    """Strip the prefixes that wrappers add: torch.compile's `_orig_mod.` and DDP's `module.`."""
    prefixes = ("_orig_mod.", "module.")
    cleaned = {}
    for name, tensor in state_dict.items():
        while name.startswith(prefixes):
            name = name.split(".", 1)[1]
        cleaned[name] = tensor
    return cleaned


def save_checkpoint(path, checkpoint):
    """Write to a temporary file, fsync, then rename: a crash mid-write never leaves a truncated
    checkpoint under the final name (os.replace is atomic on POSIX and Windows)."""
    tmp_path = f"{path}.tmp"
    try:
        with open(tmp_path, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:  # disk full, Ctrl-C: no half-written file stays behind
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def load_checkpoint(path, map_location="cpu"):
    """weights_only=True: a checkpoint can only hold tensors and plain containers, never code.
    map_location="cpu" by default, so loading does not allocate a second copy on the GPU."""
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or a pickle that would run code
        raise SystemExit(f"cannot read checkpoint {path}: {e}")


def model_checkpoint(model):
    """The part of a checkpoint that describes the model: its weights and its config."""
    return {"model": clean_state_dict(model.state_dict()), "config": asdict(model.config)}


def model_from_checkpoint(path, device="cpu"):
    """Rebuild a GPT from a checkpoint file, for evaluation or sampling."""
    checkpoint = load_checkpoint(path)
    model = GPT(GPTConfig(**checkpoint["config"]))
    model.load_state_dict(clean_state_dict(checkpoint["model"]))
    return model.to(device)


# ---- where checkpoints live ----


def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f"model_{step:05d}.pt")


def list_checkpoints(log_dir):
    """{step: path} of the finished checkpoints in log_dir (never the `.tmp` of an interrupted write)."""
    found = {}
    for path in glob.glob(os.path.join(log_dir, "model_*.pt")):
        match = CHECKPOINT_NAME.search(os.path.basename(path))
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def resume_path(resume, log_dir):
    """The checkpoint to start from: None for a fresh start.
    resume: "auto" (the newest in log_dir, if any), "none", or a path."""
    if resume == "none":
        existing = list_checkpoints(log_dir)
        if existing:
            raise SystemExit(
                f"--resume none, but {log_dir} already holds checkpoints (the newest: {existing[max(existing)]}) "
                "from an earlier run: continue it with --resume auto, or pick another --log_dir"
            )
        return None
    if resume == "auto":
        existing = list_checkpoints(log_dir)
        return existing[max(existing)] if existing else None
    if not os.path.isfile(resume):
        raise SystemExit(f"--resume {resume}: no such checkpoint file (or pass --resume auto / none)")
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
    saved = checkpoint["config"]
    wanted = asdict(config)
    diffs = [f"{k}={saved[k]} (flags say {wanted[k]})" for k in wanted if saved.get(k) != wanted[k]]
    if diffs:
        raise SystemExit(
            f"checkpoint {path} holds a model with {', '.join(diffs)}: pass the same model flags "
            "(--n_layer --n_head --n_embd, or the same --preset) to resume it, or a new --log_dir to start afresh"
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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a training checkpoint in Hugging Face GPT-2 format.")
    parser.add_argument("checkpoint", help="a checkpoint written by train_gpt2.py, e.g. log/model_19073.pt")
    parser.add_argument("--hf_dir", required=True, help="folder to write the GPT2LMHeadModel into")
    args = parser.parse_args(argv)
    model_from_checkpoint(args.checkpoint).save_pretrained(args.hf_dir)
    print(f"wrote {args.hf_dir}: load it with transformers.GPT2LMHeadModel.from_pretrained({args.hf_dir!r})")


if __name__ == "__main__":
    main()
