"""
The GPT-2 model: a decoder-only transformer, written to be read.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig())                 # 124M, randomly initialised, ready to train
    model = GPT.from_pretrained("gpt2")      # OpenAI's weights (or a local Hugging Face folder)
    logits, loss = model(idx, targets)       # idx, targets: (B, T) int64
    out = model.generate(idx, 50, top_k=50)  # (B, T + 50): sampled, with a KV cache (sample.py)

This file knows nothing about data, DDP or logging: `train_gpt2.py` wires those in.
Parameter names follow the Hugging Face GPT-2 layout (`transformer.h.0.attn.c_attn.weight`, ...),
so OpenAI's checkpoint maps onto ours one tensor at a time.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from errors import UserError

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

# GPTConfig field -> the name of the same setting in Hugging Face's GPT2Config
HF_CONFIG_NAMES = {"block_size": "n_positions", "vocab_size": "vocab_size", "n_layer": "n_layer",
                   "n_head": "n_head", "n_embd": "n_embd"}


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

    def forward(self, x, rotary=None, attn_mask=None, kv_cache=None):
        """Training passes x alone: every position at once, causally masked. Generation also passes
        attn_mask (B, 1, T, T_all), True where a query may see a key, and usually a kv_cache holding
        the keys and values of the T_all - T earlier positions (see GPT.generate_stream). rotary: the
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


