"""
How much memory training takes on each GPU (train_gpt2.py --plan): weights, gradients, AdamW's
state, activations and logits, under DDP or FSDP, with or without activation checkpointing, counted
from the shapes, and the largest batch size that fits.

    report, problem = plan_report(GPTConfig(), 64, 1024, 2**19, 8, torch.bfloat16, 40, ("ddp", False))
"""

import functools
from dataclasses import asdict

import torch

from errors import UserError
from model import GPT, GPT2_VOCAB_SIZE, GPTConfig
from tokenizer import GPT2, get_tokenizer

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def activation_bytes(config, batch_size, seq_len, compute_bytes=4, residual_bytes=4, checkpointing=False):
    """(saved, recomputed): bytes of the tensors one training forward saves for its backward (weights
    not included), and of those that backward's recomputation of one block adds with checkpointing.

    Counted from the shapes, per token. What one Block saves, C = n_embd (r: bytes of the residual
    stream, float32 under autocast; a: bytes of the compute dtype, 2 for bf16):
        ln_1's and ln_2's inputs (the residual stream)           2 x rC
        their means and 1/std (float32)                          4 x 4
        c_attn's input, its output q, k, v (kept by attention)   (1 + 3) x aC
        attention's output y, its log-sum-exp (float32)          aC + 4 x n_head   (y's transpose is
                                                                 already contiguous: no copy for c_proj)
        c_fc's input, its output (GELU's input), GELU's output   (1 + 4 + 4) x aC
    = 2rC + 14aC + 4 n_head + 16: 16C values in float32. The rest of the model saves the token ids and
    the targets (int64), ln_f's input and stats, lm_head's input and the float32 log-softmax of the
    logits: 8 + 8 + rC + 8 + aC + 4V, V the padded vocabulary. With activation checkpointing a block
    saves only its input (rC), and backward recomputes the rest one block at a time.
    tests/test_fsdp.py checks `saved` against an exact count (saved_tensors_hooks)."""
    C, V, r, a = config.n_embd, config.padded_vocab_size, residual_bytes, compute_bytes
    block = 2 * r * C + 16 + 14 * a * C + 4 * config.n_head
    rest = 8 + 8 + r * C + 8 + a * C + 4 * V
    tokens = batch_size * seq_len
    if checkpointing:
        return tokens * (config.n_layer * r * C + rest), tokens * block
    return tokens * (config.n_layer * block + rest), 0


def parameter_counts(config):
    """(all parameters, those of one Block, those outside the blocks), from the shapes alone."""
    return _parameter_counts(**asdict(config))


@functools.lru_cache  # --plan asks for every batch size
def _parameter_counts(**config):
    with torch.device("meta"):  # no memory, no initialisation
        model = GPT(GPTConfig(**config))
    per_block = sum(p.numel() for p in model.transformer.h[0].parameters())
    return model.num_params(), per_block, model.num_params() - config["n_layer"] * per_block


def memory_plan(
    config,
    batch_size,
    seq_len,
    world_size,
    dtype,
    parallel,
    checkpointing,
    reshard_after_forward=True,
    grad_accum_steps=1,
):
    """{what: bytes} on each GPU for one training step. Adds everything as if it were alive at once,
    so it is an upper bound; allocator fragmentation and the CUDA context are not in it."""
    P, P_block, P_root = parameter_counts(config)
    a, N = DTYPE_BYTES[dtype], world_size
    if parallel == "fsdp" and N > 1:
        # 1/N of the float32 weights, and the copies gathered in the compute dtype: the root's for the
        # whole step, plus two blocks (one computing, the next one being gathered), or all of them
        # from forward to backward with --reshard_after_forward 0
        gathered = P_root + (2 * P_block if reshard_after_forward else config.n_layer * P_block)
        weights = 4 * P / N + a * gathered
        # 1/N of the float32 gradients, and a block's whole gradients before their reduce-scatter.
        # Accumulation skips the reduce-scatter until the last micro-step: FSDP then keeps the
        # whole float32 gradients meanwhile, 4 bytes per parameter.
        gradients = 4 * P / N + (4 * P if grad_accum_steps > 1 else (a + 4) * P_block)
        optimizer = 8 * P / N
        residual = a  # the embeddings' weights are bf16 copies too, so the residual stream is bf16
    else:
        # float32 weights, and autocast's bf16/fp16 copies of them, kept from forward to backward
        weights = 4 * P + (a * P if a < 4 else 0)
        # float32 gradients, and DDP's buckets, a second copy of them it all-reduces
        gradients = 4 * P * (2 if N > 1 else 1)
        optimizer = 8 * P  # AdamW's two moments, float32
        residual = 4
    return {
        "weights": weights,
        "gradients": gradients,
        "optimizer (AdamW)": optimizer,
        "activations": sum(activation_bytes(config, batch_size, seq_len, a, residual, checkpointing)),
        # the logits, kept by train_step until backward, then their two float32 gradients at its start
        "logits": batch_size * seq_len * config.padded_vocab_size * (a + 8),
    }


