"""
How much memory training takes on each GPU (train_gpt2.py --plan): weights, gradients, the
optimizer's state (AdamW's or --optimizer's), activations and logits, under DDP or FSDP, with or
without activation checkpointing and CPU offload, counted from the shapes, the largest batch size
that fits, and a verdict: whether the flags fit, and if not, the one command line that does.
Offloaded, the host memory it takes and the PCIe traffic it adds (planned: no GPU here to measure it).

    print(plan_report(GPTConfig(), 64, 1024, 2**19, 8, torch.bfloat16, 40, ("ddp", False, False)))
"""

import functools
import shlex
from dataclasses import asdict, fields

import torch

from device import setup_precision
from errors import UserError
from model import GPT, GPT2_VOCAB_SIZE, GPTConfig
from optim import parameter_kinds, state_floats
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
    """(all parameters, those of one Block, those outside the blocks, those Muon takes: the blocks'
    matrices), from the shapes alone."""
    return _parameter_counts(**asdict(config))


@functools.lru_cache  # --plan asks for every batch size
def _parameter_counts(**config):
    with torch.device("meta"):  # no memory, no initialisation
        model = GPT(GPTConfig(**config))
    per_block = sum(p.numel() for p in model.transformer.h[0].parameters())
    matrices = sum(p.numel() for p in parameter_kinds(model.named_parameters())[2])
    return model.num_params(), per_block, model.num_params() - config["n_layer"] * per_block, matrices


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
    cpu_offload=False,
    optimizer="adamw",
):
    """{what: bytes} on each GPU for one training step. Adds everything as if it were alive at once,
    so it is an upper bound; allocator fragmentation and the CUDA context are not in it. With
    cpu_offload (FSDP only) the shards live in host memory instead: host_bytes counts them.
    optimizer: the --optimizer whose state is counted (optim.STATE_FLOATS)."""
    P, P_block, P_root, P_matrices = parameter_counts(config)
    state = 4 * state_floats(optimizer, P, P_matrices)  # float32
    a, N = DTYPE_BYTES[dtype], world_size
    if parallel == "fsdp" and cpu_offload:  # on one process too: a group of one
        # the same gathered copies, and the float32 shards of the units being gathered, copied in from
        # the host to be all-gathered; the shards themselves stay in host memory
        gathered = P_root + (2 * P_block if reshard_after_forward else config.n_layer * P_block)
        weights = a * gathered + 4 * gathered / N
        # a block's whole gradients before their reduce-scatter, and its shard of them before the copy
        # to the host: every micro-step (train_step), so accumulation keeps nothing whole on the GPU
        gradients = (a + 4) * P_block + 4 * P_block / N
        optimizer_state = 0  # the optimizer steps on the CPU
        residual = a
    elif parallel == "fsdp" and N > 1:
        # 1/N of the float32 weights, and the copies gathered in the compute dtype: the root's for the
        # whole step, plus two blocks (one computing, the next one being gathered), or all of them
        # from forward to backward with --reshard_after_forward 0
        gathered = P_root + (2 * P_block if reshard_after_forward else config.n_layer * P_block)
        weights = 4 * P / N + a * gathered
        # 1/N of the float32 gradients, and a block's whole gradients before their reduce-scatter.
        # Accumulation skips the reduce-scatter until the last micro-step: FSDP then keeps the
        # whole float32 gradients meanwhile, 4 bytes per parameter.
        gradients = 4 * P / N + (4 * P if grad_accum_steps > 1 else (a + 4) * P_block)
        optimizer_state = state / N
        residual = a  # the embeddings' weights are bf16 copies too, so the residual stream is bf16
    else:
        # float32 weights, and autocast's bf16/fp16 copies of them, kept from forward to backward
        weights = 4 * P + (a * P if a < 4 else 0)
        # float32 gradients, and DDP's buckets, a second copy of them it all-reduces
        gradients = 4 * P * (2 if N > 1 else 1)
        optimizer_state = state
        residual = 4
    return {
        "weights": weights,
        "gradients": gradients,
        f"optimizer ({optimizer})": optimizer_state,
        "activations": sum(activation_bytes(config, batch_size, seq_len, a, residual, checkpointing)),
        # the logits, kept by train_step until backward, then their two float32 gradients at its start
        "logits": batch_size * seq_len * config.padded_vocab_size * (a + 8),
    }


