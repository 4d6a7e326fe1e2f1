"""
LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): fine-tune a model by
learning a small change to some of its weight matrices instead of the matrices themselves.

A frozen nn.Linear computes x W^T + b. LoRA adds a product of two thin matrices,

    y = x W^T + b + (alpha / r) * x A^T B^T        A: (r, in), B: (out, r), r << in, out

and trains only A and B. B starts at zero, so at step 0 the model is exactly the base model; A
starts random, so B gets gradients from the first step. alpha / r keeps the size of an update
about the same whatever the rank. GPT-2 124M's four matrices per block (attn.c_attn, attn.c_proj,
mlp.c_fc, mlp.c_proj) at r = 8 are 1.18M trainable parameters instead of 124M: AdamW's state
shrinks with them, which is what makes fine-tuning fit a small GPU.

    apply_lora(model, rank=8, alpha=16, targets=["attn", "mlp"])   # model.parameters(): only A, B train
    merge_lora(model)                                               # back to plain nn.Linear layers
"""

import math

import torch
import torch.nn as nn

from errors import UserError
from quant import QuantLinear

# The linear layers of a block, by the name --lora_targets uses for them (the output layer is tied
# to the token embedding and stays frozen).
TARGETS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}


class LoRALinear(nn.Module):
    """A frozen nn.Linear (or quant.QuantLinear: QLoRA) plus a trainable low-rank update (see the module
    docstring)."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear does to its own weight

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.lora_A.t() @ self.lora_B.t())  # (B, T, out)

    def merged(self):
        """The plain nn.Linear with W + (alpha / r) B A as its weight: the same outputs, no extra cost."""
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        linear.to(self.base.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.scale * self.lora_B @ self.lora_A)
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear


def lora_layers(model, targets):
    """[(parent module, attribute name)] of the linear layers that targets (names of TARGETS) select."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise UserError(f"--lora_targets {','.join(targets)}: choose from {', '.join(TARGETS)} (comma-separated)")
    suffixes = tuple(name for target in targets for name in TARGETS[target])
    layers = []
    for name, module in model.named_modules():
        if name.endswith(suffixes) and isinstance(module, (nn.Linear, QuantLinear)):
            parent_name, attribute = name.rsplit(".", 1)
            layers.append((model.get_submodule(parent_name), attribute))
    return layers


def apply_lora(model, rank, alpha, targets):
    """Freeze every parameter of model, and wrap the selected linear layers in LoRALinear: the
    adapters are then all that trains. Returns the model."""
    model.requires_grad_(False)
    for parent, attribute in lora_layers(model, targets):
        setattr(parent, attribute, LoRALinear(getattr(parent, attribute), rank, alpha))
    return model


def merge_lora(model):
    """Replace every LoRALinear by its merged nn.Linear, in place: a plain GPT again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, attribute = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), attribute, module.merged())
    model.requires_grad_(True)
    return model


def adapter_state_dict(model):
    """The trainable tensors only (lora_A and lora_B): what a LoRA checkpoint holds besides a
    reference to its base weights."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
