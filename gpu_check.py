"""
The GPU check: every CUDA path of the repository and its headline figures, in one run of about 7
minutes on one H100/H200 (docs/benchmarks.md, "GPU check").

    python gpu_check.py --hellaswag_dir path/to/hellaswag --out results/   # or: make gpu-check
    python gpu_check.py --device cpu --smoke                                # the same sequence on a tiny model, seconds

In order: the environment and the attention kernels; training steps in four precisions (bench.py's
time_train_step); a short train_gpt2.py run with evals, samples and a resume, whose metrics.jsonl says
whether anything compiled again; generation with and without the KV cache; FSDP's CPU offload against no
offload (memory and time per step), then that run offloaded; LoRA on an NF4-quantized base against LoRA
on the float one (finetune.py --base_quant); the same run with --recipe modern. Each result is one JSON
line, printed and appended to --out as soon as it is known, so a run cut short keeps what it measured.
A result that fails is a line with "error" and the check goes on (an out-of-memory in one configuration
says nothing about the next); one that cannot run here says why in "skipped".
"""

import argparse
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass

from bench import median, print_results, synchronize, time_train_step
from errors import UserError, exit_on_error
from quant import weight_bytes


@dataclass(frozen=True)
class CheckSizes:
    model: str  # model.MODEL_SIZES name of the training-step and generation figures
    batch_size: int  # B of the bf16 and fp16 training steps
    seq_len: int  # T
    fp32_batch_size: int  # B in float32: twice the activation memory of bf16 (and build-nanogpt's B=16)
    steps: int  # timed optimizer steps of the headline configuration (bf16 + compile)
    micro_steps: int  # its micro-steps per optimizer step (gradient accumulation)
    other_steps: int  # timed optimizer steps, of 2 micro-steps each, of every other configuration
    attention: tuple  # (B, nh, T, hs) of the attention-kernel check
    run_flags: tuple  # train_gpt2.py flags of the short real run (model, batch, evals, samples)
    run_steps: int  # its --max_steps; the resume then trains to 1.5x that
    shard_tokens: int  # tokens in each of its random shards (one val, two train)
    hellaswag_limit: int  # HellaSwag examples at each of its evaluations
    prompt_tokens: int  # generation: a (4, prompt_tokens) prompt, then new_tokens more
    new_tokens: int


GPU_CHECK_SIZES = CheckSizes(
    model="gpt2",
    batch_size=64,
    seq_len=1024,
    fp32_batch_size=16,
    steps=5,
    micro_steps=4,
    other_steps=2,
    attention=(64, 12, 1024, 64),
    # GPT-2 124M (train_gpt2.py's defaults) at B=64, T=1024 as above, so inductor's cache from the
    # headline's compilation can serve this one; 2 micro-steps per step, an eval and a sample every 5.
    run_flags=tuple(  # 2 micro-steps of 64 x 1024 per step: --total_batch_size 2 * 64 * 1024
        "--batch_size 64 --seq_len 1024 --total_batch_size 131072 --warmup_steps 3 --val_steps 2 --eval_interval 5 "
        "--sample_interval 5 --num_samples 2 --log_interval 5".split()
    ),
    run_steps=10,
    shard_tokens=2**20,
    hellaswag_limit=300,
    prompt_tokens=32,
    new_tokens=480,
)
SMOKE_SIZES = CheckSizes(  # --smoke: the same sequence in seconds on a CPU
    model="tiny",
    batch_size=2,
    seq_len=32,
    fp32_batch_size=2,
    steps=2,
    micro_steps=2,
    other_steps=1,
    attention=(2, 2, 32, 16),
    run_flags=tuple(
        "--n_layer 2 --n_head 2 --n_embd 32 --batch_size 2 --seq_len 16 --total_batch_size 64 --warmup_steps 2 "
        "--val_steps 2 --eval_interval 2 --sample_interval 2 --num_samples 1 --sample_tokens 8 --log_interval 2".split()
    ),
    run_steps=4,
    shard_tokens=4096,
    hellaswag_limit=4,
    prompt_tokens=4,
    new_tokens=8,
)

# (name, dtype, compiled): the headline configuration first, then what each part of it is worth
TRAIN_CONFIGS = (
    ("train_bf16_compiled", "bfloat16", True),
    ("train_bf16_eager", "bfloat16", False),
    ("train_fp16_eager", "float16", False),  # with a GradScaler: the path of GPUs without bf16 (V100, T4)
    ("train_fp32_eager", "float32", False),  # TF32 matmuls on CUDA (device.setup_precision)
)


