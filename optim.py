"""
The optimizer: the update rules from SGD to AdamW as a lesson, then the parameter groups, AdamW (or
Muon + AdamW, or a lesson rule's torch.optim class) and the learning-rate schedules of pretraining
and fine-tuning, with how the loop applies them to every group.

    optimizer = make_optimizer(model, cfg, "cuda")      # cfg: train_gpt2.TrainConfig's optimizer fields
    set_lr(optimizer, get_lr(step, cfg))                # each step, before optimizer.step()
"""

import math

import torch

# ---- The optimizer lesson ----
# Each update rule below fixes one problem of the one before it, in a few lines over a parameter
# tensor p, its gradient and a state dict (the optimizer's memory between steps): each returns the
# new parameter and the new state and changes neither argument. Training itself uses torch.optim's
# classes (fused kernels where they exist, see build_optimizer); tests/test_optim.py checks that each
# rule here takes exactly the steps its torch.optim class takes. The last lesson, Muon (Jordan et
# al. 2024), is torch.optim.Muon in MuonWithAdamW: momentum SGD whose update matrix is
# orthogonalised (Newton-Schulz steps), so that every direction of a matrix moves by the same
# amount, where Adam moves each entry on its own.
#
# weight_decay in the rules before AdamW is L2 regularisation: wd * p added to the gradient
# ("coupled": it then goes through the momentum and the adaptive scaling like any gradient).


def sgd_step(p, grad, state, lr, weight_decay=0.0):
    """SGD: p <- p - lr * (g + wd * p). Step downhill. Problem: in a narrow valley it zig-zags across
    the steep walls and crawls along the floor, and a noisy gradient moves it at random."""
    g = grad + weight_decay * p
    return p - lr * g, state


def sgd_momentum_step(p, grad, state, lr, momentum, weight_decay=0.0):
    """SGD with momentum (Polyak 1964): b <- mu * b + g (b = g at the first step); p <- p - lr * b.
    Fixes SGD's zig-zag: the gradient's steady part adds up over about 1 / (1 - mu) steps, the part
    that flips sign cancels. Problem: the velocity overshoots, it only sees where p was."""
    g = grad + weight_decay * p
    b = g if "momentum_buffer" not in state else momentum * state["momentum_buffer"] + g
    return p - lr * b, {"momentum_buffer": b}


def nesterov_step(p, grad, state, lr, momentum, weight_decay=0.0):
    """Nesterov momentum (Sutskever et al. 2013's form): b <- mu * b + g; p <- p - lr * (g + mu * b).
    Fixes momentum's overshoot: the step looks ahead along the velocity it is about to take, so a
    turn in the gradient brakes it one step sooner. Problem (of all three): one LR for every
    parameter, though some gradients are a thousand times smaller than others."""
    g = grad + weight_decay * p
    b = g if "momentum_buffer" not in state else momentum * state["momentum_buffer"] + g
    return p - lr * (g + momentum * b), {"momentum_buffer": b}


def adagrad_step(p, grad, state, lr, eps=1e-10, weight_decay=0.0):
    """AdaGrad (Duchi et al. 2011): s <- s + g^2; p <- p - lr * g / (sqrt(s) + eps). Fixes the one LR:
    each parameter's step is divided by the size of its own gradients so far, so rare and small
    gradients get large steps. Problem: s only grows, so the steps shrink toward 0 and training stalls."""
    g = grad + weight_decay * p
    s = state.get("sum", torch.zeros_like(p)) + g * g
    return p - lr * g / (s.sqrt() + eps), {"sum": s}


def rmsprop_step(p, grad, state, lr, alpha=0.99, eps=1e-8, weight_decay=0.0):
    """RMSProp (Hinton's 2012 lecture notes): v <- alpha * v + (1 - alpha) * g^2;
    p <- p - lr * g / (sqrt(v) + eps). Fixes AdaGrad's stall: a moving average of g^2 forgets old
    gradients, so the steps stop shrinking. Problem: no momentum, and v starts at 0, so the first
    steps divide by a v that is too small: they are too large."""
    g = grad + weight_decay * p
    v = alpha * state.get("square_avg", torch.zeros_like(p)) + (1 - alpha) * g * g
    return p - lr * g / (v.sqrt() + eps), {"square_avg": v}