# What --plan compares: (--parallel, --activation_checkpointing)
PLAN_COLUMNS = [("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True)]
# Kept back from the GPU's memory for the CUDA context, the caching allocator's fragmentation and the
# temporaries not counted (a rule of thumb, not measured here: this machine has no GPU)
GPU_RESERVE = 0.10


def plan_flags(parallel, checkpointing):
    return f"--parallel {parallel} --activation_checkpointing {int(checkpointing)}"


def plan_report(
    config, batch_size, seq_len, total_batch_size, world_size, dtype, gpu_gib, chosen, reshard_after_forward=True
):
    """(text, problem): what train_gpt2.py --plan prints, GiB per GPU of each part of memory_plan for
    ddp and fsdp with and without activation checkpointing and the largest --batch_size that fits in
    gpu_gib GiB (0: unknown); and, if chosen (the flags' parallel and checkpointing) does not fit
    even batch_size 1, what to do instead (else None)."""
    usable = gpu_gib * 2**30 * (1 - GPU_RESERVE)

    def plan_at(parallel, checkpointing, B, N=world_size):
        accumulating = total_batch_size > B * seq_len * N
        return memory_plan(
            config,
            B,
            seq_len,
            N,
            dtype,
            parallel,
            checkpointing,
            reshard_after_forward,
            grad_accum_steps=2 if accumulating else 1,
        )

    def largest(parallel, checkpointing, N=world_size):
        """The largest batch_size that fits, the largest of those that divides total_batch_size."""
        limit = max(1, total_batch_size // (seq_len * N))  # more would be more than one step's tokens
        fits = [B for B in range(1, limit + 1) if sum(plan_at(parallel, checkpointing, B, N).values()) <= usable]
        divides = [B for B in fits if total_batch_size % (B * seq_len * N) == 0]
        return max(fits, default=0), max(divides, default=0)

    names = [p + (" +ckpt" if c else "") for p, c in PLAN_COLUMNS]
    plans = [plan_at(p, c, batch_size) for p, c in PLAN_COLUMNS]
    P = parameter_counts(config)[0]
    lines = [
        f"memory per GPU: {P / 1e6:.1f}M parameters, batch_size {batch_size} x seq_len {seq_len}, "
        f"{str(dtype).removeprefix('torch.')}, {world_size} process(es)"
        + (f", {gpu_gib:g} GiB GPUs" if gpu_gib else ""),
        f"{'GiB':<20}" + "".join(f"{name:>12}" for name in names),
    ]
    for part in plans[0]:
        lines.append(f"{part:<20}" + "".join(f"{plan[part] / 2**30:>12.2f}" for plan in plans))
    lines.append(f"{'total':<20}" + "".join(f"{sum(plan.values()) / 2**30:>12.2f}" for plan in plans))
    if not config.is_gpt2:
        lines.append(
            "  (counted for GPT-2's layers and AdamW's two moments: the modern recipe's norms, rotary "
            "embeddings and soft cap save other tensors, Muon keeps one buffer: not exact)"
        )
    if not gpu_gib:
        lines.append("the largest batch_size that fits: pass --gpu_memory GiB")
        return "\n".join(lines), None
    fits = [largest(p, c) for p, c in PLAN_COLUMNS]
    lines.append(f"{'largest batch_size':<20}" + "".join(f"{f'{a} ({d})':>12}" for a, d in fits))
    lines.append(
        f"  (in brackets: the largest that divides --total_batch_size {total_batch_size}; "
        f"{GPU_RESERVE:.0%} of the GPU kept back)"
    )
    if fits[PLAN_COLUMNS.index(chosen)][0] == 0:
        ways = [f"{plan_flags(*column)} (fits batch_size {a})" for column, (a, _) in zip(PLAN_COLUMNS, fits) if a]
        if not ways:  # then sharded over more processes
            more = next((N for N in (2**k for k in range(1, 11)) if N > world_size and largest("fsdp", True, N)[0]), 0)
            if more:
                fit = largest("fsdp", True, more)[0]
                ways.append(f"{plan_flags('fsdp', True)} over {more} processes (fits batch_size {fit})")
        ways += ["a shorter --seq_len", "a smaller model"]
        need = sum(plan_at(*chosen, 1).values()) / 2**30
        problem = (
            f"{plan_flags(*chosen)} needs {need:.2f} GiB per GPU at batch_size 1, more than a {gpu_gib:g} GiB GPU "
            f"holds ({1 - GPU_RESERVE:.0%} of it): try {'; or '.join(ways)}"
        )
        return "\n".join(lines), problem
    return "\n".join(lines), None


def planned_vocab_size(tokenizer_name):
    """The vocabulary --plan counts (the embedding's size is what matters): GPT-2's for gpt2 and auto
    (the plan reads no shards), else the trained tokenizer's."""
    return GPT2_VOCAB_SIZE if tokenizer_name in ("auto", GPT2) else get_tokenizer(tokenizer_name).vocab_size


def print_plan(cfg, model_config, world_size):
    """train_gpt2.py --plan: plan_report for these flags, planned for GPUs (--dtype auto means bf16 here)."""
    gpu_memory = cfg.gpu_memory or (
        torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0
    )
    dtype = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if cfg.dtype not in dtype:
        raise UserError(f"--dtype {cfg.dtype}: choose auto, bfloat16, float16, float32")
    report, problem = plan_report(
        model_config,
        cfg.batch_size,
        cfg.seq_len,
        cfg.total_batch_size,
        world_size,
        dtype[cfg.dtype],
        gpu_memory,
        (cfg.parallel, cfg.activation_checkpointing),
        cfg.reshard_after_forward,
    )
    print(report)
    if problem:
        raise UserError(problem)