def add_check_args(parser):
    from device import DEVICE_HELP

    parser.add_argument("--device", default="auto", help=DEVICE_HELP)  # no --dtype: the check runs each of them
    parser.add_argument(
        "--out",
        default="gpu_check.jsonl",
        help="JSON-lines file the results are appended to, or a folder for gpu_check.jsonl in it",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny model and a few steps: the same sequence in seconds, e.g. on a CPU"
    )
    parser.add_argument(
        "--compile",
        choices=["1", "0"],
        default=None,
        help="torch.compile the compiled configuration and the train_gpt2.py run (default: 1 on "
        "CUDA, 0 elsewhere, where inductor needs a minute even for the tiny model)",
    )
    parser.add_argument(
        "--hellaswag_dir",
        default=os.environ.get("HELLASWAG_DIR"),
        help="folder holding hellaswag_val.jsonl (default: $HELLASWAG_DIR; without it HellaSwag "
        "is skipped: the check never downloads)",
    )


def run_check(args):
    """The GPU check: environment, training steps in four precisions, a real train_gpt2.py run with
    evals, samples and a resume, then generation. Returns where the lines went and what failed."""
    import tempfile
    import time
    from datetime import datetime

    from device import keep_freed_memory, pick_device

    device = pick_device(args.device, local_rank=0)
    if device == "cpu":
        keep_freed_memory()  # as train_gpt2.py does on a CPU
    sizes = SMOKE_SIZES if args.smoke else GPU_CHECK_SIZES
    compile_flag = args.compile or ("1" if device.startswith("cuda") else "0")
    hellaswag = hellaswag_source(args.hellaswag_dir)  # refuses a wrong path before minutes of work
    out = os.path.join(args.out, "gpu_check.jsonl") if os.path.isdir(args.out) else args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    run_id = datetime.now().isoformat(timespec="seconds")  # tells the runs appended to one file apart
    start, records = time.perf_counter(), []

    def result(name, measure, *measure_args):
        """One line: {"name", figures..., "seconds"}, or {"name", "error"} if measuring raised."""
        t0 = time.perf_counter()
        try:
            figures = measure(*measure_args)
        except (Exception, SystemExit) as e:  # train_gpt2.main turns a UserError into a SystemExit
            figures = {"error": f"{type(e).__name__}: {first_line(e)}"}
        release_memory(device)  # after the exception is gone: its traceback held the tensors
        record = {"name": name, **figures, "seconds": round(time.perf_counter() - t0, 2), "run": run_id}
        print(json.dumps(record), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
        return record

    result("environment", check_environment, device, sizes, hellaswag)
    for name, dtype, compiled in TRAIN_CONFIGS:
        if compiled and compile_flag == "0":
            why = "" if args.compile else " (the default off CUDA: inductor needs a minute even for a tiny model)"
            result(name, skipped, f"--compile 0{why}")
            continue
        batch_size = sizes.fp32_batch_size if dtype == "float32" else sizes.batch_size
        steps, micro_steps = (sizes.steps, sizes.micro_steps) if compiled else (sizes.other_steps, 2)
        result(name, check_train_step, device, sizes, dtype, compiled, batch_size, steps, micro_steps)

    def run_and_resume(name, *more_flags):
        """A short train_gpt2.py run, then a resume of it to 1.5x its steps."""
        with tempfile.TemporaryDirectory() as tmp:
            run = result(
                f"{name}_run",
                check_train_gpt2_run,
                tmp,
                device,
                sizes,
                compile_flag,
                hellaswag,
                sizes.run_steps,
                more_flags,
            )
            if "error" in run:
                result(f"{name}_resume", skipped, "the run it resumes failed")
            else:
                result(
                    f"{name}_resume",
                    check_train_gpt2_run,
                    tmp,
                    device,
                    sizes,
                    compile_flag,
                    hellaswag,
                    sizes.run_steps * 3 // 2,
                    more_flags,
                )

    run_and_resume("train_gpt2")
    result("generate_kv_cache", check_generation, device, sizes)
    result("qlora_nf4", check_qlora_step, device, sizes)
    result("fsdp", not_in_check_yet, "parallel")  # train_gpt2.py --parallel fsdp needs 2+ processes
    result("fsdp_cpu_offload", check_offload, device, sizes)
    # the loop offloaded, on one process (a group of one): evals, samples, checkpoints and the resume.
    # Eager: offload is the path under test, and its time is PCIe's and the CPU AdamW's.
    run_and_resume("fsdp_cpu_offload", "--parallel", "fsdp", "--cpu_offload", "1", "--compile", "0")
    run_and_resume("modern_recipe", "--recipe", "modern")
    errors = [r["name"] for r in records if "error" in r]
    skips = [r["name"] for r in records if "skipped" in r]
    minutes = (time.perf_counter() - start) / 60
    result("total", lambda: {"results": len(records), "errors": errors, "skipped": skips, "minutes": minutes})
    return {
        "out": out,
        "results": len(records) - 1,
        "errors": ", ".join(errors) or "none",
        "skipped": ", ".join(skips) or "none",
        "minutes": minutes,
    }


def skipped(reason):
    return {"skipped": reason}


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


def release_memory(device):
    """Give the memory of a finished (or failed) measurement back before the next one, and forget
    its compiled graphs: the next shapes compile afresh, as in a new process, instead of making
    torch.compile mark them dynamic."""
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def hellaswag_source(folder):
    """The HellaSwag folder to evaluate with, or None: the check runs where nothing can be downloaded."""
    if folder is None:
        return None
    if not os.path.isfile(os.path.join(folder, "hellaswag_val.jsonl")):
        raise UserError(f"--hellaswag_dir {folder}: no hellaswag_val.jsonl in it (leave it out to skip HellaSwag)")
    return folder


def package_version(name):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def check_environment(device, sizes, hellaswag):
    """What the figures were measured on, and whether each attention kernel runs here."""
    import platform

    import torch

    from device import peak_flops
    from tokenizer import get_tokenizer

    figures = {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    # datasets and rustbpe are not needed here (the GPU machine may lack them): listed to show that
    figures.update(
        {name: package_version(name) for name in ("numpy", "tiktoken", "transformers", "triton", "datasets", "rustbpe")}
    )
    dtype = torch.float32
    if device.startswith("cuda"):
        gpu = torch.cuda.get_device_properties(device)
        bf16 = (gpu.major, gpu.minor) >= (8, 0)  # Ampere and newer, as device.setup_precision decides
        dtype = torch.bfloat16 if bf16 else torch.float16
        peak = peak_flops(device, torch.bfloat16)
        figures.update(
            gpu=gpu.name,
            gpu_memory_GiB=round(gpu.total_memory / 2**30, 1),
            compute_capability=f"{gpu.major}.{gpu.minor}",
            bf16=bf16,
            cudnn=torch.backends.cudnn.version(),
            peak_TFLOPS=peak / 1e12 if peak else None,
            flash_sdp_enabled=torch.backends.cuda.flash_sdp_enabled(),
        )
    figures.update(attention_kernels(device, sizes.attention, dtype))
    try:
        figures["gpt2_bpe"] = "ok" if get_tokenizer().encode("Hello") else "empty"
    except Exception as e:  # tiktoken without its files and without internet: set TIKTOKEN_CACHE_DIR
        figures["gpt2_bpe"] = f"error: {first_line(e)}"
    figures["hellaswag"] = hellaswag or "skipped: no --hellaswag_dir or $HELLASWAG_DIR"
    return figures


def attention_kernels(device, shape, dtype):
    """Forward + backward milliseconds of causal F.scaled_dot_product_attention on q, k, v of `shape`
    (B, nh, T, hs): with PyTorch's own choice of kernel, and with each kernel forced. A kernel that
    cannot run here gives PyTorch's reason instead."""
    import warnings

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    kernels = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }

    def forward_backward():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    ms, cannot = {"default": time_ms(forward_backward, device)}, {}
    for name, kernel in kernels.items():
        with warnings.catch_warnings(record=True) as caught:  # PyTorch warns why a kernel cannot run
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([kernel]):
                    ms[name] = time_ms(forward_backward, device)
            except RuntimeError as e:
                cannot[name] = "; ".join(first_line(w.message) for w in caught) or first_line(e)
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "attention_shape": list(shape),
        "attention_dtype": dtype_name,
        "flash_attention_runs": "flash" in ms,
        "sdpa_fwd_bwd_ms": ms,
        "sdpa_cannot_run": cannot,
    }


