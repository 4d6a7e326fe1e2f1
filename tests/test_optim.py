"""optim.py: each update rule of the optimizer lesson takes the same steps as its torch.optim class,
weight decay and Adam's bias correction included; training runs and resumes with each --optimizer."""

import pytest
import torch
from test_train import losses, resumed_halfway, run, write_shards

import optim

STEPS = 5

# (lesson rule, its torch.optim class, the hyperparameters both take, torch's own extra arguments)
RULES = {
    "sgd": (optim.sgd_step, torch.optim.SGD, {"lr": 0.1, "weight_decay": 0.1}, {}),
    "momentum": (optim.sgd_momentum_step, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}, {}),
    "nesterov": (
        optim.nesterov_step,
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1},
        {"nesterov": True},
    ),
    "adagrad": (optim.adagrad_step, torch.optim.Adagrad, {"lr": 0.1, "eps": 1e-10, "weight_decay": 0.1}, {}),
    "rmsprop": (
        optim.rmsprop_step,
        torch.optim.RMSprop,
        {"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.1},
        {},
    ),
    "adam": (
        optim.adam_step,
        torch.optim.Adam,
        {"lr": 0.01, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1},
        {},
    ),
    "adamw": (
        optim.adamw_step,
        torch.optim.AdamW,
        {"lr": 0.01, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1},
        {},
    ),
}


@pytest.mark.parametrize("name", RULES)
def test_each_lesson_rule_takes_the_same_steps_as_torch_optim(name):
    rule, torch_class, hyper, extra = RULES[name]
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(8, 16, generator=generator)
    grads = [torch.randn(8, 16, generator=generator) for _ in range(STEPS)]  # a new gradient each step

    param = torch.nn.Parameter(start.clone())
    reference = torch_class([param], **hyper, **extra, foreach=False)
    p, state = start.clone(), {}
    for step, grad in enumerate(grads):
        param.grad = grad.clone()
        reference.step()
        before = (p.clone(), grad.clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()})
        p, state = rule(p, grad, state, **hyper)
        torch.testing.assert_close(p, param.detach(), msg=f"{name}, step {step}")
        assert torch.equal(before[0], p) is False  # it moved
        assert torch.equal(before[1], grad)  # and changed neither argument
    for key, value in state.items():  # the memory is torch's, under torch's names
        if key != "step":
            torch.testing.assert_close(value, reference.state[param][key], msg=f"{name}: {key}")


def test_adam_bias_correction_makes_the_first_step_lr_sized():
    """m / (1 - b1) and v / (1 - b2) are g and g^2 at step 1: every entry moves by lr (up to eps)."""
    p, grad = torch.zeros(100), torch.randn(100, generator=torch.Generator().manual_seed(0))
    p, _ = optim.adam_step(p, grad, {}, lr=0.01, betas=(0.9, 0.999), eps=1e-12)
    torch.testing.assert_close(p, -0.01 * grad.sign())


def test_adamw_decay_is_decoupled_and_adam_decay_is_not():
    """With a zero gradient AdamW shrinks p by exactly 1 - lr * wd; Adam's L2 goes through sqrt(v)."""
    p = torch.full((4,), 2.0)
    decayed, _ = optim.adamw_step(p, torch.zeros(4), {}, lr=0.01, weight_decay=0.1)
    torch.testing.assert_close(decayed, p * (1 - 0.01 * 0.1))
    l2, _ = optim.adam_step(p, torch.zeros(4), {}, lr=0.01, weight_decay=0.1)
    torch.testing.assert_close(l2, p - 0.01, atol=1e-6, rtol=0)  # a full lr-sized step: normalised away


@pytest.mark.parametrize("name", [n for n in optim.OPTIMIZERS if n != "adamw"])
def test_each_optimizer_builds_the_same_groups_as_adamw(name):
    from model import GPT, GPTConfig

    model = GPT(GPTConfig.from_name("tiny", block_size=32))
    adamw = optim.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu")
    other = optim.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu", optimizer=name)
    assert [(g["weight_decay"], g["lr_scale"], len(g["params"])) for g in other.param_groups] == [
        (g["weight_decay"], g["lr_scale"], len(g["params"])) for g in adamw.param_groups
    ]
    assert type(other).__name__.lower() == {"momentum": "sgd", "nesterov": "sgd"}.get(name, name)


@pytest.mark.parametrize("name", [*optim.OPTIMIZERS, "muon"])
def test_the_planned_optimizer_state_is_what_each_optimizer_keeps_after_a_step(name):
    """memory_plan counts optim.state_floats per parameter; a real optimizer, stepped once, keeps
    exactly those floats (its per-tensor step counters aside: a few bytes, not counted)."""
    from memory_plan import memory_plan, parameter_counts
    from model import GPT, GPTConfig

    config = GPTConfig.from_name("tiny", block_size=32)
    model = GPT(config)
    muon_lr = 0.02 if name == "muon" else 0.0
    rule = "adamw" if name == "muon" else name
    optimizer = optim.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu", muon_lr, optimizer=rule)
    model(torch.randint(0, config.vocab_size, (2, 16)), torch.randint(0, config.vocab_size, (2, 16)))[1].backward()
    optimizer.step()
    kept = [t for s in optimizer.state_dict()["state"].values() for t in s.values() if torch.is_tensor(t)]
    counters = [t for t in kept if t.dim() == 0]
    assert optim.state_bytes(optimizer) - sum(t.element_size() for t in counters) == sum(
        t.numel() * 4 for t in kept if t.dim() > 0
    )
    plan = memory_plan(config, 2, 16, 1, torch.float32, "ddp", False, optimizer=name)
    assert plan[f"optimizer ({name})"] == sum(t.numel() * t.element_size() for t in kept if t.dim() > 0)
    P, _, _, matrices = parameter_counts(config)
    assert plan[f"optimizer ({name})"] == {"sgd": 0, "muon": 4 * (matrices + 2 * (P - matrices))}.get(
        name, 4 * P * (2 if name.startswith("adam") else 1)
    )


# ---- training with each ----


@pytest.fixture
def data_dir(tmp_path):
    return write_shards(tmp_path / "data")


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"])
def test_training_runs_with_each_optimizer(data_dir, tmp_path, name):
    metrics = run(data_dir, tmp_path / name, "--max_steps", "3", "--eval_interval", "0", "--optimizer", name)
    assert sorted(losses(metrics)) == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses(metrics).values())


def test_momentum_resumes_bit_identically_from_a_checkpoint(data_dir, tmp_path):
    whole, resumed, part = resumed_halfway(data_dir, tmp_path, "--optimizer", "momentum")
    assert {s: v for s, v in losses(whole).items() if s >= 3} == losses(resumed)  # exact, every step
    assert losses(resumed, "val")[6] == losses(whole, "val")[6]
    with pytest.raises(SystemExit, match="was trained with --optimizer momentum, this run has nesterov"):
        run(data_dir, part, "--optimizer", "nesterov", "--max_steps", "9")
