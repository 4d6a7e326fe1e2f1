"""
The GPT-2 model: a decoder-only transformer, written to be read.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig())                 # 124M, randomly initialised, ready to train
    logits, loss = model(idx, targets)       # idx, targets: (B, T) int64

This file knows nothing about data, DDP or logging: `train_gpt2.py` wires those in. OpenAI's weights
load through hf.py, generation with a KV cache is generate.py, the optimizer optim.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# GPT-2's BPE has 50,000 merges + 256 byte tokens + 1 <|endoftext|> = 50,257 tokens.
GPT2_VOCAB_SIZE = 50257

# Matmul kernels are fastest when dimensions are multiples of 64/128 (tensor-core tiles). 50,257 is
# odd, so the embedding and output layer get 50,304 = 393 * 128 rows; the extra 47 ids never occur
# in the data, and `GPT.forward` gives them -inf logits so they can never be predicted or sampled.
VOCAB_PAD_MULTIPLE = 128

# (n_layer, n_head, n_embd) of OpenAI's four GPT-2 sizes, and small shapes that train on a CPU.
MODEL_SIZES = {
    "gpt2": (12, 12, 768),  # 124M
    "gpt2-medium": (24, 16, 1024),  # 350M
    "gpt2-large": (36, 20, 1280),  # 774M
    "gpt2-xl": (48, 25, 1600),  # 1558M
    "tiny": (2, 2, 64),  # for unit tests: runs in milliseconds
    "mini": (4, 4, 64),  # for CPU demos (train_gpt2.py --preset cpu): trains in minutes
}


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (number of learned position embeddings)
    vocab_size: int = GPT2_VOCAB_SIZE  # real token ids are 0 .. vocab_size-1
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # The modern recipe (train_gpt2.py --recipe modern turns all of these on; all off is GPT-2). Each is
    # a switch of its own, so that `git grep` of its name finds every line it changes.
    rope: bool = False  # rotary position embeddings instead of learned ones (Su et al. 2021, RoFormer)
    rmsnorm: bool = False  # RMSNorm without a gain for every LayerNorm, and on the embeddings (modded-nanogpt)
    qk_norm: bool = False  # RMSNorm of each head's queries and keys (Dehghani et al. 2023, ViT-22B)
    relu2: bool = False  # ReLU(x)^2 instead of GELU in the MLP (So et al. 2021, Primer)
    untied_head: bool = False  # an output layer of its own, not the token embedding (modded-nanogpt)
    zero_init: bool = False  # output projections and an untied head start at zero (modded-nanogpt, after muP)
    logit_softcap: float = 0.0  # logits squashed into (-cap, cap) by cap * tanh(logits / cap), 0: off (Gemma 2)

    @classmethod
    def from_name(cls, name, **overrides):
        """GPTConfig.from_name("gpt2-medium") or GPTConfig.from_name("mini", block_size=256)."""
        if name not in MODEL_SIZES:
            raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(MODEL_SIZES)}")
        n_layer, n_head, n_embd = MODEL_SIZES[name]
        return cls(n_layer=n_layer, n_head=n_head, n_embd=n_embd, **overrides)

    @property
    def padded_vocab_size(self):
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    @property
    def is_gpt2(self):
        """True when no modern switch is on: the architecture of OpenAI's GPT-2 (and of its HF format)."""
        return not any(getattr(self, name) for name in MODERN_SWITCHES)


MODERN_SWITCHES = ("rope", "rmsnorm", "qk_norm", "relu2", "untied_head", "zero_init", "logit_softcap")


def make_norm(config):
    """GPT-2's LayerNorm or, with config.rmsnorm, RMSNorm without a gain: x / sqrt(mean(x^2) + eps). No
    mean to subtract and no parameters: cheaper, and trains as well (Zhang & Sennrich 2019)."""
    return nn.RMSNorm(config.n_embd, elementwise_affine=False) if config.rmsnorm else nn.LayerNorm(config.n_embd)