def time_ms(function, device, warmup=2, repeats=5):
    import time

    for _ in range(warmup):
        function()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - t0) / repeats * 1000


def check_train_step(device, sizes, dtype, compiled, batch_size, steps, micro_steps):
    """bench.py's measurement of train_gpt2.train_step (time_train_step) on random tokens: one untimed
    optimizer step (compilation, the allocator, AdamW's state), then `steps` timed ones of
    `micro_steps` micro-steps each."""
    import torch

    run = time_train_step(
        device,
        sizes.model,
        batch_size,
        sizes.seq_len,
        dtype,
        "1" if compiled else "0",
        micro_steps,
        warmup=1,
        steps=steps,
    )
    figures = {
        "model": sizes.model,
        "params_M": round(run.model.num_params() / 1e6, 2),
        "batch_size": batch_size,
        "seq_len": sizes.seq_len,
        "micro_steps": micro_steps,
        "timed_steps": steps,
        "dtype": str(run.precision.dtype).removeprefix("torch."),
        "compiled": run.compiled,
        "fused_adamw": bool(run.optimizer.defaults.get("fused")),
        "ms_per_micro_step": run.seconds_per_step / micro_steps * 1000,
        "tokens_per_s": run.tokens_per_s,
        "mfu": run.mfu,  # None: fp32, CPU
        "loss_first": run.warmup_steps[0].loss,
        "loss_last": run.timed_steps[-1].loss,
        "all_finite": all(step.finite for step in run.timed_steps),
    }
    if device.startswith("cuda"):
        figures["peak_memory_GiB"] = run.peak_memory_MiB / 2**10
        figures["tf32"] = torch.get_float32_matmul_precision() != "highest"
    else:
        figures["peak_rss_MiB"] = run.peak_memory_MiB  # the whole process's so far
    if run.precision.scaler.is_enabled():
        figures["loss_scale"] = run.precision.scaler.get_scale()  # halved at each overflow, from 65536
    if compiled:
        figures.update(compile_s=run.compile_s, graphs=run.graphs)
    return figures


