"""
A quantized frozen base for LoRA and prefix tuning (QLoRA: Dettmers et al. 2023, "QLoRA: Efficient
Finetuning of Quantized LLMs"): the frozen weight matrices are stored in 8 or 4 bits per number and
turned back into floats, one layer at a time, when a forward (or backward) pass needs them. Only the
adapters train, in full precision, so the rounding of the base is never accumulated by an optimizer.

Blockwise absmax quantization: cut a weight matrix into blocks of 64 numbers (QLoRA's block size);
in each block divide by the largest magnitude (its absmax, kept as a float32 scale), so every number
lands in [-1, 1]; store the index of the nearest of a few fixed levels in [-1, 1]. Dequantizing is
level[code] * absmax. One outlier only spoils the precision of its own block of 64.

- int8: 255 evenly spaced levels k / 127, k = -127..127 (one byte per number).
- nf4 (4-bit NormalFloat): 16 levels placed at quantiles of a normal distribution, because trained
  weights are about normally distributed: each level then gets about as many weights as the others,
  which uses 4 bits better than 16 evenly spaced levels. Two codes are packed into each byte.

A number x of a block with scale s is stored as the level nearest to x / s, so its error is at most
half the gap between the two levels around it, times s: |x - dequantized| <= max_gap / 2 * s
(int8: 1/254 * s; nf4: about 0.152 * s, its widest gap being between -1 and the next level).

The float32 scale per 64 numbers costs 0.5 bit per number (QLoRA also quantizes the scales, "double
quantization", to save 0.37 of it; not done here). A bias stays in float32. The codes and scales are
buffers, not parameters: FSDP (--parallel fsdp) shards the parameters and copies buffers whole to every
process, which a quantized base is small enough for (GPT-2 XL's blocks in NF4: 0.77 GiB).

    model = quantize_linears(model, "nf4")     # the blocks' nn.Linear -> QuantLinear (frozen)
    model = dequantize_linears(model)          # back to nn.Linear, with the dequantized weights
"""

import torch
import torch.nn as nn

from errors import UserError

BLOCK_SIZE = 64  # numbers per absmax scale (QLoRA, section 3)
FORMATS = ("int8", "nf4")


def nf4_levels():
    """The 16 NF4 levels, in [-1, 1], sorted. Each is the middle of its share of a standard normal:
    the quantiles Phi^-1(p) at evenly spaced probabilities p, scaled into [-1, 1]. Asymmetric, so that
    0 is exactly a level (padding and zero weights stay exact): 8 levels for the positive half, 7 for
    the negative, then 0. The outermost quantile is taken at p = 0.9677 (QLoRA's offset, the middle
    of the outermost of 2 x 16 equal slices: (1 - 1/32 + 1 - 1/30) / 2), as Phi^-1(1) is infinite."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8, > 0
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7, < 0
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (levels / levels.abs().max()).float()  # -1 and 1 the outermost


def int8_levels():
    """The 255 int8 levels k / 127, k = -127..127 (-128 is left out: the grid stays symmetric)."""
    return torch.arange(-127, 128, dtype=torch.float32) / 127


def levels_of(format):
    return nf4_levels() if format == "nf4" else int8_levels()


def quantize(weight, format):
    """(codes, absmax) of weight, whose number of elements must be a multiple of BLOCK_SIZE.
    codes: flat uint8, one per number (int8) or two per byte (nf4); absmax: float32, one per block."""
    if weight.numel() % BLOCK_SIZE:
        raise UserError(
            f"cannot quantize a {tuple(weight.shape)} weight in blocks of {BLOCK_SIZE}: give the model an n_embd "
            f"that is a multiple of 8"
        )
    blocks = weight.detach().float().reshape(-1, BLOCK_SIZE)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1).clamp(min=1e-12)  # (n_blocks,): an all-zero block divides by ~0
    levels = levels_of(format).to(weight.device)
    # the nearest level: count the midpoints between levels below the number (ties go up)
    codes = torch.bucketize(blocks / absmax[:, None], (levels[1:] + levels[:-1]) / 2).to(torch.uint8).flatten()
    if format == "nf4":
        codes = codes.view(-1, 2)
        codes = codes[:, 0] << 4 | codes[:, 1]  # two 4-bit codes per byte: the first in the high half
    return codes, absmax


def dequantize(codes, absmax, format, shape, dtype=torch.float32):
    """The weight (shape) that quantize's codes and absmax stand for, in dtype."""
    if format == "nf4":
        codes = torch.stack([codes >> 4, codes & 0xF], dim=1)  # (n / 2, 2): unpacked, in order
    levels = levels_of(format).to(absmax.device)
    blocks = levels[codes.long().view(-1, BLOCK_SIZE)] * absmax[:, None]  # (n_blocks, 64)
    return blocks.view(shape).to(dtype)


def error_bound(format):
    """The largest |x - dequantized(x)| / absmax of its block: half the widest gap between levels."""
    return (levels_of(format).diff().max() / 2).item()


class QuantizedMatmul(torch.autograd.Function):
    """x @ W^T, W dequantized when needed. Autograd would keep the dequantized W of every layer for
    backward, as much memory as a float base; here backward dequantizes it again (about one more
    forward's dequantization per step) and only the codes stay in memory. W is frozen: no gradient."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.dequantized(x.dtype).t()

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output @ ctx.layer.dequantized(grad_output.dtype), None


class QuantLinear(nn.Module):
    """A frozen nn.Linear whose weight is held as blockwise-quantized codes (the module docstring).
    `weight` is the dequantized float32 matrix: what LoRA merges its update into."""

    def __init__(self, linear, format):
        super().__init__()
        self.format, self.in_features, self.out_features = format, linear.in_features, linear.out_features
        codes, absmax = quantize(linear.weight, format)
        self.register_buffer("codes", codes)
        self.register_buffer("absmax", absmax)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self, dtype):
        return dequantize(self.codes, self.absmax, self.format, (self.out_features, self.in_features), dtype)

    @property
    def weight(self):
        return self.dequantized(torch.float32)

    def forward(self, x):
        device = x.device.type
        if torch.is_autocast_enabled(device):  # autocast does not reach inside an autograd.Function
            x = x.to(torch.get_autocast_dtype(device))
        y = QuantizedMatmul.apply(x, self)  # (B, T, out)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


# The blocks' four weight matrices: 12 C^2 of the 12 C^2 + 2 C numbers a block holds. The token
# embedding (also the output layer) stays in float, as QLoRA leaves its output layer.
QUANTIZED = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def quantize_linears(model, format):
    """Replace the blocks' nn.Linear layers (QUANTIZED) by frozen QuantLinear, in place."""
    for name, module in list(model.named_modules()):
        if name.endswith(QUANTIZED) and isinstance(module, nn.Linear):
            parent, attribute = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attribute, QuantLinear(module, format))
    return model


def dequantize_linears(model):
    """Replace every QuantLinear by an nn.Linear holding its dequantized weight, in place: a plain GPT
    again, whose weights are what the adapters were trained on top of."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            parent, attribute = name.rsplit(".", 1)
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.weight)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            setattr(model.get_submodule(parent), attribute, linear.to(module.codes.device))
    return model


def weight_bytes(model):
    """Bytes of the model's parameters and buffers, each tied tensor counted once."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