def rotary_angles(pos, head_size, base=10000.0):
    """(cos, sin) of the rotary angles of positions pos, (T,) or (B, T) for per-row positions, each
    (T, hs/2) or (B, 1, T, hs/2), to broadcast over (B, nh, T, hs/2). Channel pair i turns by
    pos * base^(-2i/hs): fast turns for the first pairs, slow ones for the last (RoFormer, eq. 15)."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, device=pos.device, dtype=torch.float32) / head_size)
    angles = pos[..., None].float() * inv_freq  # (..., T, hs/2)
    if pos.dim() == 2:
        angles = angles[:, None]  # (B, 1, T, hs/2): the same for every head
    return angles.cos(), angles.sin()


def apply_rotary(x, rotary):
    """x (B, nh, T, hs) with each channel pair (j, j + hs/2) turned by its angle. Queries and keys turned
    by their positions make q . k depend on how far apart two tokens are, not on where they are.
    RoFormer pairs channels (2j, 2j + 1); pairing the two halves, as GPT-NeoX and Llama do, is the same
    rotation with the channels in another fixed order, and needs no interleaving."""
    cos, sin = (t.to(x.dtype) for t in rotary)
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


@torch.no_grad()
def init_weight(tensor, std):
    """One step of GPT.weight_inits: N(0, std), or zeros for std None."""
    if std is None:
        return tensor.zero_()
    return tensor.normal_(mean=0.0, std=std)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}")
        self.n_head = config.n_head
        self.qk_norm = config.qk_norm
        # query, key and value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        # output projection back into the residual stream
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        # prefix tuning (prefix.py) sets a prefix.Prefix here: P learned keys and values before the tokens'
        self.prefix = None

    def forward(self, x, rotary=None, attn_mask=None, kv_cache=None):
        """Training passes x alone: every position at once, causally masked. Generation also passes
        attn_mask (B, 1, T, T_all), True where a query may see a key, and usually a kv_cache holding
        the keys and values of the T_all - T earlier positions (generate.py). rotary: the
        (cos, sin) of rotary_angles for these T positions (config.rope), else None."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        # split the channels into heads: (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.qk_norm:  # every q . k / sqrt(hs) is then at most sqrt(hs): no attention logit can blow up
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rotary is not None:  # turned after the norm (a rotation keeps the norm); cached keys are turned
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, nh, T_all, hs): the earlier positions' keys, then these
        elif self.prefix is not None:
            k_prefix, v_prefix = self.prefix.heads(B, k.dtype)  # (B, nh, P, hs) each
            k, v = torch.cat((k_prefix, k), dim=2), torch.cat((v_prefix, v), dim=2)  # (B, nh, P + T, hs)
        if self.prefix is not None:  # the keys start with the prefix (a cache holds it first): all see it
            attn_mask = prefix_mask(attn_mask, len(self.prefix), T, x.device)
        if attn_mask is None:
            # softmax(q k^T / sqrt(hs)) v with a causal mask; PyTorch picks a flash-attention kernel
            # where it can, which never materialises the (T, T) attention matrix.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        else:
            # is_causal would be wrong here: with fewer queries than keys it aligns the mask to the
            # first key, not the last, so the one new query would see only position 0.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads
        return self.c_proj(y)


def prefix_mask(attn_mask, P, T, device):
    """attn_mask (B, 1, T, T_all) of the keys after a prefix of P positions, or None (training: causal
    over T), widened to (B or 1, 1, T, P + T_all): True in the P columns of the prefix, which every
    query may attend to."""
    if attn_mask is None:
        return torch.ones(T, P + T, dtype=torch.bool, device=device).tril(diagonal=P)  # causal after P
    return F.pad(attn_mask, (P, 0), value=True)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        # GPT-2 was trained with the tanh approximation of GELU; the exact erf form differs by ~1e-3
        # and would break parity with OpenAI's weights.
        self.gelu = nn.GELU(approximate="tanh")
        self.relu2 = config.relu2
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        x = self.c_fc(x)  # (B, T, 4C)
        # ReLU^2: cheaper than GELU, and sparse (Primer found it the best of many activations)
        x = F.relu(x).square() if self.relu2 else self.gelu(x)
        return self.c_proj(x)


