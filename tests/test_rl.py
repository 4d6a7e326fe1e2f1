"""Tests for rl.py: the advantages and the loss against hand computations and the importance-ratio
form, the step's token normalisation over micro-steps and 2 gloo processes against one process and a
direct computation, batched rollouts against one at a time, exact resume, the errors, and the toy
task end to end (a tiny model fine-tuned first, so that its replies earn rewards)."""

import json
import math
import os
import socket
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import chat_eval
import checkpoint
import finetune
import rl
import toy_tasks
from chat_template import render_prompt
from completions import token_logprobs
from device import DistInfo, end_finished_rank, setup_precision
from errors import UserError
from model import GPT, GPTConfig
from tokenizer import get_tokenizer
from train_gpt2 import Run, train_step
from training_log import read_metrics

END = 50260  # gpt2-chat's <|end|>


def tiny(seed=0, vocab_size=50261, n_embd=32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=n_embd, block_size=64))


@pytest.fixture(scope="module")
def chat_tokenizer():
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        pytest.skip("set TIKTOKEN_CACHE_DIR to a folder holding the GPT-2 BPE files")
    return get_tokenizer("gpt2-chat")


def rollout(prompt, reply, reward):
    return rl.Rollout(prompt, rl.Reply(reply, "", reply[-1] != END), reward)


# Two prompts x 2 replies per micro-batch would hide a per-micro-batch normalisation: replies of
# different lengths, so that micro-batches hold different numbers of tokens.
STEP = [
    rollout([5, 6, 7], [11, 12, END], 1.0),
    rollout([5, 6, 7], [13, END], 0.0),
    rollout([8, 9], [14, 15, 16, 17, END], 0.0),
    rollout([8, 9], [18, END], 1.0),
    rollout([21, 22, 23, 24], [25, END], 1.0),
    rollout([21, 22, 23, 24], [26, 27, 28], 0.5),  # cut: no <|end|>
    rollout([29], [30, END], 0.25),
    rollout([29], [31, 32, 33, 34, 35, 36], 1.0),
]


def oracle_loss(model, rollouts, advantages):
    """-sum(A * log p(reply token)) / (reply tokens), written out: one row per rollout, one forward each."""
    total, n = 0.0, 0
    for r, a in zip(rollouts, advantages):
        ids = torch.tensor([r.prompt + r.reply.ids])
        logits, _ = model(ids[:, :-1])
        logp = F.log_softmax(logits.float(), dim=-1)[0]  # (T, V)
        start = len(r.prompt) - 1  # the position whose next token is the reply's first
        total = total - a * sum(logp[start + i, token] for i, token in enumerate(r.reply.ids))
        n += len(r.reply.ids)
    return total / n


# ---- advantages and the loss ------------------------------------------------------------------
def test_advantages_are_the_reward_minus_the_group_mean_and_over_the_group_std():
    rewards = [1, 0, 0, 1, 0, 0, 0, 1]
    a = rl.group_advantages(rewards, 4)
    assert a.tolist() == [0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75]  # means 0.5 and 0.25
    a = rl.group_advantages(rewards, 4, normalize_std=True)
    # population stds 0.5 and sqrt(3/16): (1 - 1/4) / sqrt(3)/4 = sqrt(3), -(1/4) / (sqrt(3)/4) = -1/sqrt(3)
    expected = [1, -1, -1, 1, -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), math.sqrt(3)]
    assert a.tolist() == pytest.approx(expected, rel=1e-5)
    assert rl.group_advantages([0.3, 0.3, 1, 1], 2, normalize_std=True).tolist() == [0, 0, 0, 0]


