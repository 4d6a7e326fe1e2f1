"""
The optimizer: parameter groups, AdamW (or Muon + AdamW), and the learning-rate schedules of
pretraining and fine-tuning, with how the loop applies them to every group.

    optimizer = make_optimizer(model, cfg, "cuda")      # cfg: train_gpt2.TrainConfig's optimizer fields
    set_lr(optimizer, get_lr(step, cfg))                # each step, before optimizer.step()
"""

import math

import torch


def configure_optimizers(
    model,
    weight_decay,
    learning_rate,
    betas,
    eps,
    device_type,
    muon_lr=0.0,
    muon_momentum=0.95,
    embed_lr=0.0,
    head_lr=0.0,
):
    """AdamW with weight decay on the matrices (matmul weights and embeddings) only.
    Biases and LayerNorm gains are 1-D: decaying them toward zero only hurts.

    The modern recipe splits the parameters into groups with LRs of their own: embed_lr for the
    embeddings, head_lr for an untied output layer (0: learning_rate), and, with muon_lr > 0,
    Muon for the blocks' matrices (then a MuonWithAdamW). Each group's "lr_scale" is its peak LR
    over learning_rate: the training loop sets lr = schedule * lr_scale (GPT-2's groups: 1.0)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
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
    muon = torch.optim.Muon([group(matrices, muon_lr)], lr=muon_lr, momentum=muon_momentum, weight_decay=weight_decay)
    return MuonWithAdamW(muon, adamw)


def make_optimizer(model, cfg, device_type):
    """AdamW, or Muon + AdamW (cfg.optimizer), with each parameter group's peak LR from cfg."""
    return configure_optimizers(
        model,
        cfg.weight_decay,
        cfg.max_lr,
        (cfg.beta1, cfg.beta2),
        cfg.adam_eps,
        device_type,
        muon_lr=cfg.muon_lr if cfg.optimizer == "muon" else 0.0,
        muon_momentum=cfg.muon_momentum,
        embed_lr=cfg.embed_lr,
        head_lr=cfg.head_lr,
    )


def set_lr(optimizer, lr):
    """lr is max_lr's share of the schedule; every group follows in proportion to its own peak LR."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # no lr_scale: a checkpoint from before the recipes


def get_lr(step, cfg):
    """Pretraining: linear warmup to max_lr, then a cosine down to min_lr = min_lr_ratio * max_lr at
    max_steps; or (wsd) a plateau at max_lr and a straight line down to min_lr over the last
    decay_frac of the steps (starting at the end of the warmup at the latest)."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.max_lr * cfg.min_lr_ratio
    if cfg.lr_schedule == "wsd":
        # warmup-stable-decay (Hu et al. 2024, MiniCPM; modded-nanogpt's trapezoid): the long plateau
        # makes fast progress, the decay at the end collects it
        decay_start = max(cfg.warmup_steps, cfg.max_steps - round(cfg.decay_frac * cfg.max_steps))
        progress = max(0, step - decay_start) / max(1, cfg.max_steps - decay_start)  # 0 until the decay, -> 1
        return cfg.max_lr - progress * (cfg.max_lr - min_lr)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - min_lr)


def sft_lr(step, cfg):
    """Fine-tuning: linear warmup to max_lr, then a linear decay to min_lr_ratio * max_lr (0 by
    default) at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)  # 0 -> 1
    return cfg.max_lr * (1 - progress * (1 - cfg.min_lr_ratio))


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
            optimizer.load_state_dict(
                {
                    "state": {i - offset: v for i, v in state_dict["state"].items() if offset <= i < offset + n},
                    "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in own],
                }
            )
            offset += n
