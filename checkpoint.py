"""
Checkpoint files: written atomically, read without running code (weights_only), and loaded back as a
model for evaluation, sampling, chat or export (a LoRA checkpoint merged into its base, a prefix-tuned
one as its base with its prefixes).

    save_checkpoint("log/model_00100.pt", model_checkpoint(model, tokenizer))
    model = model_from_checkpoint("log/model_19073.pt", "cuda")

What a training checkpoint holds, key by key, and how it resumes: resume.py and docs/checkpoints.md.
"""

import os
from dataclasses import asdict, replace

import torch

from device import unwrap
from errors import UserError
from files import atomic_write
from hf import config_from_pretrained, from_pretrained
from lora import adapter_state_dict, apply_lora, merge_lora
from model import GPT, MODEL_SIZES, GPTConfig
from prefix import apply_prefix
from quant import dequantize_linears, quantize_linears
from token_rows import apply_token_rows, merge_token_rows
from tokenizer import GPT2, get_tokenizer

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
    text = str(e)
    if "weights_only" in text:
        # A class or function pickled by name ("unsupported GLOBAL"): loading it would run its code. Else
        # torch's error sits in the middle of its advice: no pickle torch wrote, or a damaged one.
        if "global" in text.lower() or "WeightsUnpickler error:" not in text:
            return "it holds Python objects other than tensors, numbers and containers, which are never loaded here"
        text = text.split("WeightsUnpickler error:", 1)[1]
    first_line = (text.strip().splitlines() or [""])[0][:200]
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
    checkpoint (finetune.py --lora_rank) is its base weights plus its adapters, merged; a prefix-tuned
    one (--peft prefix) is its base with a prefix in every layer, which only this repo's GPT runs. The
    chat tokens' trained rows (token_rows.py) of either are added into the embedding."""
    checkpoint = load_checkpoint(path)
    what = "a checkpoint of this repo (a Hugging Face folder loads with --model)"
    check_keys(checkpoint, ["model", "config"], path, what)
    config = GPTConfig(**checkpoint["config"])
    if not (checkpoint.get("lora") or checkpoint.get("prefix")):
        model = GPT(config)
        load_weights(model, checkpoint["model"], path)
        return model.to(device)
    what = "LoRA adapters" if checkpoint.get("lora") else "prefixes"
    base = load_lora_base(path, checkpoint["init"]["path"], config.vocab_size, what)
    if fingerprint(base) != checkpoint["init"]["fingerprint"]:
        raise UserError(
            f"{path} holds {what} for the weights in {checkpoint['init']['path']}, which have changed since "
            f"(another model is there now): restore those weights, or fine-tune again"
        )
    model = adapt(base, checkpoint, init=False)
    load_weights(model, checkpoint["model"], path)
    # A quantized base's adapters were trained on its dequantized weights: they merge into those, and
    # the model keeps them (docs/benchmarks.md measures how far they are from the float base's).
    return merge_token_rows(dequantize_linears(merge_lora(model))).to(device)


def adapt(model, record, init):
    """model as fine-tuning trains it, following a checkpoint's record (finetune.load_base writes it):
    its base quantized (base_quant), then LoRA adapters (lora) or a prefix per layer (prefix), then
    trainable rows of the chat tokens (token_rows); the base frozen whenever one of these is on. init:
    the adapters start as training starts them, else they are placeholders for a checkpoint's weights."""
    if record.get("base_quant"):
        model.requires_grad_(False)
        quantize_linears(model, record["base_quant"])
    if record.get("lora"):
        lora = record["lora"]
        apply_lora(model, lora["rank"], lora["alpha"], lora["targets"])
    if record.get("prefix"):
        apply_prefix(model, record["prefix"]["len"], init=init)
    if record.get("token_rows"):  # after the freezing above: they train (zero at the start either way)
        apply_token_rows(model, record["token_rows"]["ids"])
    return model


