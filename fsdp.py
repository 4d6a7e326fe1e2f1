"""
FSDP: the model sharded over the processes (train_gpt2.py --parallel fsdp), with PyTorch's FSDP2.

    shard_model(model, reshard_after_forward=True, precision=precision, dist_info=dist_info)
    whole = whole_model(model, empty)      # a gathered plain copy, for evaluations and samples

Checkpoints stay one whole file: gather_full gathers the shards on rank 0 to save them, shard_like
cuts each rank's shard out of the file at resume (README, "Larger models: FSDP").
"""

import copy
import warnings

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

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
    memo = {
        id(p): torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
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
    """A checkpoint's full tensor cut like `like`: this rank's shard of it when `like` is an FSDP
    shard (every rank read the whole file, so each cuts its own: no communication), else as it is."""
    if not isinstance(like, DTensor):
        return tensor
    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
