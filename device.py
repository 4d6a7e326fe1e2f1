"""
Where training runs: processes, device, precision, compilation, the hardware's peak speed, how the
model is spread over processes (DDP or FSDP) and how much memory that takes (train_gpt2.py --plan).

    from device import setup_distributed, setup_precision, compile_model, peak_flops
    dist_info = setup_distributed("auto")        # reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE
    precision = setup_precision("auto", dist_info.device_type)
    with precision.autocast():
        logits, loss = model(x, y)

Kept out of `train_gpt2.py` so the training loop reads the same on a laptop CPU and on 8 GPUs.
"""

import copy
import ctypes
import functools
import os
import sys
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from errors import UserError
from model import GPT, GPTConfig

# Peak dense bf16/fp16 tensor-core FLOPS by (part of) the name torch.cuda.get_device_name returns,
# from NVIDIA's datasheets. First match wins, so the specific names come before the generic ones.
PEAK_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("V100-PCIE", 112e12),  # fp16
    ("V100", 125e12),  # SXM2, fp16
]


# The --device and --dtype flags of every script (train_gpt2.py, the evaluations, sample.py, ...).
DEVICE_HELP = "auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps"
DTYPE_HELP = "auto (bf16 on Ampere+ GPUs, fp16 + loss scaling before, fp32 on CPU), bfloat16, float16, float32"


def add_device_args(parser, dtype="auto"):
    """--device and --dtype, as train_gpt2.py has them; `dtype` is this script's default."""
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    parser.add_argument("--dtype", default=dtype, help=f"{DTYPE_HELP} (default: {dtype})")


@dataclass
class DistInfo:
    rank: int  # this process among all processes
    local_rank: int  # this process among those on this node: picks the GPU
    world_size: int
    device: str  # "cuda:3", "mps", "cpu"

    @property
    def device_type(self):
        return self.device.split(":")[0]

    @property
    def is_master(self):
        """Rank 0 alone logs, writes checkpoints and samples text."""
        return self.rank == 0

    @classmethod
    def single(cls, device="cpu"):
        """One process on `device`: what an evaluation called from a script or a test runs as."""
        return cls(rank=0, local_rank=0, world_size=1, device=device)


def pick_device(requested, local_rank):
    """"auto" picks cuda > mps > cpu; an explicit device that is not there is an error, not a fallback."""
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {requested}: PyTorch sees no CUDA GPU (torch {torch.__version__}). Check nvidia-smi and "
                "CUDA_VISIBLE_DEVICES, install a CUDA build of torch, or pass --device cpu"
            )
        if requested == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise UserError(
                    f"process with LOCAL_RANK={local_rank} has no GPU: only {torch.cuda.device_count()} are visible; "
                    "pass --nproc_per_node at most the number of GPUs"
                )
            requested = f"cuda:{local_rank}"  # one GPU per process
    elif requested == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: the Apple MPS backend is not available here; pass --device cpu")
    elif requested not in ("cpu", "mps"):
        raise UserError(f"--device {requested}: choose auto, cpu, cuda, cuda:N or mps")
    return requested


def keep_freed_memory():
    """On Linux, make the C library keep freed memory for reuse instead of handing it back to the OS.

    A CPU training step allocates and frees tensors of tens of MB: the (B*T, 50304) logits, their
    softmax and their gradient. glibc's malloc maps such blocks from the OS and unmaps them on free,
    so every step page-faults them in again, zero-filled by the kernel: for the demo model that took
    more time than the matmuls (measured in docs/benchmarks.md, "Training step"). Raising the two
    thresholds of mallopt(3) to 1 GiB serves those blocks from the process's heap again and again.
    Elsewhere (macOS, Windows, musl) this does nothing. Returns whether the setting took effect."""
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library the process already runs on
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, 2**30)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))


