"""
Checkpoints: written atomically, read without running code, complete enough to resume exactly.

A training checkpoint is a dict saved with torch.save; this file writes and reads every key of it:
    model           state_dict of the plain GPT (no torch.compile `_orig_mod.` or DDP `module.` prefixes)
    config          dataclasses.asdict(GPTConfig): enough to rebuild the model with no other file
    tokenizer       {"name", "hash"} of its tokenizer (tokenizer.py): gpt2, or the folder of a trained one
    step            optimizer updates done (steps 0 .. step-1); training resumes at step `step`
    optimizer       the optimizer's state_dict (moments and step counts): AdamW's, or with --optimizer muon
                    model.MuonWithAdamW's, in the same format
    scaler          the fp16 GradScaler's state_dict ({} when not training in float16)
    args            dataclasses.asdict(TrainConfig) of the run that wrote it
    dataloader      the train loader's state_dict(): one stream position, the same on every rank
    rng             [rng_state() of each rank]
    nonfinite_skips updates skipped so far for an inf/nan loss or gradient
    last_val        {"step", "loss", "bpb"} of the newest validation before this checkpoint, or None.
                    The checkpoint of step s is saved before step s's own evaluation (so a crash in
                    the evaluation loses no training): its last_val is from an earlier step.
    init            fine-tuning (finetune.py): {"path", "fingerprint"} of the base weights; None otherwise
    lora            fine-tuning with LoRA: {"rank", "alpha", "targets"}; `model` then holds only the
                    adapters, and loading merges them into the base (model_from_checkpoint)
    template        chat fine-tuning: the chat format's name and token ids (finetune.chat_template)

Every value is a tensor, a number, a string or a list/dict/tuple of those, so
`torch.load(..., weights_only=True)` reads it: opening a checkpoint cannot run code.

Under FSDP (train_gpt2.py --parallel fsdp) the file is the same: every sharded tensor is gathered
whole into rank 0's CPU memory and written there (gather_full), and each rank cuts its own shard out
of it at resume (shard_like). So a checkpoint does not depend on how it was trained: it resumes
under DDP or FSDP, on any number of processes, and exports and evaluates as any other. The price is
host memory on rank 0 at a save, 12 bytes per parameter (weights and AdamW's two moments; 19 GB for
GPT-2 XL), instead of 1/N of that per rank for torch.distributed.checkpoint's sharded folders; those
only pay off for models far larger than GPT-2's (measured: docs/benchmarks.md, "FSDP").

    model = model_from_checkpoint("log/model_19073.pt", "cuda")     # for evaluation or sampling

Export a checkpoint as a Hugging Face GPT2LMHeadModel folder, with GPT-2's tokenizer files (for the
EleutherAI evaluation harness, transformers' pipelines, or `python hellaswag.py --model FOLDER`):

    python checkpoint.py log/model_19073.pt --hf_dir gpt2-fineweb
"""

import argparse
import glob
import os
import random
import re
from dataclasses import asdict, fields, replace

import numpy as np
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from device import all_gather, unwrap
from errors import UserError, exit_on_error
from files import atomic_write, describe_os_error
from lora import adapter_state_dict, apply_lora, merge_lora
from model import GPT, MODEL_SIZES, GPTConfig
from tokenizer import GPT2, get_tokenizer, save_hf_tokenizer

CHECKPOINT_NAME = re.compile(r"model_(\d+)\.pt$")
# what torch.compile (`_orig_mod.`) and DDP (`module.`) put before every parameter name
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def clean_state_dict(state_dict):
    """Strip the prefixes of wrapped models from a state dict saved by another tool."""
    cleaned = {}
    for name, tensor in state_dict.items():
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        cleaned[name] = tensor
    return cleaned


def save_checkpoint(path, checkpoint):
    """torch.save through files.atomic_write: a crash mid-write never leaves a truncated checkpoint."""
    try:
        atomic_write(path, lambda f: torch.save(checkpoint, f))
    except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) as a RuntimeError
        if "write" not in str(e):
            raise
        raise UserError(f"could not write {path}: {e} (is the disk full?)") from e


