"""
FSDP: the model sharded over the processes (train_gpt2.py --parallel fsdp), with PyTorch's FSDP2.

    with torch.device("meta"):
        model = GPT(config)                # shapes only: no memory, no random draws
    shard_model(model, reshard_after_forward=True, precision=precision, dist_info=dist_info, cpu_offload=False)
    initialise_shards(model, "cuda:0")    # each rank draws GPT(config)'s weights and keeps its shards
    whole = whole_model(model, empty, device)  # a gathered plain copy, for evaluations and samples

Checkpoints stay one whole file: gather_full gathers the shards on rank 0 to save them, shard_like
cuts each rank's shard out of the file at resume, which every rank maps (mmap) rather than reads
(README, "Larger models: FSDP").
"""

import copy
import warnings

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from model import init_weight

# DDP keeps a whole copy of the weights, the gradients and AdamW's two moments on every GPU: ~16 bytes
# per parameter (a 1.5B model: ~25 GB before any activation). FSDP (PyTorch's FSDP2, fully_shard)
# keeps 1/N of each on each of N GPUs, and all-gathers a block's weights just before that block
# runs. In DeepSpeed's terms (the ZeRO paper, Rajbhandari et al. 2020):
#   --reshard_after_forward 1   ZeRO-3: weights, gradients and optimizer state sharded; a block's
#                               gathered weights are freed after its forward, gathered again in backward
#   --reshard_after_forward 0   ZeRO-2-like: the gathered weights stay from forward to backward (one
#                               all-gather per step instead of two), freed after backward; gradients
#                               and optimizer state sharded
#   --cpu_offload 1             ZeRO-Offload (Ren et al. 2021) over ZeRO-3: the shards of the weights,
#                               the gradients and the optimizer state live in host memory; each unit's
#                               weights are copied to the GPU to be gathered, its gradients back after
#                               their reduce-scatter, and the optimizer steps on the CPU. The GPU keeps
#                               only the gathered units and the activations.
# (ZeRO-1, only the optimizer state sharded, is torch.distributed.optim.ZeroRedundancyOptimizer.)


def shard_model(model, reshard_after_forward, precision, dist_info, cpu_offload=False):
    """FSDP2 over all processes, in place: each Block is one unit (gathered, then freed, as a whole),
    the root the other (embeddings, ln_f and the output layer, tied to wte or not). Call it before
    building the optimizer: the optimizer must hold the sharded parameters (DTensors) that this makes.
    cpu_offload: the shards in host memory (FSDP2's CPUOffloadPolicy), pinned where there is a GPU
    to copy them to (pinned pages copy at full PCIe speed, and asynchronously)."""
    policy = MixedPrecisionPolicy()  # float32: the weights are used as they are
    if precision.dtype != torch.float32:
        # Blocks compute with bf16/fp16 copies (gathered in that dtype: half the traffic); the shards
        # stay float32 (the master weights AdamW updates) and gradients are reduced in float32.
        policy = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=dist_info.device_type == "cuda") if cpu_offload else OffloadPolicy()
    mesh = dist.device_mesh.init_device_mesh(dist_info.device_type, (dist_info.world_size,))
    for block in model.transformer.h:
        fully_shard(
            block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward, offload_policy=offload
        )
    # The root keeps its weights gathered through the step (FSDP's default for it): backward needs
    # the output layer first, straight after the forward.
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    # GPT.forward returns a view (the vocab_size columns of the padded logits); FSDP warns that an
    # in-place op on it would skip a gather in backward. Nothing changes the logits in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    # ShardedGradScaler's found-inf flag has shape (1,): DTensor asks for a scalar, harmlessly.
    warnings.filterwarnings("ignore", message="Found a non-scalar tensor with numel=1")
    return model


@torch.no_grad()
def initialise_shards(model, device):
    """Give a model built on the meta device, then sharded (shard_model), its initial weights on
    `device` ("cpu" when offloaded): bit for bit those of the same GPT built whole on the CPU from the
    same RNG state, which is left as that build would leave it. No rank ever holds the whole model:
    each parameter is drawn whole on the CPU, this rank's shard is kept and the rest dropped, so the
    peak is one parameter (the (vocab, C) embedding), 4 x 50304 x 1600 bytes = 0.3 GB for GPT-2 XL.

    Why every rank draws every number: a CPU generator (Mersenne Twister) cannot skip ahead, so the
    only way to get today's weights is to make today's draws, in today's order, with today's shapes.
    A generator seeded per parameter would let a rank draw only its own rows, but it would change the
    initial weights of every run, sharded or not. Drawing costs time, not memory: about as long as
    building the model on one process. The draws come in two passes, as GPT(config) makes them: each
    module's own reset_parameters (torch's defaults: nn.Linear's Kaiming-uniform, LayerNorm's (1, 0)),
    in construction order (the order of model.modules()), then GPT-2's, model.weight_inits."""
    model.to_empty(device=device)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            reset_shards(module)
    for shard, std in model.weight_inits():
        shard.copy_(shard_like(init_weight(torch.empty(shard.shape, dtype=shard.dtype), std), shard))