def check_qlora_step(device, sizes):
    """finetune.py --lora_rank 8 --base_quant nf4 against LoRA on the float base, both under bf16
    autocast, eager (torch.compile is not checked on the dequantizing autograd.Function here): the
    base's bytes, the step time and the peak memory of each, and that the quantized run's loss is finite."""
    figures = {"model": sizes.model, "batch_size": sizes.batch_size, "seq_len": sizes.seq_len}
    for quant in ("none", "nf4"):  # one after the other: the first model is freed before the second is built
        run = time_train_step(
            device, sizes.model, sizes.batch_size, sizes.seq_len, "bfloat16", "0", 1, 1, sizes.other_steps, 8, quant
        )
        name = "float" if quant == "none" else quant
        figures[f"weight_MiB_{name}"] = weight_bytes(run.model) / 2**20
        figures[f"ms_per_step_{name}"] = run.seconds_per_step * 1000
        figures[f"peak_memory_MiB_{name}"] = run.peak_memory_MiB
        figures[f"all_finite_{name}"] = all(step.finite for step in run.timed_steps)
        del run
        release_memory(device)
    return figures


@contextmanager
def environment_variable(name, value):
    """os.environ[name] = value while inside (unset for None), as it was afterwards."""
    before = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def write_check_shards(data_dir, tokens_per_shard):
    """One val and two train shards of random GPT-2 token ids, named as fineweb.py names them."""
    import numpy as np

    from shards import TOKEN_DTYPE, shard_name

    os.makedirs(data_dir)
    rng = np.random.default_rng(0)
    for index in range(3):
        np.save(
            os.path.join(data_dir, shard_name("edufineweb", index)),
            rng.integers(0, 50257, size=tokens_per_shard).astype(TOKEN_DTYPE),
        )