def setup_distributed(requested_device):
    """One process (`python train_gpt2.py`) or one of many (`torchrun`, which sets the env variables)."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(requested_device, local_rank)
    if device.startswith("cuda"):
        # the default device of everything that takes none (NCCL, capability and RNG queries)
        torch.cuda.set_device(device)
    if device == "cpu":
        keep_freed_memory()
    if world_size > 1:
        if device == "mps":
            raise UserError("torch.distributed does not support MPS: train on one process, or pass --device cpu")
        # NCCL moves GPU tensors; gloo is the CPU backend (and what runs the DDP tests here).
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def teardown_distributed(finished=True):
    """Leave the process group. After a finished run every rank first waits for the others: a rank
    that destroys its group while another still has gloo traffic in flight with it can abort in C++
    ("terminate called without an active exception": 5 in 24 runs of our 2-process test on a loaded
    CPU without the barrier, 0 in 32 with it). After an error, no barrier: the others may never come."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def end_failed_rank(error):
    """End this process of a multi-process job now, with the error's message: the one-line one for a
    UserError, else the traceback. Not through Python's exit, which frees DDP's reducer and with it
    the gloo process group, and that can deadlock: the group's destructor, holding the GIL, waits for
    its worker thread, which waits for the GIL to free the tensors of an all-reduce it has finished
    (seen with py-spy in a loaded run of tests/test_train_faults.py's job-ending test, the rank still
    hung minutes later). Logs must be closed first. The other ranks then see this one's sockets close."""
    import traceback

    message = f"error: {error}" if isinstance(error, UserError) else "".join(traceback.format_exception(error))
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(1)


def all_reduce_sum(tensor, world_size):
    """Sum over ranks in place (a no-op on one process). SUM, not AVG: gloo has no AVG (Windows, CPU).
    world_size, not dist.is_initialized(), decides: a caller inside a DDP job may run on its own
    (world_size=1, rank 0 alone), and an all-reduce the other ranks never join would hang."""
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_dtype(device):
    """The dtype to add up many figures in: float64 keeps the sums exact, but MPS has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def any_process(flag, device, world_size):
    """True on every rank if flag is True on any rank."""
    return all_reduce_sum(torch.tensor(float(flag), device=device), world_size).item() > 0


def all_gather(obj, world_size):
    """[rank 0's obj, rank 1's obj, ...] of a picklable object, on every rank."""
    if world_size == 1:
        return [obj]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


@dataclass
class Precision:
    dtype: torch.dtype  # what matmuls run in: autocast's dtype, or float32 for no autocast
    device_type: str
    scaler: torch.amp.GradScaler  # scales the loss for float16 and is a no-op otherwise

    def autocast(self):
        """Parameters stay float32; autocast runs matmuls in bf16/fp16 and keeps reductions (softmax,
        LayerNorm, the loss) in float32."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def setup_precision(requested, device_type, sharded=False):
    """"auto": bf16 on GPUs that have it (Ampere and newer), fp16 with loss scaling on those that
    do not (V100, T4, RTX 20xx), float32 on CPU and MPS. sharded: the model is sharded with FSDP."""
    if requested == "auto":
        if device_type == "cuda":
            # compute capability 8.0 = Ampere. Not torch.cuda.is_bf16_supported(): by default it also
            # says yes on a V100, where bf16 only runs emulated, several times slower than fp16.
            has_bf16 = torch.cuda.get_device_capability() >= (8, 0)
            requested = "bfloat16" if has_bf16 else "float16"
        else:
            requested = "float32"
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if requested not in dtypes:
        raise UserError(f"--dtype {requested}: choose auto, {', '.join(dtypes)}")
    if device_type == "cuda":
        # TF32 for the float32 matmuls autocast leaves alone (and all of them with --dtype float32):
        # ~8x the float32 speed on Ampere+, 10 mantissa bits, which training does not notice.
        torch.set_float32_matmul_precision("high")
    # fp16 has 5 exponent bits: small gradients underflow to zero unless the loss is scaled up first.
    # bf16 has float32's range and needs no scaling.
    # Under FSDP each rank sees only its shard of the gradients: ShardedGradScaler all-reduces the
    # "found an inf" flag, so that every rank skips the same fp16 updates (GradScaler's would differ).
    make_scaler = ShardedGradScaler if sharded else torch.amp.GradScaler
    scaler = make_scaler(device_type, enabled=requested == "float16")
    return Precision(dtype=dtypes[requested], device_type=device_type, scaler=scaler)


