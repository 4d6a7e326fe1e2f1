"""
Where training runs: processes (torchrun, DDP's collectives), the device, precision (bf16, fp16 with
loss scaling, fp32), compilation and the hardware's peak speed. FSDP is fsdp.py, the memory plan
memory_plan.py.

    from device import setup_distributed, setup_precision, compile_model, peak_flops
    dist_info = setup_distributed("auto")        # reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE
    precision = setup_precision("auto", dist_info.device_type)
    with precision.autocast():
        logits, loss = model(x, y)

Kept out of `train_gpt2.py` so the training loop reads the same on a laptop CPU and on 8 GPUs.
"""

import ctypes
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from errors import UserError

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
    """ "auto" picks cuda > mps > cpu; an explicit device that is not there is an error, not a fallback."""
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


def setup_distributed(requested_device, cpu_offload=False):
    """One process (`python train_gpt2.py`) or one of many (`torchrun`, which sets the env variables).
    cpu_offload (FSDP's): a process group even for one process, as FSDP shards over one, and CPU
    collectives beside NCCL's for the offloaded shards."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(requested_device, local_rank)
    if device.startswith("cuda"):
        # the default device of everything that takes none (NCCL, capability and RNG queries)
        torch.cuda.set_device(device)
    if device == "cpu":
        keep_freed_memory()
    if world_size > 1 or cpu_offload:
        if device == "mps":
            raise UserError("torch.distributed does not support MPS: train on one process, or pass --device cpu")
        # NCCL moves GPU tensors; gloo is the CPU backend (and what runs the DDP tests here). Offloaded
        # FSDP shards are CPU tensors: the gradient norm's all-reduce and the gathers for checkpoints
        # and evaluations go through gloo then (NCCL has no CPU backend), the training's own through NCCL.
        backend = "gloo"
        if device.startswith("cuda"):
            backend = "cpu:gloo,cuda:nccl" if cpu_offload else "nccl"
        # one process alone needs no torchrun: a group of one over an in-memory store
        alone = dict(store=dist.HashStore(), rank=0, world_size=1) if world_size == 1 else {}
        dist.init_process_group(backend=backend, **alone)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def teardown_distributed(finished=True):
    """Leave the process group. A finished run's ranks, when there are several, end through
    end_finished_rank, which never returns (print everything first). After an error, no barrier: the
    others may never come. A group of one (--cpu_offload alone) is simply left."""
    if dist.is_initialized():
        if finished and dist.get_world_size() > 1:
            end_finished_rank()
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


def end_finished_rank():
    """End this process of a multi-process job that finished: wait for every rank, then leave without
    Python's exit. Gloo's process group can abort the process as it is destroyed ("terminate called
    without an active exception"): 5 in 24 runs of a 2-process test on a loaded CPU without a barrier
    before destroy_process_group, still 1 in 6 with one, turning a finished run into a failed one;
    os._exit runs no destructor. Every file is closed and flushed before this is called."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
    """ "auto": bf16 on GPUs that have it (Ampere and newer), fp16 with loss scaling on those that
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