def host_bytes(config, world_size, optimizer="adamw"):
    """Host memory of each process with --cpu_offload 1: the float32 shards of the weights, of the
    gradients and of the optimizer's state (AdamW's two moments: 16 bytes per parameter in all), over
    the processes (pinned with a GPU)."""
    P, _, _, matrices = parameter_counts(config)
    return (8 * P + 4 * state_floats(optimizer, P, matrices)) / world_size


def offload_traffic(config, world_size, reshard_after_forward=True):
    """Bytes each process copies over PCIe per micro-step with --cpu_offload 1: its float32 shard of
    every unit's weights to the GPU at each gather (twice, forward and backward, when blocks are
    resharded after forward; the root's once), and its shard of the float32 gradients back."""
    P, P_block, P_root, _ = parameter_counts(config)
    gathers = P_root + config.n_layer * P_block * (2 if reshard_after_forward else 1)
    return 4 * (gathers + P) / world_size


# A PCIe 4.0 x16 link carries ~25 GB/s each way in practice (32 GB/s raw), PCIe 5.0 ~50: what
# --plan's offload line divides by. A rule of thumb: this machine has no GPU to measure one.
PCIE_BYTES_PER_S = 25e9

WIDTH = 16  # characters of a column of the table, "fsdp +ckpt +off" included

# What --plan compares: (--parallel, --activation_checkpointing, --cpu_offload), the cheaper ways first
PLAN_COLUMNS = [
    ("ddp", False, False),
    ("ddp", True, False),
    ("fsdp", False, False),
    ("fsdp", True, False),
    ("fsdp", False, True),
    ("fsdp", True, True),
]
# Kept back from the GPU's memory for the CUDA context, the caching allocator's fragmentation and the
# temporaries not counted (a rule of thumb, not measured here: this machine has no GPU)
GPU_RESERVE = 0.10
# --plan's own flags, left out of the command it advises
PLAN_FLAGS = ("plan", "gpu_memory", "nproc", "parallel", "activation_checkpointing", "cpu_offload", "batch_size")


def plan_flags(parallel, checkpointing, offload):
    return f"--parallel {parallel} --activation_checkpointing {int(checkpointing)}" + (
        " --cpu_offload 1" if offload else ""
    )