class KVCache:
    """One layer's keys and values of the positions processed so far, kept for generation.

    Without a cache, each new token reruns the model over the whole context; yet the keys and values
    of the earlier positions do not change (attention is causal), so they can be kept: the prompt
    runs once (prefill), then each step feeds one token, whose query attends to the cached keys and
    whose own key and value are appended. A step then costs one position instead of the context."""

    def __init__(self, max_len):
        self.max_len = max_len  # positions it has room for, at most block_size
        self.length = 0  # positions stored: the same for every row, as prompts are left-padded
        self.k = self.v = None  # each (B, nh, max_len, hs), allocated on first use in k's dtype

    def append(self, k, v):
        """Store k, v (B, nh, T, hs) of T new positions; return the keys and values of all positions so
        far, (B, nh, length, hs). Written into preallocated tensors: torch.cat would copy the whole
        cache at every step."""
        if self.k is None:
            B, nh, _, hs = k.shape
            self.k = k.new_empty(B, nh, self.max_len, hs)
            self.v = v.new_empty(B, nh, self.max_len, hs)
        start, self.length = self.length, self.length + k.size(2)
        self.k[:, :, start : self.length] = k
        self.v[:, :, start : self.length] = v
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


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
        self._init_weights()

    def _init_weights(self):
        # GPT-2's initialisation: N(0, 0.02) for weights, zero biases, LayerNorm at (1, 0).
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
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.0 if zero else module_std)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                torch.nn.init.normal_(module.weight, mean=0.0, std=std)

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
        cap = self.config.logit_softcap
        if not cap:
            return self.lm_head(x)
        # cap * tanh(logits / cap) keeps every logit within (-cap, cap), smoothly (Gemma 2; modded-nanogpt
        # uses 15): the loss cannot be pushed down by ever more confident logits. The division is done on
        # the input (the layer is linear) and tanh in place (the matmul's backward does not need its
        # output): on the (B, T, vocab) logits each elementwise pass is a large share of a small model's step.
        return self.lm_head(x / cap).tanh_() * cap

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

    def configure_optimizers(self, weight_decay, learning_rate, betas, eps, device_type, muon_lr=0.0,
                             muon_momentum=0.95, embed_lr=0.0, head_lr=0.0):  # fmt: skip
        """AdamW with weight decay on the matrices (matmul weights and embeddings) only.
        Biases and LayerNorm gains are 1-D: decaying them toward zero only hurts.

        The modern recipe splits the parameters into groups with LRs of their own: embed_lr for the
        embeddings, head_lr for an untied output layer (0: learning_rate), and, with muon_lr > 0,
        Muon for the blocks' matrices (then a MuonWithAdamW). Each group's "lr_scale" is its peak LR
        over learning_rate: the training loop sets lr = schedule * lr_scale (GPT-2's groups: 1.0)."""
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        embedding_names, head_name = ("transformer.wte.weight", "transformer.wpe.weight"), "lm_head.weight"
        embeddings = [p for name, p in params.items() if name in embedding_names]
        head = [p for name, p in params.items() if name == head_name]  # untied only: tied, it is listed as wte
        matrices = [p for name, p in params.items() if p.dim() >= 2 and name not in (*embedding_names, head_name)]
        no_decay = [p for p in params.values() if p.dim() < 2]

        def group(members, lr, decay=weight_decay):
            lr_scale = lr / learning_rate if learning_rate else 0.0
            return {"params": members, "weight_decay": decay, "lr": lr, "lr_scale": lr_scale}

        # GPT-2's recipe: every matrix in one group, as always (its AdamW state and checkpoints unchanged)
        if not (muon_lr or embed_lr or head_lr):
            adamw_groups = [group([p for p in params.values() if p.dim() >= 2], learning_rate)]
        else:
            adamw_groups = [group(embeddings, embed_lr or learning_rate), group(head, head_lr or learning_rate)]
            adamw_groups += [] if muon_lr else [group(matrices, learning_rate)]
        adamw_groups.append(group(no_decay, learning_rate, decay=0.0))
        # The fused CUDA kernel updates all parameters in a few launches instead of one per tensor.
        adamw = torch.optim.AdamW(adamw_groups, lr=learning_rate, betas=betas, eps=eps, fused=device_type == "cuda")
        if not muon_lr:
            return adamw
        # Muon (Jordan et al. 2024): momentum SGD whose update is orthogonalised by Newton-Schulz steps,
        # so that every direction of a matrix moves by the same amount. torch.optim.Muon scales the LR of
        # a (rows, cols) matrix by sqrt(max(1, rows / cols)). It is for 2-D hidden matrices only:
        # embeddings, the head and the biases stay with AdamW. c_attn's query, key and value weights are
        # one (3C, C) matrix here, orthogonalised together (modded-nanogpt does them one by one).
        muon = torch.optim.Muon([group(matrices, muon_lr)], lr=muon_lr, momentum=muon_momentum,
                                weight_decay=weight_decay)  # fmt: skip
        return MuonWithAdamW(muon, adamw)

    # ---- generation: one function for training samples, evaluations, sample.py and chat ----

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, **kwargs):
        """Append up to max_new_tokens tokens to idx (B, T) and return the (B, T + n) result.
        temperature=0 picks the most likely token; top_k keeps only the k most likely; a seeded
        torch.Generator makes it reproducible. kwargs go to generate_stream: top_p, eot (then n can
        be smaller: generation ends once every row has produced eot), use_cache=False to recompute."""
        steps = self.generate_stream(idx, max_new_tokens, temperature, top_k, generator=generator, **kwargs)
        return torch.cat([idx, *(next_id[:, None] for next_id in steps)], dim=1)

    def generate_stream(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                        eot=None, use_cache=True, kv_cache=None):  # fmt: skip
        """An iterator over the next token of every prompt, a (B,) tensor per step, each yielded as
        soon as it is sampled (for streaming text to a terminal or a browser).

        prompts: a (B, T) tensor, or B lists of token ids of any lengths (left-padded, see left_pad).
        Sampling: see next_token. eot: a row that produces it is finished and repeats it; the stream
        ends when every row is finished, or after max_new_tokens steps.
        use_cache=False recomputes the whole window at every step, as training's forward does: the
        slow path, kept to compare against.
        Beyond block_size (the model never saw a position further), the window slides: without the
        cache every step sees the last block_size tokens; with it, once the cache is full the newest
        block_size // 2 tokens are prefilled afresh (their positions all change) and it fills again,
        so a step sees between block_size // 2 and block_size tokens. Both agree up to block_size.
        kv_cache: one KVCache per layer, kept by the caller across calls (chat.py keeps it from one turn
        of a conversation to the next): it holds the keys and values of the first kv_cache[0].length
        tokens of the one prompt (fewer than all of them), which are not computed again, and is filled
        in place with the rest of the prompt and the tokens generated (all but the last one).
        Bad arguments raise UserError here, before the first token."""
        check_sampling_args(max_new_tokens, temperature, top_k, top_p)
        idx, real = left_pad(prompts, self.config.block_size, self.transformer.wte.weight.device)
        if kv_cache is not None and not (idx.size(0) == 1 and kv_cache[0].length < idx.size(1)):
            raise ValueError("a kv_cache passed in must hold fewer positions than the one prompt has")
        return self._generate_steps(idx, real, max_new_tokens, temperature, top_k, top_p, generator, eot, use_cache,
                                    kv_cache)  # fmt: skip

    def _generate_steps(self, idx, real, max_new_tokens, temperature, top_k, top_p, generator, eot, use_cache,
                        kv_cache):  # fmt: skip
        """generate_stream's loop. idx (B, T) token ids, real (B, T) True at real tokens (not padding)."""
        block_size = self.config.block_size
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)  # rows that produced eot
        new = idx.size(1) - kv_cache[0].length if kv_cache else 1  # the tokens at the end of idx not in the cache
        for _ in range(max_new_tokens):
            if not use_cache:
                window = slice(-block_size, None)  # the model sees at most block_size tokens
                logits = self.next_logits(idx[:, window], real[:, window])
            elif kv_cache is None or kv_cache[0].length == kv_cache[0].max_len:
                # the prompt, or after a slide the newest half of the window: all positions at once
                window = slice(-max(block_size // 2, 1), None) if kv_cache else slice(None)
                max_len = min(block_size, idx.size(1) + max_new_tokens)
                kv_cache = [KVCache(max_len) for _ in self.transformer.h]
                logits = self.next_logits(idx[:, window], real[:, window], kv_cache)
            else:
                # the one token sampled last (or the end of the prompt a caller's cache lacks); it attends
                # to the cached keys and itself
                keys = real[:, -(kv_cache[0].length + new) :]
                logits = self.next_logits(idx[:, -new:], keys, kv_cache)
            new = 1
            next_id = next_token(logits, temperature, top_k, top_p, generator)  # (B,)
            if eot is not None:
                next_id = next_id.masked_fill(done, eot)
                done |= next_id == eot
            yield next_id
            if done.all():
                return
            idx = torch.cat((idx, next_id[:, None]), dim=1)
            real = torch.cat((real, torch.ones_like(real[:, :1])), dim=1)

    @torch.no_grad()  # here, not on the generator above: that would fail noisily at exit mid-stream
    def next_logits(self, idx, real, kv_cache=None):
        """Logits (B, vocab_size), float32, of the token after idx (B, T): forward's computation, for
        generation. real (B, T_all) marks the real tokens among the T_all positions the new ones attend
        to: the cached ones, then idx (T_all = T without a cache). Each row's tokens get positions
        counted from its first real token, and only the last position goes through the output layer."""
        T_all, T = real.size(1), idx.size(1)
        pos = positions(real)[:, T_all - T :]  # (B, T)
        attn_mask = attention_mask(real, T)  # (B, 1, T, T_all)
        x, rotary = self.embed(idx, pos)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rotary, attn_mask, None if kv_cache is None else kv_cache[i])
        x = self.transformer.ln_f(x[:, -1])  # (B, C): only the last position predicts the next token
        # Slicing off the 47 padding columns does what forward's -inf does: they can never be sampled.
        return self.head(x)[:, : self.config.vocab_size].float()

    # ---- OpenAI's weights, through the Hugging Face transformers format ----

    @classmethod
    def from_pretrained(cls, name_or_dir):
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
        hf_cfg = hf_model.config
        if hf_cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"{name_or_dir}: activation {hf_cfg.activation_function!r} is not GPT-2's tanh GELU")
        config = GPTConfig(**{ours: getattr(hf_cfg, theirs) for ours, theirs in HF_CONFIG_NAMES.items()})
        model = cls(config)
        ours = model.state_dict()
        theirs = hf_model.state_dict()
        with torch.no_grad():
            for name, transposed in model._hf_names():
                src = theirs[name].t() if transposed else theirs[name]
                if name == "transformer.wte.weight":
                    ours[name][: config.vocab_size].copy_(src)
                    ours[name][config.vocab_size :].zero_()  # padding rows: never used, see forward
                else:
                    ours[name].copy_(src)
        return model

    def _hf_names(self):
        """(name, transposed) for every tensor of the Hugging Face GPT-2 layout. OpenAI's code used a
        `Conv1D` layer that stores matmul weights as (in, out); nn.Linear stores (out, in)."""
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        # lm_head.weight is the same tensor as wte (tied), so it is not listed separately
        return [(k, k.endswith(conv1d)) for k in self.state_dict() if k != "lm_head.weight"]

    def save_pretrained(self, out_dir):
        """Write this model as a Hugging Face GPT2LMHeadModel folder, for tools that expect that
        format (the EleutherAI evaluation harness, transformers' generate, ...)."""
        cfg = self.config
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
        ours = self.state_dict()
        theirs = hf_model.state_dict()
        with torch.no_grad():
            for name, transposed in self._hf_names():
                src = ours[name][: cfg.vocab_size] if name == "transformer.wte.weight" else ours[name]
                theirs[name].copy_(src.t() if transposed else src)
        hf_model.tie_weights()
        hf_model.save_pretrained(out_dir)


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for the rest, stepped as one optimizer: what the training
    loop, the fp16 GradScaler and the checkpoints use of torch.optim.Optimizer (param_groups, zero_grad,
    step, state_dict, load_state_dict). state_dict() is one optimizer's: parameters numbered on across
    the two, Muon's first, so a checkpoint stores and restores it like any other.

    Under DDP every process holds the same all-reduced gradient and so computes the same orthogonalised
    update: the weights stay identical with no extra communication. FSDP shards each matrix by rows,
    and Newton-Schulz needs whole matrices: train_gpt2.py refuses Muon with --parallel fsdp."""

    def __init__(self, muon, adamw):
        self.optimizers = (muon, adamw)

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self):
        state, groups, offset = {}, [], 0
        for optimizer in self.optimizers:
            own = optimizer.state_dict()
            state.update({offset + i: value for i, value in own["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in own["param_groups"]]
            offset += sum(len(g["params"]) for g in own["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        groups, offset = iter(state_dict["param_groups"]), 0
        for optimizer in self.optimizers:
            own = [next(groups) for _ in optimizer.param_groups]
            n = sum(len(g["params"]) for g in own)
            optimizer.load_state_dict({
                "state": {i - offset: v for i, v in state_dict["state"].items() if offset <= i < offset + n},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in own],
            })  # fmt: skip
            offset += n


# ---- generation helpers: padding, positions, masks, sampling ----


def left_pad(prompts, block_size, device):
    """Prompts of different lengths as one batch: (B, T) token ids and (B, T) bool, True at the real
    tokens. Padding goes on the left, so that every row's next token lands in the same column and one
    cache position per step serves the whole batch; the padding's id does not matter, as nothing
    attends to it (attention_mask) and it shifts no position (positions)."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    lengths = [len(p) for p in prompts]
    if not lengths or min(lengths) == 0:
        raise UserError("empty prompt: give at least one token to continue")
    T = max(lengths)
    if T > block_size:
        raise UserError(f"prompt of {T} tokens is longer than the model's block_size={block_size}: shorten it")
    idx = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    real = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=device)
    return idx, real