def unwrap(model):
    """The plain module under torch.compile and DDP wrappers: the one that owns the parameters under
    their own names, and that evaluation, sampling and checkpoints use."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def compile_model(model, requested, device_type, example_batch, precision, log):
    """torch.compile(model) when asked for ("1") or on CUDA ("auto"); otherwise the model itself.

    Compilation happens lazily, on the first call, and that is where it fails (no C compiler, the
    `cannot find -lcuda` linker error). So one forward/backward on example_batch runs here: with
    "auto" a failure means a one-line warning and eager training, with "1" it is an error.
    The returned module shares its parameters with `model`, which stays uncompiled: evaluation and
    sampling call `model` directly, so their changing shapes never trigger recompilation.
    """
    if requested not in ("auto", "1", "0"):
        raise UserError(f"--compile {requested}: choose auto, 1 or 0")
    if requested == "0" or (requested == "auto" and device_type != "cuda"):
        return model
    compiled = torch.compile(model)
    try:
        x, y = example_batch
        with precision.autocast():
            _, loss = compiled(x, y)
        loss.backward()
    except Exception as e:  # inductor raises many types: BackendCompilerFailed, CalledProcessError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if requested == "1":
            raise UserError(f"torch.compile failed: {reason} (train without it: --compile 0)")
        log.warning(f"torch.compile failed, training uncompiled (--compile 0 skips the attempt): {reason}")
        compiled = model
    model.zero_grad(set_to_none=True)
    return compiled


def graphs_compiled():
    """Graphs torch.compile has made in this process so far (dynamo's counter). Every metrics.jsonl
    record carries it, so a run's log shows where recompilation happened (gpu_check.py reads it)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def peak_flops(device, dtype):
    """The GPU's peak bf16/fp16 FLOPS, or None where it is unknown (CPU, MPS, float32, unlisted GPUs)."""
    if not device.startswith("cuda") or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


# ---- FSDP: the model sharded over the processes ----
#
# DDP keeps a whole copy of the weights, the gradients and AdamW's two moments on every GPU: ~16 bytes
# per parameter (a 1.5B model: ~25 GB before any activation). FSDP (PyTorch's FSDP2, fully_shard)
# keeps 1/N of each on each of N GPUs, and all-gathers a block's weights just before that block
# runs. In DeepSpeed's terms (the ZeRO paper, Rajbhandari et al. 2020):
#   --reshard_after_forward 1   ZeRO-3: weights, gradients and optimizer state sharded; a block's
#                               gathered weights are freed after its forward, gathered again in backward
#   --reshard_after_forward 0   ZeRO-2-like: the gathered weights stay from forward to backward (one
#                               all-gather per step instead of two), freed after backward; gradients
#                               and optimizer state sharded
# (ZeRO-1, only the optimizer state sharded, is torch.distributed.optim.ZeroRedundancyOptimizer.)


def shard_model(model, reshard_after_forward, precision, dist_info):
    """FSDP2 over all processes, in place: each Block is one unit (gathered, then freed, as a whole),
    the root the other (embeddings, ln_f and the output layer, tied to wte or not). Call it before
    building the optimizer: the optimizer must hold the sharded parameters (DTensors) that this makes."""
    policy = MixedPrecisionPolicy()  # float32: the weights are used as they are
    if precision.dtype != torch.float32:
        # Blocks compute with bf16/fp16 copies (gathered in that dtype: half the traffic); the shards
        # stay float32 (the master weights AdamW updates) and gradients are reduced in float32.
        policy = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)
    mesh = dist.device_mesh.init_device_mesh(dist_info.device_type, (dist_info.world_size,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root keeps its weights gathered through the step (FSDP's default for it): backward needs
    # the output layer first, straight after the forward.
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # GPT.forward returns a view (the vocab_size columns of the padded logits); FSDP warns that an
    # in-place op on it would skip a gather in backward. Nothing changes the logits in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    # ShardedGradScaler's found-inf flag has shape (1,): DTensor asks for a scalar, harmlessly.
    warnings.filterwarnings("ignore", message="Found a non-scalar tensor with numel=1")
    return model


def empty_copy(model, device):
    """A copy of model whose weights are new, uninitialised tensors on device ("meta": no memory at
    all): a deepcopy in which each parameter is stood in for by an empty one of its shape, so that a
    tied weight stays tied."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
            for p in model.parameters()}  # fmt: skip
    return copy.deepcopy(model, memo)


def whole_model(model, empty):
    """The model itself, or, when FSDP shards it, a plain copy with all the weights on this rank,
    built from `empty` (empty_copy(model, "meta") before it was sharded). Evaluations and samples run
    on it: FSDP's gathers need every rank to make the same forward calls, and they do not (HellaSwag
    splits its examples unevenly, only rank 0 samples). Every rank must call it. The copy costs 4
    bytes per parameter while it lives."""
    if not isinstance(model, FSDPModule):
        return model
    whole = empty_copy(empty, next(model.parameters()).device)
    weights = whole.state_dict()
    gathered = set()  # the tied wte / lm_head weight is one shard under two names: gathered once
    with torch.no_grad():
        for name, shard in model.state_dict().items():
            if id(shard) not in gathered:
                gathered.add(id(shard))
                weights[name].copy_(shard.full_tensor())  # an all-gather, one tensor at a time
    return whole


# ---- how much memory training takes: train_gpt2.py --plan ----

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


def memory_plan(config, batch_size, seq_len, world_size, dtype, parallel, checkpointing, reshard_after_forward=True,
                grad_accum_steps=1):  # fmt: skip
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


def plan_report(config, batch_size, seq_len, total_batch_size, world_size, dtype, gpu_gib, chosen,
                reshard_after_forward=True):  # fmt: skip
    """(text, problem): what train_gpt2.py --plan prints, GiB per GPU of each part of memory_plan for
    ddp and fsdp with and without activation checkpointing and the largest --batch_size that fits in
    gpu_gib GiB (0: unknown); and, if chosen (the flags' parallel and checkpointing) does not fit
    even batch_size 1, what to do instead (else None)."""
    usable = gpu_gib * 2**30 * (1 - GPU_RESERVE)

    def plan_at(parallel, checkpointing, B, N=world_size):
        accumulating = total_batch_size > B * seq_len * N
        return memory_plan(config, B, seq_len, N, dtype, parallel, checkpointing, reshard_after_forward,
                           grad_accum_steps=2 if accumulating else 1)  # fmt: skip

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
        lines.append("  (counted for GPT-2's layers and AdamW's two moments: the modern recipe's norms, rotary "
                     "embeddings and soft cap save other tensors, Muon keeps one buffer: not exact)")
    if not gpu_gib:
        lines.append("the largest batch_size that fits: pass --gpu_memory GiB")
        return "\n".join(lines), None
    fits = [largest(p, c) for p, c in PLAN_COLUMNS]
    lines.append(f"{'largest batch_size':<20}" + "".join(f"{f'{a} ({d})':>12}" for a, d in fits))
    lines.append(f"  (in brackets: the largest that divides --total_batch_size {total_batch_size}; "
                 f"{GPU_RESERVE:.0%} of the GPU kept back)")  # fmt: skip
    if fits[PLAN_COLUMNS.index(chosen)][0] == 0:
        flags = lambda parallel, checkpointing: f"--parallel {parallel} --activation_checkpointing {int(checkpointing)}"
        ways = [f"{flags(*column)} (fits batch_size {a})" for column, (a, _) in zip(PLAN_COLUMNS, fits) if a]
        if not ways:  # then sharded over more processes
            more = next((N for N in (2**k for k in range(1, 11)) if N > world_size and largest("fsdp", True, N)[0]), 0)
            if more:
                fit = largest("fsdp", True, more)[0]
                ways.append(f"{flags('fsdp', True)} over {more} processes (fits batch_size {fit})")
        ways += ["a shorter --seq_len", "a smaller model"]
        need = sum(plan_at(*chosen, 1).values()) / 2**30
        problem = (f"{flags(*chosen)} needs {need:.2f} GiB per GPU at batch_size 1, more than a {gpu_gib:g} GiB GPU "
                   f"holds ({1 - GPU_RESERVE:.0%} of it): try {'; or '.join(ways)}")  # fmt: skip
        return "\n".join(lines), problem
    return "\n".join(lines), None