def test_a_step_whose_groups_all_score_the_same_gives_exactly_zero_gradient():
    model = tiny()
    same = [rl.Rollout(r.prompt, r.reply, 1.0 if i < 4 else 0.0) for i, r in enumerate(STEP)]  # per group equal
    for normalize_std in (False, True):
        for batch in rl.step_batches(same, 2, 4, normalize_std, 1, 0, "cpu"):
            loss, figures = rl.rl_loss(model, batch)
            loss.backward()
            assert figures["no_signal"].item() == 1.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_the_gradient_is_the_importance_ratio_forms_at_ratio_one_and_the_written_out_loss():
    """PPO/GRPO's surrogate exp(logp - logp_old) * A, with logp_old = logp (sampled by these weights,
    trained once): its gradient is A * grad logp, REINFORCE's."""
    torch.manual_seed(0)
    model = tiny(seed=1)
    (batch,) = rl.step_batches(STEP, 2, 8, False, 1, 0, "cpu")  # one micro-batch of all 8
    loss, _ = rl.rl_loss(model, batch)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits, _ = model(batch.x)
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, batch.y.clamp(min=0)[..., None])[..., 0]  # (B, L)
    ratio = torch.exp(logp - logp.detach())  # 1, with the gradient of logp
    mask = batch.y >= 0
    advantages = rl.group_advantages([r.reward for r in STEP], 2)[:, None]
    surrogate = -(ratio * advantages * mask).sum() / mask.sum()
    surrogate.backward()
    for a, b in zip(ours, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        assert loss.item() == pytest.approx(oracle_loss(model, STEP, advantages[:, 0].tolist()).item(), rel=1e-5)


def test_rows_train_on_the_reply_and_its_end_only_and_an_empty_micro_batch_is_zero_not_nan():
    (batch,) = rl.step_batches(STEP[:2], 2, 2, False, 1, 0, "cpu")
    assert batch.x.tolist() == [[5, 6, 7, 11, 12], [5, 6, 7, 13, 0]]  # right-padded with pad_id 0
    assert batch.y.tolist() == [[-1, -1, 11, 12, END], [-1, -1, 13, END, -1]]
    a = 0.5 / 5  # advantages +-0.5, over 5 reply tokens (one micro-step, one process)
    assert batch.weights.tolist() == [pytest.approx([0, 0, a, a, a]), pytest.approx([0, 0, -a, -a, 0])]
    assert batch.tokens == 5 + 4  # x's real tokens: prompt and reply but the last
    batch.y.fill_(-1)
    loss, _ = rl.rl_loss(tiny(), batch)
    assert loss.item() == 0.0


def test_the_kl_penalty_is_k3_of_the_reference_model_and_zero_against_the_model_itself():
    model, reference = tiny(seed=1), tiny(seed=2)
    (batch,) = rl.step_batches(STEP, 2, 8, False, 1, 0, "cpu")
    with torch.no_grad():
        batch.ref_logp = token_logprobs(reference, batch.x, batch.y)
    loss, figures = rl.rl_loss(model, batch, kl_beta=0.5)
    k3 = []  # exp(d) - d - 1, d = log q - log p of each reply token: one row at a time, log_softmax
    with torch.no_grad():
        for r in STEP:
            ids = torch.tensor([r.prompt + r.reply.ids])
            log_p = F.log_softmax(model(ids[:, :-1])[0].float(), dim=-1)[0]
            log_q = F.log_softmax(reference(ids[:, :-1])[0].float(), dim=-1)[0]
            for i, token in enumerate(r.reply.ids, start=len(r.prompt) - 1):
                d = (log_q[i, token] - log_p[i, token]).item()
                k3.append(math.exp(d) - d - 1)
        advantages = rl.group_advantages([r.reward for r in STEP], 2).tolist()
        policy_gradient = oracle_loss(model, STEP, advantages).item()
    assert figures["kl"].item() == pytest.approx(sum(k3) / len(k3), rel=1e-4)
    assert loss.item() == pytest.approx(policy_gradient + 0.5 * sum(k3) / len(k3), rel=1e-4)
    # the model against itself: the estimate is 0 and so is its gradient (1 - exp(0))
    batch.ref_logp = token_logprobs(model, batch.x, batch.y).detach()
    loss, figures = rl.rl_loss(model, batch, kl_beta=0.5)
    loss.backward()
    assert figures["kl"].item() == 0.0
    with_kl = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    rl.rl_loss(model, batch)[0].backward()
    for a, b in zip(with_kl, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


# ---- the normalisation over micro-steps and processes -----------------------------------------
class FixedLoader:
    """Micro-batches of hand-made rollouts, as RolloutLoader hands them out."""

    def __init__(self, batches):
        self.batches = batches

    def next_batch(self):
        batch = self.batches.pop(0)
        self.last_batch_tokens = batch.tokens
        return batch


def one_step(rank, world_size, model, train_model):
    """train_step on this rank's share of STEP, 2 replies per micro-batch: rank r of W takes the r-th
    of W equal shares, in 4 / W micro-steps. -> (loss, figures, gradients)."""
    share = len(STEP) // world_size
    batches = rl.step_batches(STEP[rank * share : (rank + 1) * share], 2, 2, False, world_size, 0, "cpu")
    job = SimpleNamespace(train_loader=FixedLoader(batches), loss=rl.rl_loss)
    run = Run(
        SimpleNamespace(grad_clip=1e9, cpu_offload=False),
        DistInfo(rank, rank, world_size, "cpu"),
        setup_precision("float32", "cpu"),
        None,
        None,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = train_step(run, job, train_model, model, optimizer, len(batches))
    return result.loss, result.figures, {name: p.grad for name, p in model.named_parameters()}


def normalisation_worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    init = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    model = tiny(seed=3)
    loss, figures, grads = one_step(rank, world_size, model, DDP(model))
    torch.save({"loss": loss, "figures": figures, "grads": grads}, f"{out_dir}/rank{rank}.pt")
    end_finished_rank()  # not destroy_process_group: gloo can abort there


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_take_the_step_of_one_process_with_accumulation_and_of_the_formula(tmp_path):
    """The same 8 rollouts (4 groups of 2, replies of 2 to 6 tokens): 1 process x 4 micro-steps, 2 gloo
    processes x 2 micro-steps (DDP, train_gpt2.train_step) and the written-out -sum(A log p) / N
    give the same loss and gradient. Per-rank sampling seeds make the two runs' own rollouts differ,
    so this feeds them the same ones."""
    model = tiny(seed=3)
    loss, figures, grads = one_step(0, 1, model, model)
    expected = tiny(seed=3)
    advantages = rl.group_advantages([r.reward for r in STEP], 2).tolist()
    oracle = oracle_loss(expected, STEP, advantages)
    oracle.backward()
    assert loss == pytest.approx(oracle.item(), abs=1e-6)
    for name, p in expected.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7)
    rewards = [r.reward for r in STEP]
    assert figures["reward"] == pytest.approx(sum(rewards) / 8)
    assert figures["no_signal"] == 0 and figures["cut"] == pytest.approx(2 / 8)
    assert figures["reply_len"] == pytest.approx(sum(len(r.reply.ids) for r in STEP) / 8)

    mp.spawn(normalisation_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        two = torch.load(tmp_path / f"rank{rank}.pt")
        assert two["loss"] == pytest.approx(loss, abs=1e-5)
        assert two["figures"] == pytest.approx(figures, abs=1e-6)
        for name in grads:
            torch.testing.assert_close(two["grads"][name], grads[name], rtol=1e-4, atol=1e-7)


# ---- rollouts ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("addition")
    for name, rows in toy_tasks.addition_files().items():
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.fixture(scope="module")
def toy_sft(tmp_path_factory, toy_data, chat_tokenizer):
    """A tiny model fine-tuned for a few steps on the toy task's SFT rows: it answers with a number
    and <|end|>, right some of the time, so that replies to one prompt earn different rewards."""
    folder = tmp_path_factory.mktemp("toy_sft")
    base = str(folder / "base.pt")
    checkpoint.save_checkpoint(base, checkpoint.model_checkpoint(tiny(vocab_size=50257), get_tokenizer("gpt2")))
    flags = "--batch_size 16 --seq_len 16 --total_batch_size 256 --device cpu --dtype float32 --compile 0"
    finetune.main(
        ["--init", base, "--data_files", str(toy_data / "sft.jsonl"), "--log_dir", str(folder), *flags.split()]
        + "--max_steps 40 --max_lr 2e-2 --warmup_steps 5 --eval_interval 0 --ckpt_interval 0".split()
    )
    return str(folder / "model_00040.pt")


def prompts_of(rows, tokenizer):
    return [render_prompt(row["messages"], tokenizer) for row in rows]


def test_batched_rollouts_are_the_replies_sampled_one_at_a_time_and_stop_at_end(toy_sft, chat_tokenizer):
    model = checkpoint.model_from_checkpoint(toy_sft).eval()
    rows = toy_tasks.addition_files()["heldout.jsonl"][:6]
    prompts = prompts_of(rows, chat_tokenizer)
    prompts[1] = render_prompt([{"role": "system", "content": "Add."}] + rows[1]["messages"], chat_tokenizer)  # longer
    batched = rl.sample_replies(model, prompts, 6, 0.0, None, chat_tokenizer)  # greedy: no randomness
    alone = [rl.sample_replies(model, [p], 6, 0.0, None, chat_tokenizer)[0] for p in prompts]
    assert batched == alone
    ended = [r for r in batched if not r.cut]
    assert ended and all(r.ids[-1] == END and r.text == chat_tokenizer.decode(r.ids[:-1]) for r in ended)
    results = rl.bench_rollouts(model, prompts[:3], 4, 6, 0.0, chat_tokenizer)
    assert list(results) == ["all at once", "a prompt at a time", "a reply at a time"]
    tokens = {mode: n for mode, (n, _) in results.items()}
    assert set(tokens.values()) == {4 * sum(len(r.ids) for r in alone[:3])}  # greedy: the same replies each way


# ---- end to end -------------------------------------------------------------------------------
FLAGS = (
    "--batch_size 8 --num_samples 4 --seq_len 16 --max_new_tokens 3 --total_batch_size 256 --device cpu "
    "--dtype float32 --compile 0 --max_lr 1e-3 --warmup_steps 0"
).split()


def rl_flags(toy_sft, toy_data, log_dir, *more):
    data = ["--data_files", str(toy_data / "prompts.jsonl"), "--val_files", str(toy_data / "heldout.jsonl")]
    return ["--init", toy_sft, *data, "--log_dir", str(log_dir), *FLAGS, *more]


def test_the_toy_task_trains_logs_its_figures_and_saves_a_checkpoint_chat_eval_loads(toy_sft, toy_data, tmp_path):
    log_dir = tmp_path / "rl"
    more = ["--max_steps", "4", "--eval_interval", "4", "--eval_samples", "2", "--kl_beta", "0.1"]
    rl.main(rl_flags(toy_sft, toy_data, log_dir, *more))
    metrics = read_metrics(log_dir / "metrics.jsonl")
    train = [m for m in metrics if m["kind"] == "train"]
    assert len(train) == 4
    for m in train:  # 2 micro-steps x 2 prompts x 4 replies
        assert 0 <= m["reward"] <= 1 and 0 <= m["no_signal"] <= 1 and 0 <= m["cut"] <= 1
        assert 1 <= m["reply_len"] <= 3 and math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
    assert any(0 < m["reward"] < 1 and m["no_signal"] < 1 for m in train)  # some groups had something to learn
    assert train[0]["kl"] == 0 and all(m["kl"] > 0 for m in train[1:])  # the reference is the model at step 0
    val = [m for m in metrics if m["kind"] == "val"]
    assert [m["step"] for m in val] == [0, 4] and all({"greedy_acc", "pass@1", "pass@2"} <= set(m) for m in val)
    # the checkpoint is a chat model's (sample.py, chat.py, chat_eval.py load it): evaluated on its own,
    # the held-out prompts get the accuracy the run logged
    saved = checkpoint.load_checkpoint(str(log_dir / "model_00004.pt"))
    assert saved["tokenizer"]["name"] == "gpt2-chat" and saved["template"]["name"] == "chat-v1"
    heldout = str(toy_data / "heldout.jsonl")
    flags = ["--checkpoint", str(log_dir / "model_00004.pt"), "--task", "rows", "--data_file", heldout]
    results = chat_eval.main([*flags, "--max_new_tokens", "3", "--device", "cpu", "--batch_size", "8"])
    assert results["rows"]["greedy_acc"] == val[-1]["greedy_acc"]


@pytest.mark.parametrize("peft", ["--lora_rank 4 --base_quant nf4", "--peft prefix --prefix_len 2 --base_quant int8"])
def test_on_a_quantized_base_or_with_prefixes_the_kl_reference_is_the_model_at_step_0(
    toy_sft, toy_data, tmp_path, peft
):
    """--kl_beta's reference is a frozen copy of the policy as training starts it: the quantized --init
    (with adapters that change nothing yet), or --init with its initial prefixes. Its KL at step 0 is
    exactly 0, then the policy moves away; the checkpoint records what the run trained."""
    log_dir = tmp_path / "rl"
    more = ["--max_steps", "3", "--eval_interval", "0", "--kl_beta", "0.1", "--max_lr", "3e-2", *peft.split()]
    rl.main(rl_flags(toy_sft, toy_data, log_dir, *more))
    train = [m for m in read_metrics(log_dir / "metrics.jsonl") if m["kind"] == "train"]
    assert train[0]["kl"] == 0 and all(m["kl"] > 0 for m in train[1:])
    saved = checkpoint.load_checkpoint(str(log_dir / "model_00003.pt"))
    assert saved["base_quant"] == ("nf4" if "nf4" in peft else "int8")
    assert (saved["prefix"], saved["lora"] is not None) == (({"len": 2}, False) if "prefix" in peft else (None, True))


def test_a_resumed_run_makes_the_same_rollouts_and_losses_as_an_uninterrupted_one(
    toy_sft, toy_data, tmp_path, monkeypatch
):
    # a reward of your own (--reward module:function) that nearly every group's replies differ on
    (tmp_path / "lengths.py").write_text("def reward(reply, row):\n    return min(len(reply), 4) / 4\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    more = ["--max_steps", "4", "--eval_interval", "0", "--reward", "lengths:reward"]
    rl.main(rl_flags(toy_sft, toy_data, tmp_path / "a", *more, "--ckpt_interval", "2"))
    (tmp_path / "b").mkdir()
    os.replace(tmp_path / "a" / "model_00002.pt", tmp_path / "b" / "model_00002.pt")
    rl.main(rl_flags(toy_sft, toy_data, tmp_path / "b", *more))

    def figures(log_dir):
        train = [m for m in read_metrics(log_dir / "metrics.jsonl") if m["kind"] == "train" and m["step"] >= 2]
        return [(m["step"], m["loss"], m["reward"], m["reply_len"], m["grad_norm"]) for m in train]

    whole = figures(tmp_path / "a")
    assert len(whole) == 2 and all(loss != 0 for _, loss, *_ in whole)
    assert figures(tmp_path / "b") == whole


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "more, message",
    [
        (["--batch_size", "6"], "--batch_size 6 is not a multiple of --num_samples 4: .* pass --batch_size 4"),
        (["--reward", "fuzzy"], "--reward fuzzy: choose exact, contains, gsm8k, or module:function"),
        (["--reward", "no_such_module:score"], "--reward no_such_module:score: cannot import no_such_module"),
        (["--reward", "json:no_such_function"], "--reward json:no_such_function: json has no function"),
        (["--max_new_tokens", "8"], r"training prompts: 80 prompt\(s\) longer than --seq_len 16 - --max_new_tokens 8"),
        (["--temperature", "0"], "--temperature 0.0: replies must be sampled"),
        (["--total_batch_size", "8192"], "80 training prompts, fewer than one step's 128"),
    ],
)
def test_what_cannot_make_a_step_is_one_message_before_anything_is_written(toy_sft, toy_data, tmp_path, more, message):
    with pytest.raises(SystemExit, match=message):
        rl.main(rl_flags(toy_sft, toy_data, tmp_path / "x", "--max_steps", "1", *more))
    assert not (tmp_path / "x").exists()


def test_rewards_outside_0_1_and_fsdp_on_several_processes_are_refused(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def double(reply, row):\n    return 2.0\n\ndef nan(reply, row):\n    return float('nan')\n\n"
        "def length(reply, row):\n    return len(reply) / 10\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rl.reward_function("my_rewards:length")("abcd", {}) == 0.4
    assert rl.reward_function("contains")("it is 7.", {"answer": "7"}) == 1.0
    for name, shown in (("double", "2.0"), ("nan", "nan")):
        with pytest.raises(UserError, match=f"--reward my_rewards:{name} gave {shown} for the reply 'x': rewards must"):
            rl.reward_function(f"my_rewards:{name}")("x", {})
    cfg = rl.RLConfig(parallel="fsdp")
    with pytest.raises(UserError, match="--parallel fsdp: sampling the replies needs the whole model"):
        rl.check_rl_config(cfg, world_size=2)
    rl.check_rl_config(cfg, world_size=1)  # one process: nothing is sharded