def positions(real):
    """(B, T) position of each token within its own row. GPT-2's position embeddings are learned and
    absolute, so a left-padded row must start at 0 at its first real token, as it would alone."""
    return (real.cumsum(dim=1) - 1).clamp(min=0)


def attention_mask(real, n_queries):
    """(B, 1, n_queries, T) bool, True where a query (the last n_queries of the T positions) may
    attend to a key: a real token at the query's position or before it, the same for every head.
    A padding query sees itself: a row of all False would make softmax return NaN."""
    T = real.size(1)
    query = torch.arange(T - n_queries, T, device=real.device)[:, None]  # (n_queries, 1)
    key = torch.arange(T, device=real.device)[None, :]  # (1, T)
    mask = ((key <= query) & real[:, None, :]) | (key == query)  # (B, n_queries, T)
    return mask[:, None]


def check_sampling_args(max_new_tokens, temperature, top_k, top_p):
    """UserError for settings that cannot generate; sample.py's flags have the same names."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens}: generate at least 1 token")
    if temperature < 0:
        raise UserError(f"temperature={temperature}: must be >= 0 (0 always picks the most likely token)")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k={top_k}: must be at least 1 (or unset, to keep every token)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p={top_p}: must be in (0, 1] (1 keeps every token)")


def next_token(logits, temperature, top_k=None, top_p=None, generator=None):
    """(B, V) logits -> (B,) token ids. temperature=0: the most likely token (greedy). Otherwise
    sample from softmax(logits / temperature), restricted by top_k and top_p (filter_logits)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf the logits (B, V) of the tokens that may not be sampled: all but the top_k most
    likely (ties with the k-th are kept), then all but the nucleus, the fewest most likely tokens whose
    probabilities add up to top_p (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration")."""
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        # a token stays if the more likely ones before it hold less than top_p: the first always stays
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back in vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
