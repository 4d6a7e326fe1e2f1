"""
The Hugging Face transformers format: OpenAI's GPT-2 weights in, our models and tokenizers out.

    model = from_pretrained("gpt2")          # the hub (HF_ENDPOINT for a mirror), or a local folder
    save_pretrained(model, "gpt2-fineweb")   # a GPT2LMHeadModel folder (export.py writes one from a checkpoint)

Parameter names follow the Hugging Face GPT-2 layout (`transformer.h.0.attn.c_attn.weight`, ...), so
OpenAI's checkpoint maps onto ours one tensor at a time.
"""

import json
import os

import torch

from errors import UserError
from model import GPT, MODERN_SWITCHES, GPTConfig
from tokenizer import GPT2, GPT2_CHAT

# GPTConfig field -> the name of the same setting in Hugging Face's GPT2Config
HF_CONFIG_NAMES = {
    "block_size": "n_positions",
    "vocab_size": "vocab_size",
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_embd": "n_embd",
}


def from_pretrained(name_or_dir):
    """Load "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl" from the Hugging Face hub (set
    HF_ENDPOINT to use a mirror), or a local folder saved with save_pretrained (works offline)."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise UserError("loading pretrained GPT-2 weights needs transformers: pip install transformers")
    try:
        hf_model = GPT2LMHeadModel.from_pretrained(name_or_dir)
    except OSError as e:
        raise UserError(
            f"could not load GPT-2 weights {name_or_dir!r}: {e}\n"
            "Pass a local folder in Hugging Face format, or set HF_ENDPOINT to a reachable hub mirror."
        )
    config = our_config(hf_model.config, name_or_dir)
    model = GPT(config)
    ours = model.state_dict()
    theirs = hf_model.state_dict()
    with torch.no_grad():
        for name, transposed in hf_names(model):
            src = theirs[name].t() if transposed else theirs[name]
            if name == "transformer.wte.weight":
                ours[name][: config.vocab_size].copy_(src)
                ours[name][config.vocab_size :].zero_()  # padding rows: never used, see forward
            else:
                ours[name].copy_(src)
    return model


def our_config(hf_cfg, name_or_dir):
    """The GPTConfig of a Hugging Face GPT2Config (UserError for a GPT-2 that is not OpenAI's architecture)."""
    if hf_cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{name_or_dir}: activation {hf_cfg.activation_function!r} is not GPT-2's tanh GELU")
    return GPTConfig(**{ours: getattr(hf_cfg, theirs) for ours, theirs in HF_CONFIG_NAMES.items()})


def config_from_pretrained(folder):
    """The GPTConfig of a local Hugging Face GPT-2 folder, from its config.json alone: no weights read."""
    from transformers import GPT2Config

    try:
        return our_config(GPT2Config.from_pretrained(folder), folder)
    except OSError as e:
        raise UserError(f"could not read the config of GPT-2 folder {folder!r}: {e}")


def hf_names(model):
    """(name, transposed) for every tensor of the Hugging Face GPT-2 layout. OpenAI's code used a
    `Conv1D` layer that stores matmul weights as (in, out); nn.Linear stores (out, in)."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    # lm_head.weight is the same tensor as wte (tied), so it is not listed separately
    return [(k, k.endswith(conv1d)) for k in model.state_dict() if k != "lm_head.weight"]


def save_pretrained(model, out_dir):
    """Write model as a Hugging Face GPT2LMHeadModel folder, for tools that expect that
    format (the EleutherAI evaluation harness, transformers' generate, ...)."""
    cfg = model.config
    if not cfg.is_gpt2:
        # No transformers architecture has this combination (Llama has RoPE and RMSNorm, but a SwiGLU
        # MLP, a norm gain and no QK-norm or soft cap): an export would compute something else.
        switches = [name for name in MODERN_SWITCHES if getattr(cfg, name)]
        raise UserError(
            f"this model uses the modern recipe ({', '.join(switches)}), which GPT2LMHeadModel cannot hold, and "
            f"no transformers architecture matches it: sample, chat and evaluate the checkpoint itself "
            f"(sample.py, chat.py, evals.py, hellaswag.py take --checkpoint)"
        )
    from transformers import GPT2Config, GPT2LMHeadModel

    sizes = {theirs: getattr(cfg, ours) for ours, theirs in HF_CONFIG_NAMES.items()}
    hf_config = GPT2Config(activation_function="gelu_new", **sizes)  # gelu_new: the tanh GELU
    hf_model = GPT2LMHeadModel(hf_config)
    ours = model.state_dict()
    theirs = hf_model.state_dict()
    with torch.no_grad():
        for name, transposed in hf_names(model):
            src = ours[name][: cfg.vocab_size] if name == "transformer.wte.weight" else ours[name]
            theirs[name].copy_(src.t() if transposed else src)
    hf_model.tie_weights()
    hf_model.save_pretrained(out_dir)


def save_stop_ids(out_dir, stop_ids):
    """The tokens that end generation in a Hugging Face model folder (generation_config.json's
    eos_token_id; <|endoftext|> alone by default): a chat model's replies end at <|end|>."""
    from transformers import GenerationConfig

    generation_config = GenerationConfig.from_pretrained(out_dir)
    generation_config.eos_token_id = list(stop_ids)
    generation_config.save_pretrained(out_dir)


# GPT-2's two BPE files as OpenAI published them: Hugging Face's GPT2Tokenizer reads them as vocab.json and
# merges.txt.
GPT2_FILES = {
    "vocab.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    "merges.txt": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
}


def save_hf_tokenizer(tokenizer, out_dir, chat_template=None):
    """Write tokenizer's files into a Hugging Face model folder, so that
    `transformers.pipeline("text-generation", model=out_dir)` works offline. Only GPT-2's BPE: a
    trained tokenizer has no Hugging Face form here (UserError), and the model folder stays without one.
    gpt2-chat's chat tokens become the added tokens 50,257-50,260 of Hugging Face's GPT2Tokenizer.
    chat_template: the Jinja template tokenizer.apply_chat_template renders conversations with
    (chat_template.JINJA_TEMPLATE, for a chat fine-tuned model)."""
    if tokenizer.name not in (GPT2, GPT2_CHAT):
        raise UserError(
            f"the model folder {out_dir} was written without tokenizer files: exporting a trained tokenizer "
            f"({tokenizer.name}) to Hugging Face format is not supported; encode with tokenizer.py instead"
        )
    from tiktoken.load import read_file_cached  # the files tiktoken downloaded, or found in TIKTOKEN_CACHE_DIR

    for filename, url in GPT2_FILES.items():
        with open(os.path.join(out_dir, filename), "wb") as f:
            f.write(read_file_cached(url))
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": 1024,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    config["added_tokens_decoder"] = {
        str(i): {
            "content": text,
            "special": True,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
        }
        for text, i in tokenizer.special_tokens.items()
    }
    if chat_template:
        config["chat_template"] = chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