def load_checkpoint(path, map_location="cpu", mmap=False):
    """weights_only=True: a checkpoint can only hold tensors and plain containers, never code.
    map_location="cpu" by default, so loading does not allocate a second copy on the GPU. With
    mmap=True the tensors stay on disk until used: a cheap check that a file is readable."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated file, not a torch file, or a pickle that would run code
        raise UserError(f"cannot read checkpoint {path}: {load_error(e)}")
    if not isinstance(checkpoint, dict):
        raise UserError(f"cannot read checkpoint {path}: it holds a {type(checkpoint).__name__}, not a checkpoint")
    return checkpoint


def load_error(e):
    """What went wrong reading a file with torch.load, without torch's advice to load it with
    weights_only=False: that would run whatever code the file holds."""
    if "weights_only" in str(e):
        return "it holds Python objects other than tensors, numbers and containers, which are never loaded here"
    first_line = (str(e).strip().splitlines() or [""])[0][:200]
    return f"not a file written by torch.save, or a damaged one ({type(e).__name__}: {first_line})"


def check_keys(checkpoint, keys, path, what):
    missing = [key for key in keys if key not in checkpoint]
    if missing:
        raise UserError(
            f"{path} is not {what}: it has no {', '.join(missing)} (its keys: {', '.join(map(str, checkpoint))[:200]})"
        )


def model_checkpoint(model, tokenizer=None, weights=None):
    """The part of a checkpoint that describes the model: its weights (`weights`, else the model's
    own: trained_weights), its config, its tokenizer."""
    model = unwrap(model)
    checkpoint = {"model": trained_weights(model) if weights is None else weights, "config": asdict(model.config)}
    if tokenizer is not None:
        checkpoint["tokenizer"] = {"name": tokenizer.name, "hash": tokenizer.hash}
    return checkpoint


def trained_weights(model, keep_vars=False):
    """The weights a checkpoint holds: all of them; for a model with frozen parameters (LoRA) only the
    trainable ones, as the frozen ones are its base weights, which the checkpoint names (its `init`,
    see finetune.py) instead of copying."""
    if any(not p.requires_grad for p in model.parameters()):
        return adapter_state_dict(model)
    return model.state_dict(keep_vars=keep_vars)


def checkpoint_tokenizer(path, name="auto"):
    """The tokenizer of the model in a checkpoint: `name` if given (gpt2 or a folder: it must be the
    one the model was trained with), else the one the checkpoint records (gpt2 for a checkpoint
    that records none)."""
    recorded = load_checkpoint(path, mmap=True).get("tokenizer") or {"name": GPT2, "hash": None}
    tokenizer = get_tokenizer(recorded["name"] if name == "auto" else name)
    if recorded["hash"] and tokenizer.hash != recorded["hash"]:
        raise UserError(
            f"{path} was trained with tokenizer {recorded['name']} (hash {recorded['hash']}), not with "
            f"{tokenizer.name} (hash {tokenizer.hash}): pass --tokenizer with the folder it was trained with"
        )
    return tokenizer


def model_from_checkpoint(path, device="cpu"):
    """Rebuild a plain GPT from a checkpoint file, for evaluation, sampling, chat or export. A LoRA
    checkpoint (finetune.py --lora_rank) is its base weights plus its adapters, merged."""
    checkpoint = load_checkpoint(path)
    what = "a checkpoint of this repo (a Hugging Face folder loads with --model)"
    check_keys(checkpoint, ["model", "config"], path, what)
    config = GPTConfig(**checkpoint["config"])
    lora = checkpoint.get("lora")
    if not lora:
        model = GPT(config)
        load_weights(model, checkpoint["model"], path)
        return model.to(device)
    base = load_init(checkpoint["init"]["path"], config.vocab_size)
    if fingerprint(base) != checkpoint["init"]["fingerprint"]:
        raise UserError(
            f"{path} holds LoRA adapters for the weights in {checkpoint['init']['path']}, which have changed since "
            f"(another model is there now): restore those weights, or fine-tune again"
        )
    model = apply_lora(base, lora["rank"], lora["alpha"], lora["targets"])
    load_weights(model, checkpoint["model"], path)
    return merge_lora(model).to(device)


def load_init(init, vocab_size=None):
    """The base weights fine-tuning starts from: a train_gpt2.py checkpoint, a Hugging Face GPT-2
    folder, or a hub name (gpt2, gpt2-medium, ...), as a GPT. With vocab_size, the model predicts
    that many ids: GPT-2's chat tokens (50,257-50,260) take rows its padded embedding already has."""
    if os.path.isfile(init):
        model = model_from_checkpoint(init)
    elif os.path.isdir(init) or init.startswith("gpt2") and init in MODEL_SIZES:
        model = GPT.from_pretrained(init)
    else:
        raise UserError(
            f"--init {init}: neither a checkpoint file, nor a Hugging Face model folder, nor one of "
            f"{', '.join(name for name in MODEL_SIZES if name.startswith('gpt2'))}"
        )
    if vocab_size is not None and vocab_size != model.config.vocab_size:
        wider = replace(model.config, vocab_size=vocab_size)
        if wider.padded_vocab_size != model.config.padded_vocab_size:
            rows = model.config.padded_vocab_size
            raise UserError(f"{init} has {rows:,} embedding rows, too few for a tokenizer of {vocab_size:,} ids")
        model.config = wider  # the same tensors: only which rows are real ids changes
    return model