def launcher(nproc):
    """How to start nproc training processes: python alone, torchrun on one machine of up to 8 GPUs,
    or torchrun on each of several machines (the README's table of launches)."""
    if nproc == 1:
        return "python"
    if nproc <= 8:
        return f"torchrun --standalone --nproc_per_node={nproc}"
    nodes, per_node = (nproc // 8, 8) if nproc % 8 == 0 else ("<machines>", f"<{nproc} / machines>")
    return (
        f"torchrun --nnodes={nodes} --node_rank=<this machine's, from 0> --nproc_per_node={per_node} "
        "--rdzv_backend=c10d --rdzv_endpoint=<host of machine 0>:29500 --rdzv_id=gpt2"
    )


def run_command(flags, parallel, checkpointing, offload, batch_size, nproc):
    """The command line that trains with flags (the others given to --plan) and this way of fitting."""
    words = [
        launcher(nproc),
        "train_gpt2.py",
        *flags,
        plan_flags(parallel, checkpointing, offload),
        f"--batch_size {batch_size}",
    ]
    return " ".join(words)


def plan_report(
    config,
    batch_size,
    seq_len,
    total_batch_size,
    world_size,
    dtype,
    gpu_gib,
    chosen,
    reshard_after_forward=True,
    flags=(),
    dtype_name=None,
    optimizer="adamw",
):
    """What train_gpt2.py --plan prints: GiB per GPU of each part of memory_plan for ddp and fsdp with
    and without activation checkpointing, the largest --batch_size of each that fits in gpu_gib GiB
    (0: unknown), and the verdict on chosen (the flags' parallel, checkpointing and offload) at
    batch_size: it fits or not, and the command line that runs (flags: the other flags, for that
    command). Offload is slow (every step crosses PCIe, the optimizer runs on the CPU): it is advised only
    where nothing else fits on these GPUs.

    A batch size is advised only if it divides the step (total_batch_size = batch_size x seq_len x
    world_size x accumulation steps): train_gpt2.py refuses any other."""
    usable = gpu_gib * 2**30 * (1 - GPU_RESERVE)

    def plan_at(parallel, checkpointing, offload, B, N=world_size):
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
            cpu_offload=offload,
            optimizer=optimizer,
        )

    def gib(parallel, checkpointing, offload, B, N=world_size):
        return sum(plan_at(parallel, checkpointing, offload, B, N).values()) / 2**30

    def largest(parallel, checkpointing, offload, N=world_size):
        """The largest batch_size that fits and divides total_batch_size into whole micro-steps (0: none)."""
        micro_steps = total_batch_size // (seq_len * N)  # at batch_size 1; more would be more than a step
        sizes = [B for B in range(1, micro_steps + 1) if total_batch_size % (B * seq_len * N) == 0]
        return max((B for B in sizes if gib(parallel, checkpointing, offload, B, N) * 2**30 <= usable), default=0)

    names = [p + (" +ckpt" if c else "") + (" +off" if o else "") for p, c, o in PLAN_COLUMNS]
    plans = [plan_at(*way, batch_size) for way in PLAN_COLUMNS]
    P = parameter_counts(config)[0]
    lines = [
        f"memory per GPU: {P / 1e6:.1f}M parameters, batch_size {batch_size} x seq_len {seq_len}, "
        f"{world_size} process(es)"
        + (f", {gpu_gib:g} GiB GPUs" if gpu_gib else "")
        + f"; {dtype_name or str(dtype).removeprefix('torch.')}",
        f"{'GiB':<20}" + "".join(f"{name:>{WIDTH}}" for name in names),
    ]
    for part in plans[0]:
        lines.append(f"{part:<20}" + "".join(f"{plan[part] / 2**30:>{WIDTH}.2f}" for plan in plans))
    lines.append(f"{'total':<20}" + "".join(f"{sum(plan.values()) / 2**30:>{WIDTH}.2f}" for plan in plans))
    lines += offload_lines(config, world_size, reshard_after_forward, optimizer)
    if not config.is_gpt2:
        lines.append(
            "  (counted for GPT-2's layers: the modern recipe's norms, rotary embeddings and soft cap save "
            "other tensors: not exact)"
        )
    if not gpu_gib:
        lines.append("verdict: none without the GPUs' memory (no GPU here): pass --gpu_memory GiB")
        return "\n".join(lines)
    fits = [largest(*way) for way in PLAN_COLUMNS]
    lines.append(f"{'largest batch_size':<20}" + "".join(f"{B:>{WIDTH}}" for B in fits))
    lines.append(
        f"  (that divides --total_batch_size {total_batch_size} into whole micro-steps; "
        f"{GPU_RESERVE:.0%} of the GPU kept back)"
    )
    holds = f"the {usable / 2**30:.2f} GiB usable of a {gpu_gib:g} GiB GPU"
    need = gib(*chosen, batch_size)
    if need * 2**30 <= usable:
        more = fits[PLAN_COLUMNS.index(chosen)]
        lines.append(
            f"verdict: fits, {need:.2f} GiB per GPU of {holds}"
            + (f" (batch_size {more} fits too: fewer micro-steps)" if more > batch_size else "")
            + "; run:"
        )
        lines.append(f"  {run_command(flags, *chosen, batch_size, world_size)}")
        return "\n".join(lines)
    lines.append(
        f"verdict: does not fit, {plan_flags(*chosen)} at batch_size {batch_size} needs {need:.2f} GiB per GPU, "
        f"more than {holds}"
    )
    way, N = chosen, world_size
    # Muon's Newton-Schulz needs whole matrices: train_gpt2.py refuses it with FSDP over several processes
    sharded = optimizer != "muon"
    runnable = [(way, B) for way, B in zip(PLAN_COLUMNS, fits) if B and (sharded or way[0] == "ddp" or N == 1)]
    in_gpu = [(way, B) for way, B in runnable if not way[2]]
    offloaded = [(way, B) for way, B in runnable if way[2]]
    if fits[PLAN_COLUMNS.index(chosen)]:
        B = fits[PLAN_COLUMNS.index(chosen)]
        advice = f"batch_size {B} (gradient accumulation keeps the {total_batch_size}-token step) fits"
    elif in_gpu or offloaded:
        # the way that fits the largest batch_size (the fewest micro-steps), the cheapest on ties;
        # offload, the slowest, only where nothing else fits
        way, B = max(in_gpu or offloaded, key=lambda column: column[1])
        advice = f"{plan_flags(*way)} fits batch_size {B}"
    elif not sharded:
        lines.append(
            "  nothing else fits with Muon, which FSDP cannot shard: try --optimizer adamw, or a smaller --model"
        )
        return "\n".join(lines)
    else:  # sharded over more processes
        way = ("fsdp", True, False)
        N = next((N for N in (2**k for k in range(1, 11)) if N > world_size and largest(*way, N)), 0)
        if not N:
            lines.append("  nothing fits on up to 1024 GPUs: try a shorter --seq_len or a smaller --model")
            return "\n".join(lines)
        B = largest(*way, N)
        advice = f"nothing fits on {world_size} GPU(s); {plan_flags(*way)} over {N} GPUs fits batch_size {B}"
    lines.append(f"  {advice}, {gib(*way, B, N):.2f} GiB per GPU; run:")
    lines.append(f"  {run_command(flags, *way, B, N)}")
    return "\n".join(lines)


