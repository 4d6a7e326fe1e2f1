"""
Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"), in
every layer as P-Tuning v2 does it (Liu et al. 2022): fine-tune a model by learning P key and value
vectors per layer that every token attends to, as if the text started with P positions that are not
tokens. The model's own weights are frozen; per layer a (P, C) key and a (P, C) value train:

    softmax(q [K_prefix; K]^T / sqrt(hs)) [V_prefix; V]        per head, K_prefix: (P, hs)

The prefix has no position (no position embedding, no rotary turn: it is learned where it is used),
and no causal mask applies to it: every token sees all of it. At generation the prefix is simply the
KV cache's first P positions (generate.KVCache), so sampling costs what it did plus P keys.

Choices: the prefixes are trained directly, not through the MLP reparameterisation of Li & Liang
(P-Tuning v2 found it helps on some tasks and hurts on others; without it a checkpoint holds exactly
the prefixes it trains). They start as the keys and values the frozen model computes for P random
tokens ("real word" activations, which Li & Liang found train better than random vectors), so the
model starts close to the base, not at it: attention always gives the prefix some weight.

    apply_prefix(model, prefix_len=16)        # model.parameters(): only the prefixes train
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Prefix(nn.Module):
    """One layer's trainable prefix: keys and values of prefix_len positions, (P, C) each."""

    def __init__(self, prefix_len, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.k = nn.Parameter(torch.zeros(prefix_len, n_embd))  # (P, C)
        self.v = nn.Parameter(torch.zeros(prefix_len, n_embd))  # (P, C)

    def __len__(self):
        return self.k.size(0)

    def heads(self, batch_size, dtype):
        """The prefix's keys and values as attention uses them: (B, nh, P, hs) each, in dtype."""
        P, C = self.k.shape
        split = lambda t: t.to(dtype).view(P, self.n_head, C // self.n_head).transpose(0, 1)  # noqa: E731
        return split(self.k).expand(batch_size, -1, -1, -1), split(self.v).expand(batch_size, -1, -1, -1)


def apply_prefix(model, prefix_len, init=True):
    """Freeze every parameter of model and give each layer's attention a Prefix, which then is all
    that trains. init: start the prefixes at the frozen model's own keys and values of prefix_len
    random tokens (drawn from torch's global generator: seed it first); else zeros, for loading."""
    model.requires_grad_(False)
    config = model.config
    layers = [block.attn for block in model.transformer.h]
    device = model.transformer.wte.weight.device
    prefixes = [Prefix(prefix_len, config.n_embd, config.n_head).to(device) for _ in layers]
    if init:
        tokens = torch.randint(0, config.vocab_size, (1, prefix_len), device=device)
        for prefix, (k, v) in zip(prefixes, base_keys_values(model, tokens)):
            prefix.k.data.copy_(k[0])
            prefix.v.data.copy_(v[0])
    for attn, prefix in zip(layers, prefixes):
        attn.prefix = prefix
    return model


@torch.no_grad()
def base_keys_values(model, idx):
    """[(k, v)] per layer, each (B, T, C): the keys and values each layer's attention computes for
    idx's positions: c_attn's, and with qk_norm the keys normed per head as attention norms them
    (not turned by RoPE: a prefix has no position)."""
    C, n_head = model.config.n_embd, model.config.n_head
    captured = []

    def capture(attn, out):
        k, v = out.split(C, dim=2)[1:]  # (B, T, C) each
        if attn.qk_norm:
            heads = k.view(*k.shape[:2], n_head, C // n_head)  # (B, T, nh, hs)
            k = F.rms_norm(heads, (C // n_head,)).view_as(k)
        captured.append((k, v))

    hooks = [
        block.attn.c_attn.register_forward_hook(lambda m, args, out, attn=block.attn: capture(attn, out))
        for block in model.transformer.h
    ]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def prefix_len(model):
    """P of a prefix-tuned model, 0 for any other."""
    prefix = model.transformer.h[0].attn.prefix
    return 0 if prefix is None else len(prefix)