def adam_step(p, grad, state, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """Adam (Kingma and Ba 2015): m <- b1 * m + (1 - b1) * g; v <- b2 * v + (1 - b2) * g^2 at step t;
    p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps). Momentum and RMSProp together,
    and the bias correction fixes the first steps: m and v start at 0, so at step t they are only
    1 - b^t of the average they estimate; dividing by that undoes it. Problem: L2 weight decay goes
    through the division by sqrt(v), so parameters with large gradients are hardly decayed at all."""
    b1, b2 = betas
    g = grad + weight_decay * p
    t = state.get("step", 0) + 1
    m = b1 * state.get("exp_avg", torch.zeros_like(p)) + (1 - b1) * g
    v = b2 * state.get("exp_avg_sq", torch.zeros_like(p)) + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    return p - lr * m_hat / (v_hat.sqrt() + eps), {"step": t, "exp_avg": m, "exp_avg_sq": v}


def adamw_step(p, grad, state, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    """AdamW (Loshchilov and Hutter 2019): p <- p - lr * wd * p, then Adam's step without L2.
    Fixes Adam's weight decay: decoupled from the gradient, every weight shrinks by the same factor
    1 - lr * wd per step whatever its gradient's size. GPT-2 is trained with it (GPT-3 appendix B)."""
    return adam_step(p * (1 - lr * weight_decay), grad, state, lr, betas, eps)


def parameter_kinds(named_parameters):
    """(embeddings, head, matrices, 1-D parameters): the parameters each group of configure_optimizers
    takes. The head is listed only if untied: tied, it is wte, one of the embeddings. The chat tokens'
    trained rows (token_rows.py) are rows of the embedding and of the head, and go with them."""
    embedding_names = ("transformer.wte.weight", "transformer.wpe.weight", "token_rows.embedding")
    head_names = ("lm_head.weight", "token_rows.head")
    kinds = ([], [], [], [])
    for name, p in named_parameters:
        kind = 0 if name in embedding_names else 1 if name in head_names else 2 if p.dim() >= 2 else 3
        kinds[kind].append(p)
    return kinds


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
    optimizer="adamw",
):
    """AdamW (or optimizer's rule) with weight decay on the matrices (matmul weights and embeddings) only.
    Biases and LayerNorm gains are 1-D: decaying them toward zero only hurts.

    The modern recipe splits the parameters into groups with LRs of their own: embed_lr for the
    embeddings, head_lr for an untied output layer (0: learning_rate), and, with muon_lr > 0,
    Muon for the blocks' matrices (then a MuonWithAdamW). Each group's "lr_scale" is its peak LR
    over learning_rate: the training loop sets lr = schedule * lr_scale (GPT-2's groups: 1.0).
    optimizer names the update rule of the groups Muon does not take (OPTIMIZERS; the lesson above);
    every rule gets the same groups, so weight decay stays off the 1-D parameters whichever it is."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    embeddings, head, matrices, no_decay = parameter_kinds(params.items())

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
    rest = build_optimizer(optimizer, adamw_groups, learning_rate, betas, eps, device_type)
    if not muon_lr:
        return rest
    # Muon (Jordan et al. 2024): momentum SGD whose update is orthogonalised by Newton-Schulz steps,
    # so that every direction of a matrix moves by the same amount. torch.optim.Muon scales the LR of
    # a (rows, cols) matrix by sqrt(max(1, rows / cols)). It is for 2-D hidden matrices only:
    # embeddings, the head and the biases stay with AdamW. c_attn's query, key and value weights are
    # one (3C, C) matrix here, orthogonalised together (modded-nanogpt does them one by one).
    muon = torch.optim.Muon([group(matrices, muon_lr)], lr=muon_lr, momentum=muon_momentum, weight_decay=weight_decay)
    return MuonWithAdamW(muon, rest)


# --optimizer's update rules for the groups Muon does not take (with --optimizer muon: AdamW).
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
MOMENTUM = 0.9  # momentum and nesterov: the classic value (Sutskever et al. 2013), torch has no default


# The floats each rule keeps per parameter between steps (float32, as the parameters): SGD none; one
# for momentum's velocity, AdaGrad's sum and RMSProp's average of squares; Adam's two moments. Muon
# keeps one momentum buffer for its matrices, and the rest is AdamW's. What --plan counts.
STATE_FLOATS = {"sgd": 0, "momentum": 1, "nesterov": 1, "adagrad": 1, "rmsprop": 1, "adam": 2, "adamw": 2}


def state_floats(optimizer, n_params, n_matrices):
    """The optimizer state's floats for n_params parameters, n_matrices of them in Muon's matrices."""
    if optimizer == "muon":
        return n_matrices + STATE_FLOATS["adamw"] * (n_params - n_matrices)
    return STATE_FLOATS[optimizer] * n_params


def build_optimizer(name, groups, learning_rate, betas, eps, device_type):
    """The torch.optim class of one lesson rule over the parameter groups. Each group's weight_decay is
    L2 (added to the gradient) for every rule but adamw, whose decay is decoupled."""
    # Fused CUDA kernels update all parameters in a few launches instead of one per tensor; torch has
    # them for SGD, Adam and AdamW (Adagrad's is CPU-only, RMSprop has none).
    fused = {"fused": True} if device_type == "cuda" else {}
    if name in ("sgd", "momentum", "nesterov"):
        momentum = 0.0 if name == "sgd" else MOMENTUM
        return torch.optim.SGD(groups, lr=learning_rate, momentum=momentum, nesterov=name == "nesterov", **fused)
    if name == "adagrad":  # eps: --adam_eps (torch's default is 1e-10); accumulator starts at 0
        return torch.optim.Adagrad(groups, lr=learning_rate, eps=eps)
    if name == "rmsprop":  # alpha 0.99: torch's default, v averages the last ~100 squared gradients
        return torch.optim.RMSprop(groups, lr=learning_rate, alpha=0.99, eps=eps)
    adam = torch.optim.AdamW if name == "adamw" else torch.optim.Adam  # betas, eps: --beta1, --beta2, --adam_eps
    return adam(groups, lr=learning_rate, betas=betas, eps=eps, **fused)


def make_optimizer(model, cfg, device_type):
    """cfg.optimizer's torch.optim rule, or Muon + AdamW, with each parameter group's peak LR from cfg."""
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
        optimizer="adamw" if cfg.optimizer == "muon" else cfg.optimizer,
    )


def state_bytes(optimizer):
    """Bytes of the tensors an optimizer keeps between steps (moments, momentum buffers, step counts):
    what its state_dict holds, as a checkpoint stores it."""
    state = optimizer.state_dict()["state"].values()
    return sum(t.numel() * t.element_size() for per_param in state for t in per_param.values() if torch.is_tensor(t))


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
    and Newton-Schulz needs whole matrices: train_gpt2.py refuses Muon with --parallel fsdp over several
    processes."""

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
