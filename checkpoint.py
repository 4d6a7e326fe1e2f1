"""
Checkpoints: written atomically, read without running code.

A checkpoint is a dict saved with torch.save:
    model       state_dict, without torch.compile's `_orig_mod.` or DDP's `module.` prefixes
    config      dataclasses.asdict(GPTConfig): enough to rebuild the model with no other file
    step, val_loss, optimizer, scaler, args, dataloader, rng   (filled in by train_gpt2.py)
"""

import os
from dataclasses import asdict

import torch

from model import GPT, GPTConfig


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
    with open(tmp_path, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)


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