def offload_lines(config, world_size, reshard_after_forward, optimizer):
    """What the +off columns do not show: the host memory they take and the PCIe traffic they add."""
    traffic = offload_traffic(config, world_size, reshard_after_forward)
    host = host_bytes(config, world_size, optimizer)
    per_machine = min(world_size, 8)
    return [
        f"  +off: the shards in host memory, {host / 2**30:.2f} GiB per process ({host * per_machine / 2**30:.2f} "
        f"per machine of {per_machine}); {traffic / 1e9:.2f} GB over PCIe per micro-step and process, "
        f"~{traffic / PCIE_BYTES_PER_S * 1e3:.0f} ms at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s where not hidden behind "
        "compute (planned, not measured); the optimizer steps on the CPU"
    ]


def command_flags(cfg):
    """The flags given on the command line (cfg.sources), but --plan's own, as command-line text."""
    words = []
    for f in fields(cfg):
        if cfg.sources.get(f.name) != "flag" or f.name in PLAN_FLAGS:
            continue
        value = getattr(cfg, f.name)
        values = value if isinstance(value, list) else [int(value) if isinstance(value, bool) else value]
        words += [f"--{f.name}", *(shlex.quote(str(v)) for v in values)]
    return words


def planned_dtype(requested):
    """(dtype, its name in the header): what training would compute in. --dtype auto is what
    device.setup_precision picks on this machine's GPU; without one, bf16, as fp16 takes the same bytes."""
    if requested == "auto" and torch.cuda.is_available():
        dtype = setup_precision("auto", "cuda").dtype
        return dtype, f"{str(dtype).removeprefix('torch.')} (--dtype auto on this GPU)"
    if requested == "auto":
        return (
            torch.bfloat16,
            "bf16, or fp16 on GPUs without bf16 (V100, T4): the same bytes (--dtype auto, no GPU here)",
        )
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if requested not in dtypes:
        raise UserError(f"--dtype {requested}: choose auto, bfloat16, float16, float32")
    return dtypes[requested], requested


def planned_vocab_size(tokenizer_name):
    """The vocabulary --plan counts (the embedding's size is what matters): GPT-2's for gpt2 and auto
    (the plan reads no shards), else the trained tokenizer's."""
    return GPT2_VOCAB_SIZE if tokenizer_name in ("auto", GPT2) else get_tokenizer(tokenizer_name).vocab_size