def load_lora_base(path, init, vocab_size, what="LoRA adapters"):
    """The base weights of the LoRA (or prefix) checkpoint in path: load_init(init), its errors told as
    the adapters' base, which the person loading path may never have named (finetune.py's --init did)."""
    held = f"{path} holds {what} for the base weights in {init}"
    if os.path.isabs(init) and not os.path.exists(init):  # finetune.py records a file or folder by its absolute path
        raise UserError(f"{held}, which is no longer there: restore it, or fine-tune again from a base that exists")
    try:
        return load_init(init, vocab_size)
    except UserError as e:
        raise UserError(f"{held}, which cannot be loaded: {e}")


def load_init(init, vocab_size=None):
    """The base weights fine-tuning starts from: a train_gpt2.py checkpoint, a Hugging Face GPT-2
    folder, or a hub name (gpt2, gpt2-medium, ...), as a GPT. With vocab_size, the model predicts
    that many ids: GPT-2's chat tokens (50,257-50,260) take rows its padded embedding already has."""
    if os.path.isfile(init):
        model = model_from_checkpoint(init)
        if any(block.attn.prefix is not None for block in model.transformer.h):
            # its prefixes are not weights of a plain GPT: a run from it would save what no record describes
            raise prefix_init_error(init)
    elif os.path.isdir(init) or init.startswith("gpt2") and init in MODEL_SIZES:
        model = from_pretrained(init)
    else:
        raise unknown_init_error(init)
    if vocab_size is not None and vocab_size != model.config.vocab_size:
        wider = replace(model.config, vocab_size=vocab_size)
        if wider.padded_vocab_size != model.config.padded_vocab_size:
            rows = model.config.padded_vocab_size
            raise UserError(f"{init} has {rows:,} embedding rows, too few for a tokenizer of {vocab_size:,} ids")
        model.config = wider  # the same tensors: only which rows are real ids changes
    return model


def init_config(init):
    """The GPTConfig of load_init(init) without loading its weights (finetune.py --plan counts shapes):
    a checkpoint's recorded config (the file mapped, not read), a folder's config.json, or a hub
    name's size (OpenAI's GPT-2: 50,257 ids, 1,024 positions)."""
    if os.path.isfile(init):
        saved = load_checkpoint(init, mmap=True)
        check_keys(saved, ["config"], init, "a checkpoint of this repo")
        if saved.get("prefix"):
            raise prefix_init_error(init)
        return GPTConfig(**saved["config"])
    if os.path.isdir(init):
        return config_from_pretrained(init)
    if init.startswith("gpt2") and init in MODEL_SIZES:
        return GPTConfig.from_name(init)
    raise unknown_init_error(init)


def prefix_init_error(init):
    return UserError(
        f"--init {init} is prefix-tuned (--peft prefix): its prefixes cannot be trained further as a "
        f"base or merged into weights; fine-tune its own --init again with the prefix run's data"
    )


def unknown_init_error(init):
    return UserError(
        f"--init {init}: neither a checkpoint file, nor a Hugging Face model folder, nor one of "
        f"{', '.join(name for name in MODEL_SIZES if name.startswith('gpt2'))}"
    )


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
    weights.add_argument(
        "--model", help="OpenAI GPT-2 weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local Hugging Face folder"
    )
    parser.add_argument(
        "--tokenizer", default="auto", help="auto (the checkpoint's; gpt2 for --model), gpt2, or a tokenizer folder"
    )


def load_model(args, device):
    """(model, tokenizer) of --checkpoint or --model (see add_model_args), the model on device."""
    if args.checkpoint:
        return model_from_checkpoint(args.checkpoint, device), checkpoint_tokenizer(args.checkpoint, args.tokenizer)
    tokenizer = get_tokenizer(GPT2 if args.tokenizer == "auto" else args.tokenizer)
    return from_pretrained(args.model).to(device), tokenizer