def fingerprint(model):
    """A number that changes with any weight: the float64 sum of all of them. A LoRA checkpoint
    records its base's, so that adapters are never merged into weights they were not trained on."""
    with torch.no_grad():
        return sum(tensor.double().sum().item() for tensor in model.state_dict().values())


def load_weights(model, weights, path):
    """model.load_state_dict(weights), where weights may leave out frozen parameters (a LoRA
    checkpoint holds its adapters only); anything else missing or extra is an error."""
    missing, unexpected = model.load_state_dict(clean_state_dict(weights), strict=False)
    # keep_vars: the tensors themselves, so that a tied weight (lm_head is wte) counts under both names
    frozen = {name for name, tensor in model.state_dict(keep_vars=True).items() if not tensor.requires_grad}
    really_missing = [name for name in missing if name not in frozen]
    if really_missing or unexpected:
        raise UserError(
            f"{path} does not fit this model: missing {really_missing[:3]}, unexpected {unexpected[:3]} (a "
            f"checkpoint of another model, or of LoRA with other --lora_targets?)"
        )


def add_model_args(parser):
    """--checkpoint | --model, and --tokenizer: what every script that uses a trained model takes."""
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="a checkpoint written by train_gpt2.py, e.g. log/model_19073.pt")
    weights.add_argument("--model", help="OpenAI GPT-2 weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local "
                         "Hugging Face folder")  # fmt: skip
    parser.add_argument("--tokenizer", default="auto",
                        help="auto (the checkpoint's; gpt2 for --model), gpt2, or a tokenizer folder")


def load_model(args, device):
    """(model, tokenizer) of --checkpoint or --model (see add_model_args), the model on device."""
    if args.checkpoint:
        return model_from_checkpoint(args.checkpoint, device), checkpoint_tokenizer(args.checkpoint, args.tokenizer)
    tokenizer = get_tokenizer(GPT2 if args.tokenizer == "auto" else args.tokenizer)
    return GPT.from_pretrained(args.model).to(device), tokenizer


# ---- the training state ----


TRAINING_KEYS = ["model", "config", "step", "optimizer", "scaler", "args", "dataloader", "rng", "nonfinite_skips",
                 "last_val"]  # fmt: skip


def save_training_state(path, step, model, tokenizer, optimizer, scaler, train_loader, cfg, loop, dist_info,
                        previous=None):  # fmt: skip
    """Everything a resume needs (the keys of the module docstring). Every process takes part (each
    one's RNG state is gathered); rank 0 writes. loop: {"nonfinite_skips", "last_val"}. If the write
    fails (a full disk), the message names `previous`, the checkpoint before it, which is intact."""
    rngs = all_gather(rng_state(dist_info.device), dist_info.world_size)
    # Under FSDP every tensor is a shard: gathered whole here. keep_vars: the parameters themselves,
    # so that the tied wte / lm_head weight is one object, gathered once.
    weights = gather_full(trained_weights(unwrap(model), keep_vars=True), dist_info.is_master)
    optimizer_state = gather_full(optimizer.state_dict(), dist_info.is_master)
    if not dist_info.is_master:
        return
    checkpoint = {
        **model_checkpoint(model, tokenizer, weights),
        "step": step,
        "optimizer": optimizer_state,
        "scaler": scaler.state_dict(),
        "args": asdict(cfg),
        "dataloader": train_loader.state_dict(),  # the same on every rank
        "rng": rngs,  # one per rank
        **loop,
    }
    try:
        save_checkpoint(path, checkpoint)
    except UserError as e:
        intact = f"the previous checkpoint, {previous}, is intact" if previous else "no checkpoint was written yet"
        raise UserError(f"{e}; {intact}: make room, then resume with --resume auto") from e
    prune_checkpoints(cfg.log_dir, cfg.keep_last)


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
    checkpoint = load_checkpoint(path)
    check_keys(checkpoint, TRAINING_KEYS, path, "a training checkpoint written by train_gpt2.py")
    check_model_config(checkpoint, model_config, path)
    for key, value in (expected or {}).items():
        if checkpoint.get(key) != value:
            raise UserError(
                f"{path} was written with {key} {checkpoint.get(key)}, this run has {value}: resume with the same "
                f"settings, or start afresh in a new --log_dir"
            )
    defaults = {f.name: f.default for f in fields(cfg)}  # for checkpoints older than a flag
    # the optimizer's saved parameter groups (their LRs included) replace the run's own at the restore
    optimizer_state = "the optimizer state it holds was built with that"
    for name, why in (("total_batch_size", "the data position and the LR schedule count steps of that size"),
                      ("optimizer", optimizer_state), ("muon_lr", optimizer_state), ("muon_momentum", optimizer_state),
                      ("embed_lr", optimizer_state), ("head_lr", optimizer_state)):  # fmt: skip
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
    weights = {name: shard_like(t, own[name]) if name in own else t
               for name, t in clean_state_dict(checkpoint["model"]).items()}  # fmt: skip
    load_weights(model, weights, checkpoint["path"])
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the ids the saved state uses
    state = {i: {key: shard_like(t, params[i]) if t.shape == params[i].shape else t for key, t in moments.items()}
             for i, moments in checkpoint["optimizer"]["state"].items()}  # fmt: skip
    optimizer.load_state_dict({**checkpoint["optimizer"], "state": state})
    if scaler.is_enabled() and checkpoint["scaler"]:  # empty when the run was not float16
        scaler.load_state_dict(checkpoint["scaler"])
    # The data position is one stream for all ranks: a run may resume on a different number of GPUs
    # (at the same total_batch_size) and read exactly the tokens it would have read.
    train_loader.load_state_dict(checkpoint["dataloader"])
    return {"nonfinite_skips": checkpoint["nonfinite_skips"], "last_val": checkpoint["last_val"]}