def print_plan(cfg, model_config, world_size):
    """train_gpt2.py --plan: plan_report for these flags. It answers (exit 0) whether or not they fit."""
    gpu_memory = cfg.gpu_memory or (
        torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0
    )
    dtype, dtype_name = planned_dtype(cfg.dtype)
    report = plan_report(
        model_config,
        cfg.batch_size,
        cfg.seq_len,
        cfg.total_batch_size,
        world_size,
        dtype,
        gpu_memory,
        (cfg.parallel, cfg.activation_checkpointing, cfg.cpu_offload),
        cfg.reshard_after_forward,
        command_flags(cfg),
        dtype_name,
        cfg.optimizer,
    )
    print(report)


# ---- finetune.py --plan: one process (or DDP), a frozen base ---------------------------------------
# Bytes per number of the blocks' frozen matrices as quant.py stores them: the code, and a float32
# absmax per block of 64 numbers.
BASE_BYTES = {"none": 4, "int8": 1 + 4 / 64, "nf4": 0.5 + 4 / 64}


def finetune_memory(config, batch_size, seq_len, dtype, trainable, base_quant, optimizer="adamw"):
    """{what: bytes} of one fine-tuning step on each GPU (one process, or DDP: the same per GPU but for
    DDP's second copy of the gradients, tiny for adapters). The base's weights, with the blocks'
    matrices in base_quant; gradients and the optimizer's state (optim.STATE_FLOATS) only for the
    `trainable` parameters (adapters or prefixes: all P of them for full fine-tuning, which is
    memory_plan's DDP column).
    Activations as in pretraining: backward still needs every layer's input to pass gradients on."""
    P, a = parameter_counts(config)[0], DTYPE_BYTES[dtype]
    quantized = 12 * config.n_embd**2 * config.n_layer if base_quant != "none" else 0  # c_attn, c_proj, c_fc, c_proj
    adapters = trainable if trainable < P else 0  # full fine-tuning trains the weights themselves
    # autocast's bf16/fp16 copies of the float weights live from forward to backward; a quantized layer
    # is dequantized one layer at a time instead (quant.QuantizedMatmul), not counted
    copies = a * (P - quantized) if a < 4 else 0
    return {
        "base weights": 4 * (P - quantized) + BASE_BYTES[base_quant] * quantized + copies,
        "trained weights": 4 * adapters,
        "gradients": 4 * trainable,
        f"optimizer ({optimizer})": 4 * state_floats(optimizer, trainable, 0),
        "activations": sum(activation_bytes(config, batch_size, seq_len, a, 4)),
        "logits": batch_size * seq_len * config.padded_vocab_size * (a + 8),
    }


def finetune_report(config, batch_size, seq_len, dtype, trainable, base_quant, gpu_gib, dtype_name, optimizer="adamw"):
    """What finetune.py --plan prints: GiB of each part of finetune_memory with the base in float32,
    int8 and nf4 (the same adapters), and whether the flags' --base_quant fits in gpu_gib GiB."""
    plans = {q: finetune_memory(config, batch_size, seq_len, dtype, trainable, q, optimizer) for q in BASE_BYTES}
    lines = [
        f"memory per GPU: {parameter_counts(config)[0] / 1e6:.1f}M parameters, {trainable:,} trained, "
        f"batch_size {batch_size} x seq_len {seq_len}; {dtype_name}",
        f"{'GiB, base in':<20}" + "".join(f"{quant:>12}" for quant in plans),
    ]
    for part in plans["none"]:
        lines.append(f"{part:<20}" + "".join(f"{plan[part] / 2**30:>12.3f}" for plan in plans.values()))
    lines.append(f"{'total':<20}" + "".join(f"{sum(plan.values()) / 2**30:>12.3f}" for plan in plans.values()))
    need = sum(plans[base_quant].values()) / 2**30
    if not gpu_gib:
        lines.append(f"--base_quant {base_quant}: {need:.3f} GiB; pass --gpu_memory GiB for a verdict")
    else:
        usable = gpu_gib * (1 - GPU_RESERVE)
        verdict = "fits" if need <= usable else "does not fit"
        lines.append(f"verdict: --base_quant {base_quant} {verdict}, {need:.3f} GiB of {usable:.2f} GiB usable")
    return "\n".join(lines)