def check_train_gpt2_run(tmp, device, sizes, compile_flag, hellaswag, max_steps, more_flags=()):
    """train_gpt2.main in `tmp` up to max_steps: a fresh run the first time, a resume from its last
    checkpoint the second. Compiled training, the val loss, HellaSwag and sampling in one process;
    no eval and no training step after one should make torch.compile compile again."""
    import time

    import train_gpt2
    from device import graphs_compiled
    from training_log import read_metrics

    data_dir, log_dir = os.path.join(tmp, "data"), os.path.join(tmp, "log")
    if not os.path.isdir(data_dir):
        write_check_shards(data_dir, sizes.shard_tokens)
    flags = [
        "--data_dir",
        data_dir,
        "--log_dir",
        log_dir,
        "--device",
        device,
        "--compile",
        compile_flag,
        "--max_steps",
        str(max_steps),
        "--eval_tasks",
        "hellaswag" if hellaswag else "",
        "--eval_limit",
        str(sizes.hellaswag_limit),
        *sizes.run_flags,
        *more_flags,
    ]
    graphs_before, t0 = graphs_compiled(), time.perf_counter()
    with environment_variable("HELLASWAG_DIR", hellaswag):  # where train_gpt2.py's HellaSwag reads its data
        train_gpt2.main(flags)
    seconds = time.perf_counter() - t0
    metrics = read_metrics(os.path.join(log_dir, "metrics.jsonl"))
    # a resume appends its own config record, then the records of its steps
    this_run = metrics[max(i for i, m in enumerate(metrics) if m["kind"] == "config") :]
    start_step = this_run[0]["step"]
    train = [m for m in this_run if m["kind"] == "train"]
    samples = [m for m in this_run if m["kind"] == "sample" and m["step"] > start_step]  # mid-run, or the end
    figures = {
        "start_step": start_step,
        "max_steps": max_steps,
        "train_steps": len(train),
        "loss_first": train[0]["loss"],
        "loss_last": train[-1]["loss"],
        # the first step of a process includes warming up; the median of the others is its speed
        "tokens_per_s_median": median([m["tokens_per_sec"] for m in train[1:]]),
        "mfu_median": median([m["mfu"] for m in train[1:]]),  # None without a known peak (CPU, fp32)
        "val_loss": {m["step"]: m["loss"] for m in this_run if m["kind"] == "val"},
        "sample_step": samples[0]["step"] if samples else None,
        "sample": samples[0]["text"] if samples else None,
        "checkpoints": sorted(name for name in os.listdir(log_dir) if name.endswith(".pt")),
        "run_seconds": seconds,
    }
    if hellaswag:
        hellaswag_runs = [m for m in this_run if m["kind"] == "hellaswag"]
        figures["hellaswag_acc_norm"] = {m["step"]: m["acc_norm"] for m in hellaswag_runs}
        figures["hellaswag_examples"] = hellaswag_runs[-1]["count"] if hellaswag_runs else 0
    else:
        figures["hellaswag"] = "skipped: no --hellaswag_dir or $HELLASWAG_DIR (the check never downloads)"
    figures.update(graphs_made(this_run, graphs_before))
    return figures


def graphs_made(records, graphs_before):
    """Where torch.compile made graphs in one run, from its metrics.jsonl records (config first) and
    the process's graph count before it started. Every record carries that count when it was logged
    (device.graphs_compiled), so the graphs made in a phase are its record's count minus the previous
    record's: config's are compile_model's, a train record's its step's, and a val, eval task or
    sample record's its evaluation's.

    compile_model's graphs, before the loop, should be the only ones. A graph made in the first
    training step means compile_model's example batch differs from the real ones (in shape, dtype or
    aliasing); one made in an eval or a sample, or in a training step after one (train/eval mode,
    autocast state), means that the evals make training compile again."""
    at_compile = records[0]["graphs"] - graphs_before
    steps, in_evals = [], 0
    for previous, record in zip(records, records[1:]):
        made = record["graphs"] - previous["graphs"]
        if record["kind"] == "train":
            steps.append(made)
        else:
            in_evals += made
    return {
        "compiled": at_compile > 0,
        "graphs_at_compile": at_compile,
        "graphs_in_first_train_step": steps[0] if steps else 0,
        "graphs_in_evals": in_evals,
        "graphs_in_later_train_steps": sum(steps[1:]),
        "recompiles": sum(steps) + in_evals,
    }