def reset_shards(module):
    """module.reset_parameters() drawn on new whole CPU tensors of the shapes of its parameters (not
    its children's), held by a shallow copy of the module, and each of its shards cut out of them.
    A function of its own, so that no whole tensor outlives the call."""
    whole = copy.copy(module)
    whole._parameters = {
        name: None if p is None else torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype))
        for name, p in module._parameters.items()
    }
    whole.reset_parameters()
    for shard, drawn in zip(module.parameters(recurse=False), whole.parameters(recurse=False)):
        shard.copy_(shard_like(drawn, shard))


def empty_copy(model, device):
    """A copy of model whose weights and buffers (a quantized base's codes, quant.py) are new,
    uninitialised tensors on device ("meta": no memory at all): a deepcopy in which each tensor is
    stood in for by an empty one of its shape, so that a tied weight stays tied."""
    memo = {
        id(p): torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    memo |= {id(b): torch.empty_like(b, device=device) for b in model.buffers()}
    return copy.deepcopy(model, memo)


def whole_model(model, empty, device):
    """The model itself, or, when FSDP shards it, a plain copy on `device` with all the weights, built
    from `empty` (empty_copy(model, "meta") before it was sharded). Evaluations and samples run
    on it: FSDP's gathers need every rank to make the same forward calls, and they do not (HellaSwag
    splits its examples unevenly, only rank 0 samples). Every rank must call it. The copy costs 4
    bytes per parameter while it lives (and a copy of the buffers, which FSDP does not shard)."""
    if not isinstance(model, FSDPModule):
        return model
    whole = empty_copy(empty, device)  # not the shards' device: offloaded, they are in host memory
    tensors = lambda m: dict(m.named_parameters(remove_duplicate=False)) | dict(m.named_buffers())  # noqa: E731
    targets = tensors(whole)
    gathered = set()  # the tied wte / lm_head weight is one shard under two names: gathered once
    with torch.no_grad():
        for name, tensor in tensors(model).items():
            if id(tensor) not in gathered:
                gathered.add(id(tensor))
                # a shard (DTensor) is all-gathered, one tensor at a time; a buffer is whole on every rank
                targets[name].copy_(tensor.full_tensor() if isinstance(tensor, DTensor) else tensor)
    return whole


def gather_full(state, is_master, gathered=None):
    """A state_dict (nested dicts of tensors) with each FSDP shard (a DTensor) gathered whole, on the
    CPU of rank 0; None on the other ranks. Plain tensors (DDP, one process) stay where they are.
    Every rank must call it: each gather is an all-gather. A tensor that appears twice (the tied
    wte / lm_head weight) is gathered once and stays one tensor in the file."""
    gathered = {} if gathered is None else gathered
    if isinstance(state, dict):
        return {key: gather_full(value, is_master, gathered) for key, value in state.items()}
    if not isinstance(state, DTensor):
        return state.detach() if isinstance(state, torch.Tensor) else state  # a Parameter: save the tensor
    if id(state) not in gathered:
        full = state.full_tensor()  # one tensor at a time: the GPU never holds more than one whole
        gathered[id(state)] = full.cpu() if is_master else None
    return gathered[id(state)]


def shard_like(tensor, like):
    """A whole tensor cut like `like`: this rank's shard of it, a new tensor on the shard's device,
    when `like` is an FSDP shard; else the tensor as it is. Each rank cuts its own: no communication.
    The cut is made where the tensor is (a checkpoint mapped from disk: only this rank's rows are
    read) and only the shard moves. FSDP2 shards one dimension like torch.chunk (on a 1-D mesh: one
    Shard placement); a rank past the last chunk holds an empty one."""
    if not isinstance(like, DTensor):
        return tensor
    mesh, (placement,) = like.device_mesh, like.placements
    chunks, rank = torch.chunk(tensor, mesh.size(), dim=placement.dim), mesh.get_local_rank()
    local = chunks[rank] if rank < len(chunks) else tensor.narrow(placement.dim, 0, 0)
    local = local.to(like.to_local().device, copy=True)  # a copy: nothing aliases the mapped file
    return DTensor.from_local(local, mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())