def gather_full(state, is_master, gathered=None):
    """A state_dict (nested dicts of tensors) with each FSDP shard (a DTensor) gathered whole, on the
    CPU of rank 0; None on the other ranks. Plain tensors (DDP, one process) stay where they are.
    Every rank must call it: each gather is an all-gather. A tensor that appears twice (the tied
    wte / lm_head weight) is gathered once and stays one tensor in the file."""
    gathered = {} if gathered is None else gathered
    if isinstance(state, dict):
        return {key: gather_full(value, is_master, gathered) for key, value in state.items()}
    if not isinstance(state, DTensor):
        return state.detach() if isinstance(state, torch.Tensor) else state  # a Parameter: save the tensor
    if id(state) not in gathered:
        full = state.full_tensor()  # one tensor at a time: the GPU never holds more than one whole
        gathered[id(state)] = full.cpu() if is_master else None
    return gathered[id(state)]


def shard_like(tensor, like):
    """A checkpoint's full tensor cut like `like`: this rank's shard of it when `like` is an FSDP
    shard (every rank read the whole file, so each cuts its own: no communication), else as it is."""
    if not isinstance(like, DTensor):
        return tensor
    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def restore_rng(checkpoint, dist_info):
    """This rank's generators as they were at the save. Call it last, after everything that draws
    random numbers at startup (the model's initialisation). A rank the saving run did not have
    keeps its fresh seed: its data does not depend on it, only its samples would."""
    if dist_info.rank < len(checkpoint["rng"]):
        set_rng_state(checkpoint["rng"][dist_info.rank], dist_info.device)


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


@exit_on_error
def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a training checkpoint in Hugging Face GPT-2 format.")
    parser.add_argument("checkpoint", help="a checkpoint written by train_gpt2.py, e.g. log/model_19073.pt")
    parser.add_argument("--hf_dir", required=True, help="folder to write the GPT2LMHeadModel into")
    parser.add_argument("--tokenizer", default="auto", help="auto (the one the checkpoint records), gpt2, or a folder")
    args = parser.parse_args(argv)
    model = model_from_checkpoint(args.checkpoint)
    tokenizer = checkpoint_tokenizer(args.checkpoint, args.tokenizer)
    if os.path.exists(args.hf_dir) and not os.path.isdir(args.hf_dir):
        raise UserError(f"--hf_dir {args.hf_dir} is a file: pass a folder (new, or one to overwrite)")
    try:
        model.save_pretrained(args.hf_dir)
    except OSError as e:  # a read-only or full disk
        raise UserError(f"could not write {args.hf_dir}: {describe_os_error(e)}") from e
    if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):  # transformers logs some failures and returns
        raise UserError(f"writing {args.hf_dir} failed: it holds no config.json afterwards")
    save_hf_tokenizer(tokenizer, args.hf_dir)
    print(f"wrote {args.hf_dir}: load it with transformers.GPT2LMHeadModel.from_pretrained({args.hf_dir!r})")


if __name__ == "__main__":
    main()