def check_generation(device, sizes):
    """Tokens/s of generate.generate with and without the KV cache, greedy, from the same prompt."""
    import time

    import torch

    from device import setup_precision
    from generate import generate
    from model import GPT, GPTConfig

    precision = setup_precision("auto", device.split(":")[0])
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(sizes.model)).to(device).eval()
    prompt = torch.randint(0, model.config.vocab_size, (4, sizes.prompt_tokens), device=device)  # (B, T0)
    figures, outputs = {"model": sizes.model, "prompt": list(prompt.shape), "new_tokens": sizes.new_tokens}, {}
    for use_cache in (False, True):
        with precision.autocast():
            generate(model, prompt, 2, temperature=0, use_cache=use_cache)  # warm-up
            synchronize(device)
            t0 = time.perf_counter()
            outputs[use_cache] = generate(model, prompt, sizes.new_tokens, temperature=0, use_cache=use_cache)
            synchronize(device)
        key = "cached" if use_cache else "uncached"
        figures[f"{key}_tokens_per_s"] = prompt.size(0) * sizes.new_tokens / (time.perf_counter() - t0)
    figures["kv_cache_speedup"] = figures["cached_tokens_per_s"] / figures["uncached_tokens_per_s"]
    # in bf16 the two paths round differently, so greedy decoding may part ways after a while
    new = slice(sizes.prompt_tokens, None)
    figures["same_tokens_fraction"] = (outputs[True][:, new] == outputs[False][:, new]).float().mean().item()
    return figures


def check_offload(device, sizes):
    """Training steps of the model sharded by fsdp.shard_model, without and with CPU offload: each
    one's peak GPU memory and median time per step, and the largest difference of their losses. In
    one process, in a process group of one: FSDP has nothing to shard over, so what differs is
    offload's alone (the weights, gradients and AdamW state in host memory, copied over PCIe every
    step, AdamW on the CPU), as `python train_gpt2.py --parallel fsdp --cpu_offload 1` runs it on one
    GPU; here both runs take the same batches, so their peaks and times compare."""
    import time

    import torch
    import torch.distributed as dist

    from device import DistInfo, setup_precision
    from fsdp import shard_model
    from model import GPT, GPTConfig
    from optim import configure_optimizers

    device_type = device.split(":")[0]
    # as device.setup_distributed does for --cpu_offload: the offloaded gradients' norm is a CPU all-reduce
    backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        precision = setup_precision("auto", device_type, sharded=True)
        generator = torch.Generator().manual_seed(0)
        shape = (2, sizes.batch_size, sizes.seq_len)  # x and y
        batches = [torch.randint(0, 50257, shape, generator=generator).to(device) for _ in range(sizes.steps + 1)]
        figures = {"model": sizes.model, "dtype": str(precision.dtype).removeprefix("torch."), "batch": shape[1:]}
        losses = {}
        for offload in (False, True):
            torch.manual_seed(0)
            model = GPT(GPTConfig.from_name(sizes.model)).to(device)
            model = shard_model(model, True, precision, DistInfo(0, 0, 1, device), cpu_offload=offload)
            # offloaded, the parameters are host tensors: no CUDA fused AdamW for them (train_gpt2.train)
            optimizer = configure_optimizers(model, 0.1, 6e-4, (0.9, 0.95), 1e-8, "cpu" if offload else device_type)
            if device_type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times, losses[offload] = [], []
            for x, y in batches:
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                with precision.autocast():
                    _, loss = model(x, y)
                precision.scaler.scale(loss).backward()
                precision.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                precision.scaler.step(optimizer)
                precision.scaler.update()
                losses[offload].append(loss.item())
                synchronize(device)
                times.append(time.perf_counter() - t0)
            name = "offload" if offload else "no_offload"
            figures[f"{name}_ms_per_step"] = median(times[1:]) * 1e3  # the first one warms up
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device_type == "cuda" else None
            figures[f"{name}_peak_gib"] = peak
            del model, optimizer
            release_memory(device)
        figures["offload_slowdown"] = figures["offload_ms_per_step"] / figures["no_offload_ms_per_step"]
        figures["loss_max_difference"] = max(abs(a - b) for a, b in zip(losses[False], losses[True]))
    finally:
        dist.destroy_process_group()
    return figures


def not_in_check_yet(flag):
    """A feature the check does not run (FSDP: it needs several processes). When train_gpt2.py has a
    --flag of that name, say so, rather than report it missing."""
    from dataclasses import fields

    from train_gpt2 import TrainConfig

    if flag in {f.name for f in fields(TrainConfig)}:
        return skipped(f"train_gpt2.py has --{flag} now, but this check does not run it yet: add it here")
    return skipped("not implemented yet")


@exit_on_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_check_args(parser)
    args = parser.parse_args(argv)
    print_results(run_check(args), args.json)


if __name__ == "__main__":
    main()
