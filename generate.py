"""
Generation: the KV cache, batches of prompts of different lengths, sampling filters, streaming. One
home for what training samples, sample.py, chat.py and the evaluations use.

    from generate import generate, generate_stream
    out = generate(model, idx, 50, top_k=50)            # (B, T + 50), sampled with a KV cache
    for next_id in generate_stream(model, prompts, 50): # (B,) per step, as soon as it is sampled
        ...

model.py's forward is the uncached path that training runs; here the same blocks run one new
position at a time over the cached keys and values of the earlier ones (docs/generation.md).
"""

import torch
import torch.nn.functional as F

from errors import UserError


class KVCache:
    """One layer's keys and values of the positions processed so far, kept for generation.

    Without a cache, each new token reruns the model over the whole context; yet the keys and values
    of the earlier positions do not change (attention is causal), so they can be kept: the prompt
    runs once (prefill), then each step feeds one token, whose query attends to the cached keys and
    whose own key and value are appended. A step then costs one position instead of the context."""

    def __init__(self, max_len, prefix=None):
        self.max_len = max_len  # token positions it has room for, at most block_size
        self.length = 0  # token positions stored: the same for every row, as prompts are left-padded
        self.prefix = prefix  # a prefix-tuned layer's prefix.Prefix: its P positions come first, else None
        self.k = self.v = None  # each (B, nh, P + max_len, hs), allocated on first use in k's dtype

    def append(self, k, v):
        """Store k, v (B, nh, T, hs) of T new positions; return the keys and values of all positions so
        far, (B, nh, P + length, hs), the prefix's P first. Written into preallocated tensors: torch.cat
        would copy the whole cache at every step."""
        P = 0 if self.prefix is None else len(self.prefix)
        if self.k is None:
            B, nh, _, hs = k.shape
            self.k = k.new_empty(B, nh, P + self.max_len, hs)
            self.v = v.new_empty(B, nh, P + self.max_len, hs)
            if P:
                self.k[:, :, :P], self.v[:, :, :P] = self.prefix.heads(B, k.dtype)
        start, self.length = self.length, self.length + k.size(2)
        self.k[:, :, P + start : P + self.length] = k
        self.v[:, :, P + start : P + self.length] = v
        return self.k[:, :, : P + self.length], self.v[:, :, : P + self.length]


def new_cache(model, max_len):
    """One empty KVCache per layer of model, with room for max_len token positions (and its prefix)."""
    return [KVCache(max_len, block.attn.prefix) for block in model.transformer.h]


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, **kwargs):
    """Append up to max_new_tokens tokens to idx (B, T) and return the (B, T + n) result.
    temperature=0 picks the most likely token; top_k keeps only the k most likely; a seeded
    torch.Generator makes it reproducible. kwargs go to generate_stream: top_p, eot (then n can
    be smaller: generation ends once every row has produced eot), use_cache=False to recompute."""
    steps = generate_stream(model, idx, max_new_tokens, temperature, top_k, generator=generator, **kwargs)
    return torch.cat([idx, *(next_id[:, None] for next_id in steps)], dim=1)


def generate_stream(
    model,
    prompts,
    max_new_tokens,
    temperature=1.0,
    top_k=None,
    top_p=None,
    generator=None,
    eot=None,
    use_cache=True,
    kv_cache=None,
):
    """An iterator over the next token of every prompt, a (B,) tensor per step, yielded as soon as it
    is sampled. prompts: a (B, T) tensor, or B lists of ids of any lengths (left_pad). eot: a row that
    produces it repeats it; the stream ends when every row has, or after max_new_tokens steps.
    use_cache=False recomputes the window at every step (the slow path, kept to compare against).
    kv_cache: one KVCache per layer that the caller keeps across calls (chat.py, from turn to turn),
    holding fewer positions than the one prompt. Past block_size the window slides: docs/generation.md.
    Bad arguments raise UserError before the first token."""
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    idx, real = left_pad(prompts, model.config.block_size, model.transformer.wte.weight.device)
    if kv_cache is not None and not (idx.size(0) == 1 and kv_cache[0].length < idx.size(1)):
        raise ValueError("a kv_cache passed in must hold fewer positions than the one prompt has")
    return generate_steps(
        model, idx, real, max_new_tokens, temperature, top_k, top_p, generator, eot, use_cache, kv_cache
    )


def generate_steps(model, idx, real, max_new_tokens, temperature, top_k, top_p, generator, eot, use_cache, kv_cache):
    """generate_stream's loop. idx (B, T) token ids, real (B, T) True at real tokens (not padding)."""
    block_size = model.config.block_size
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)  # rows that produced eot
    new = idx.size(1) - kv_cache[0].length if kv_cache else 1  # the tokens at the end of idx not in the cache
    for _ in range(max_new_tokens):
        if not use_cache:
            window = slice(-block_size, None)  # the model sees at most block_size tokens
            logits = next_logits(model, idx[:, window], real[:, window])
        elif kv_cache is None or kv_cache[0].length == kv_cache[0].max_len:
            # the prompt, or after a slide the newest half of the window: all positions at once
            window = slice(-max(block_size // 2, 1), None) if kv_cache else slice(None)
            max_len = min(block_size, idx.size(1) + max_new_tokens)
            kv_cache = new_cache(model, max_len)
            logits = next_logits(model, idx[:, window], real[:, window], kv_cache)
        else:
            # the one token sampled last (or the end of the prompt a caller's cache lacks); it attends
            # to the cached keys and itself
            keys = real[:, -(kv_cache[0].length + new) :]
            logits = next_logits(model, idx[:, -new:], keys, kv_cache)
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
def next_logits(model, idx, real, kv_cache=None):
    """Logits (B, vocab_size), float32, of the token after idx (B, T): forward's computation, for
    generation. real (B, T_all) marks the real tokens among the T_all positions the new ones attend
    to: the cached ones, then idx (T_all = T without a cache). Each row's tokens get positions
    counted from its first real token, and only the last position goes through the output layer."""
    T_all, T = real.size(1), idx.size(1)
    pos = positions(real)[:, T_all - T :]  # (B, T)
    attn_mask = attention_mask(real, T)  # (B, 1, T, T_all)
    x, rotary = model.embed(idx, pos)  # (B, T, C)
    for i, block in enumerate(model.transformer.h):
        x = block(x, rotary, attn_mask, None if kv_cache is None else kv_cache[i])
    x = model.transformer.ln_f(x[:, -1])  # (B, C): only the last position predicts the next token
    # Slicing off the 47 padding columns does what forward's -inf does: they can never be sampled.
    return model.head(x)[:, : model.config.vocab_size].float()


# ---- padding, positions, masks, sampling ----


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