class Block(nn.Module):
    """Pre-LN transformer block: the norm sits inside each residual branch (GPT-2, not GPT-1)."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rotary=None, attn_mask=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), rotary, attn_mask, kv_cache)  # tokens communicate
        x = x + self.mlp(self.ln_2(x))  # each token computes on its own
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # built in this order, which fixes the order of the random draws of the initialisation
        modules = dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd))  # token embeddings
        if not config.rope:  # rotary embeddings turn queries and keys instead: nothing to learn
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # position embeddings
        if config.rmsnorm:  # the embeddings normalised too, so that the first block's input has a fixed scale
            modules["ln_e"] = make_norm(config)
        modules["h"] = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        modules["ln_f"] = make_norm(config)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if not config.untied_head:
            # Weight tying (GPT-2, after Press & Wolf 2017): the output layer reuses the token embedding
            # matrix. Saves 38.6M parameters (30% of the 124M model) and trains at least as well.
            self.lm_head.weight = self.transformer.wte.weight
        # Activation checkpointing, set by the caller (train_gpt2.py --activation_checkpointing): in a
        # training forward each block keeps only its input, 1 x (B, T, C) values instead of the ~16 x
        # (B, T, C) its backward needs (counted in device.activation_bytes); backward runs the block's
        # forward again to get them. Costs one more forward per step, ~1/3 more compute.
        self.activation_checkpointing = False
        # fine-tuning with a frozen base (token_rows.py) sets a TokenRows here: trained rows of a few tokens
        self.token_rows = None
        self._init_weights()

    def _init_weights(self):
        for param, std in self.weight_inits():
            init_weight(param, std)

    def weight_inits(self):
        """(parameter, std) in the order GPT-2's initialisation draws them: N(0, std) for weights, zero
        biases (std None); LayerNorm keeps its constructor's (1, 0). fsdp.initialise_shards replays
        them on a model built on the meta device."""
        std = 0.02
        # Each block adds to the residual stream twice (attention, MLP), so after L blocks the stream
        # has received 2L contributions; scaling their output projections by 1/sqrt(2L) keeps its
        # variance from growing with depth (GPT-2 paper, section 2.3).
        residual_std = std * (2 * self.config.n_layer) ** -0.5
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                module_std = residual_std if name.endswith("c_proj") else std
                # zero_init: every block starts as the identity and the first logits are uniform; the
                # gradients still reach these weights, as their inputs are not zero
                output = name.endswith("c_proj") or (name == "lm_head" and self.config.untied_head)
                zero = self.config.zero_init and output
                yield module.weight, 0.0 if zero else module_std
                if module.bias is not None:
                    yield module.bias, None
            elif isinstance(module, nn.Embedding):
                yield module.weight, std

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) token ids; targets == -1 marks positions left out of the loss.
        Returns logits (B, T, vocab_size) and the mean cross-entropy loss (None without targets)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(
                f"sequence of {T} tokens is longer than the model's block_size={self.config.block_size}: "
                f"crop the input or train with a larger block_size"
            )
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x, rotary = self.embed(idx, pos)  # (B, T, C)
        for block in self.transformer.h:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # use_reentrant=False: the variant PyTorch recommends; it works with FSDP's hooks and
                # with inputs that need no gradient
                x = torch.utils.checkpoint.checkpoint(block, x, rotary, use_reentrant=False)
            else:
                x = block(x, rotary)
        logits = self.head(self.transformer.ln_f(x))  # (B, T, padded_vocab_size)
        # The padding ids are not tokens: a logit of -inf gives them probability exactly 0, in the loss
        # and when sampling. The write is hidden from autograd: recorded, its backward would clone the
        # whole (B, T, padded_vocab_size) gradient to zero 47 columns that are zero anyway (softmax
        # gives them probability 0). No backward needs this tensor: the matmul's needs only its inputs,
        # and the soft cap's final multiplication by a number needs nothing (its tanh saved its own
        # output, another tensor), so this is safe.
        with torch.no_grad():
            logits[..., self.config.vocab_size :] = float("-inf")
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        # Callers see exactly vocab_size columns, like any GPT-2 implementation (a view, not a copy).
        return logits[..., : self.config.vocab_size], loss

    def embed(self, idx, pos):
        """The input of the first block, (B, T, C), for token ids idx (B, T) at positions pos, (T,) or
        (B, T); and the (cos, sin) of the rotary embeddings of pos (config.rope), else None."""
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.token_rows is not None:
            x = x + self.token_rows.embedding_change(idx)
        rotary = None
        if self.config.rope:
            rotary = rotary_angles(pos, self.config.n_embd // self.config.n_head)
        else:
            x = x + self.transformer.wpe(pos)  # + (T, C) or (B, T, C): learned absolute positions
        if self.config.rmsnorm:
            x = self.transformer.ln_e(x)
        return x, rotary

    def head(self, x):
        """(..., C) -> (..., padded_vocab_size) logits: the output layer, then the optional soft cap."""
        # cap * tanh(logits / cap) keeps every logit within (-cap, cap), smoothly (Gemma 2; modded-nanogpt
        # uses 15): the loss cannot be pushed down by ever more confident logits. The division is done on
        # the input (the layer is linear) and tanh in place (the matmul's backward does not need its
        # output): on the (B, T, vocab) logits each elementwise pass is a large share of a small model's step.
        cap = self.config.logit_softcap
        if cap:
            x = x / cap
        logits = self.lm_head(x)
        if self.token_rows is not None:
            logits = self.token_rows.add_to_logits(logits, x)
        return logits.tanh_() * cap if cap else logits

    def num_params(self):
        """Number of parameters, counting the tied embedding / output matrix once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward) at sequence length seq_len.

        PaLM's estimate (Chowdhery et al. 2022, appendix B): 6N for the matmuls with the weights
        (2 per multiply-add, x3 for forward + backward), plus 12*L*H*Q*T for the attention scores
        and their weighted sum, which involve no weights. N counts the token embedding, which is
        also the output layer, but not the position embedding, a lookup with no matmul (nor, with an
        untied head, the token embedding: then a lookup too). The 47 padding rows are excluded: MFU
        counts only useful work. GPT-2 124M at T=1024: ~0.855 GFLOP.
        """
        cfg = self.config
        lookups = {"transformer.wpe.weight", "transformer.wte.weight" if cfg.untied_head else None}
        N = sum(p.numel() for name, p in self.named_parameters() if name not in lookups)  # tied: counted once
        N -= (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, seq_len
        return 6 * N + 12 * L * H * Q * T
