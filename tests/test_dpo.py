"""Tests for dpo.py and completions.py: DPO's loss and gradient against the formula by hand, a batch's
figures against log-softmax by hand, reply log-probs against Hugging Face transformers, the pairs'
rows against the chat template, and DPO end to end on the training loop: ln 2 at step 0, learning the
toy task's preferences, exact resume with LoRA, two processes equal to one."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

import checkpoint
import dpo
import toy_tasks
from chat_template import render_conversation, render_prompt
from completions import chat_reply_row, pad_rows, reply_logprobs
from hf import from_pretrained
from model import GPT, GPTConfig
from tokenizer import get_tokenizer
from training_log import read_metrics

USER, ASSISTANT, END, EOT = 50258, 50259, 50260, 50256  # gpt2-chat's ids
LN2 = math.log(2)


@pytest.fixture(scope="module")
def chat_tokenizer():
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        pytest.skip("set TIKTOKEN_CACHE_DIR to a folder holding the GPT-2 BPE files")
    return get_tokenizer("gpt2-chat")


@pytest.fixture
def base_checkpoint(tmp_path, chat_tokenizer):
    """A tiny random 'pretrained' model, as train_gpt2.py writes it (the GPT-2 tokenizer: 50,257 ids)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, n_layer=2, n_head=2, n_embd=64, block_size=64))
    path = str(tmp_path / "base.pt")
    checkpoint.save_checkpoint(path, checkpoint.model_checkpoint(model, get_tokenizer("gpt2")))
    return path


@pytest.fixture
def toy_pairs(tmp_path):
    """toy_tasks.py's 80 DPO pairs: "What is a + b?", the right sum chosen, the sum + 1 rejected."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in toy_tasks.addition_files()["pairs.jsonl"]))
    return str(path)


FLAGS = (
    "--batch_size 8 --seq_len 32 --total_batch_size 256 --device cpu --dtype float32 --compile 0 --warmup_steps 2 "
    "--log_interval 10"
).split()


def records(log_dir, kind):
    return [m for m in read_metrics(log_dir / "metrics.jsonl") if m["kind"] == kind]


# ---- the loss ----------------------------------------------------------------------------------
def test_dpo_loss_and_its_gradient_equal_the_formula():
    beta = 0.1
    logp_c, logp_r, ref_c, ref_r = [-12.0, -3.5], [-15.0, -2.0], [-13.0, -3.0], [-14.0, -2.5]  # two pairs
    a, b = torch.tensor(logp_c, requires_grad=True), torch.tensor(logp_r, requires_grad=True)
    loss, chosen_reward, rejected_reward = dpo.preference_loss(a, b, torch.tensor(ref_c), torch.tensor(ref_r), beta)
    loss.sum().backward()
    for i in range(2):
        margin = beta * ((logp_c[i] - ref_c[i]) - (logp_r[i] - ref_r[i]))  # pair 0: 0.1 * (1 - (-1)) = 0.2
        sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
        assert loss[i].item() == pytest.approx(-math.log(sigmoid(margin)), rel=1e-6)
        assert chosen_reward[i].item() == pytest.approx(beta * (logp_c[i] - ref_c[i]), rel=1e-6)
        assert rejected_reward[i].item() == pytest.approx(beta * (logp_r[i] - ref_r[i]), rel=1e-6)
        assert a.grad[i].item() == pytest.approx(-beta * sigmoid(-margin), rel=1e-6)
        assert b.grad[i].item() == pytest.approx(beta * sigmoid(-margin), rel=1e-6)
    assert loss[0].item() == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-6)  # 0.5981


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are a parameter: the log-probs of any token are known by hand."""

    def __init__(self, rows, length, vocab_size):
        super().__init__()
        self.logits = torch.nn.Parameter(
            torch.randn(rows, length, vocab_size, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, x):
        return self.logits[:, : x.size(1)], None


def test_a_batch_of_pairs_scores_the_replies_tokens_chosen_rows_first_with_rpo():
    beta, rpo_alpha, V = 0.5, 0.7, 11
    # two pairs: chosen rows 0-1, rejected rows 2-3; y is -1 on the prompt and the padding
    y = torch.tensor([[-1, 3, 4, -1], [-1, -1, 5, -1], [-1, 6, -1, -1], [-1, 7, 8, 9]])
    x = torch.zeros_like(y)
    ref = torch.tensor([-4.0, -2.5, -3.0, -6.0])
    model = FixedLogits(4, 4, V)
    loss, figures = dpo.dpo_loss(model, (x, y, ref), beta, rpo_alpha)
    loss.backward()
    logprobs = torch.log_softmax(model.logits.detach().double(), dim=-1)  # (4, 4, V)
    logp = [sum(logprobs[b, t, y[b, t]].item() for t in range(4) if y[b, t] >= 0) for b in range(4)]
    n_tokens = [2, 1]  # the chosen replies' targets
    expected, rewards = 0.0, []
    for i in range(2):
        chosen, rejected = beta * (logp[i] - ref[i].item()), beta * (logp[2 + i] - ref[2 + i].item())
        rewards.append((chosen, rejected))
        expected += (math.log(1 + math.exp(-(chosen - rejected))) + rpo_alpha * -logp[i] / n_tokens[i]) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert figures["chosen_reward"].item() == pytest.approx(sum(c for c, _ in rewards) / 2, rel=1e-5)
    assert figures["rejected_reward"].item() == pytest.approx(sum(r for _, r in rewards) / 2, rel=1e-5)
    assert figures["margin"].item() == pytest.approx(sum(c - r for c, r in rewards) / 2, rel=1e-5)
    assert figures["accuracy"].item() == sum(c > r for c, r in rewards) / 2
    assert figures["nll"].item() == pytest.approx(sum(-logp[i] / n_tokens[i] for i in range(2)) / 2, rel=1e-5)
    # no gradient reaches a position that is no target (the prompt, the padding)
    untouched = (y < 0).unsqueeze(-1).expand(-1, -1, V)
    assert model.logits.grad[untouched].abs().max().item() == 0.0
    assert model.logits.grad[~untouched].abs().max().item() > 0.0


# ---- the rows ----------------------------------------------------------------------------------
def test_reply_logprobs_equal_those_of_transformers(tmp_path, chat_tokenizer):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50261, n_positions=64, n_embd=48, n_layer=2, n_head=4)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    hf_model.save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path)).eval()
    prompts = [
        [{"role": "user", "content": "What is 3 + 4?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
    ]
    replies = ["7", "Paris, a city on the Seine."]
    rows = [chat_reply_row(prompt, reply, chat_tokenizer) for prompt, reply in zip(prompts, replies)]
    x, y = pad_rows(rows, EOT, "cpu")
    with torch.no_grad():
        ours = reply_logprobs(model, x, y)
        for i, (prompt, reply) in enumerate(zip(prompts, replies)):
            prompt_ids = render_prompt(prompt, chat_tokenizer)
            ids, _ = render_conversation([*prompt, {"role": "assistant", "content": reply}], chat_tokenizer)
            logprobs = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), dim=-1)
            # the reply's tokens and its <|end|>: ids[len(prompt_ids):], each predicted one position before
            theirs = sum(logprobs[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids)))
            assert ids[-1] == END and ours[i].item() == pytest.approx(theirs, abs=1e-4)


def test_chosen_and_rejected_share_the_prompt_ids_of_the_chat_template_in_every_format(chat_tokenizer, gpt2_tokenizer):
    prompt = [{"role": "user", "content": "What is 3 + 4?"}]
    forms = [
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "7"}],
            "rejected": [{"role": "assistant", "content": "8"}],
        },
        {"prompt": "What is 3 + 4?", "chosen": "7", "rejected": "8"},
        {
            "chosen": [*prompt, {"role": "assistant", "content": "7"}],
            "rejected": [*prompt, {"role": "assistant", "content": "8"}],
        },
    ]
    counts = {}
    pairs = list(dpo.pair_rows(forms, chat_tokenizer, 32, counts))
    assert counts == {} and len(pairs) == 3
    prompt_ids = [EOT, USER, *gpt2_tokenizer.encode("What is 3 + 4?"), END, ASSISTANT]  # written out by hand
    for pair in pairs:
        for row, answer in ((pair.chosen, "7"), (pair.rejected, "8")):
            x, y = row
            reply = [*gpt2_tokenizer.encode(answer), END]
            assert x == prompt_ids + reply[:-1]
            assert y == [-1] * (len(prompt_ids) - 1) + reply
        assert pair.chosen[0][: len(prompt_ids)] == pair.rejected[0][: len(prompt_ids)]
        whole, _ = render_conversation([*prompt, {"role": "assistant", "content": "7"}], chat_tokenizer)
        assert pair.chosen[0] == whole[:-1]  # the ids fine-tuning trains on, for the same conversation


def test_malformed_pairs_are_skipped_and_long_ones_cut_with_counts(chat_tokenizer):
    user = [{"role": "user", "content": "hi"}]
    rows = [
        {"prompt": "hi", "chosen": "a", "rejected": "b"},  # kept
        {"prompt": "hi", "completion": "a"},
        "plain text",
        {"prompt": "hi", "chosen": "same", "rejected": "same"},
        {"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
        {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
        {"prompt": 5, "chosen": "a", "rejected": "b"},
        {"chosen": [*user, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "?"}]},
        {"prompt": "word " * 40, "chosen": "a", "rejected": "b"},  # no reply token within 32
        {"prompt": "hi", "chosen": "ok " * 40, "rejected": "ok " * 39 + "no"},  # the same within 32
        {"prompt": "hi", "chosen": "a " * 40, "rejected": "b " * 40},  # cut, kept
    ]
    counts = {}
    pairs = list(dpo.pair_rows(rows, chat_tokenizer, 32, counts))
    assert len(pairs) == 2 and len(pairs[1].chosen[0]) == len(pairs[1].rejected[0]) == 32
    assert counts == {
        "no `chosen` and `rejected`": 2,
        "`chosen` and `rejected` are the same reply: nothing to prefer": 1,
        "`chosen` and `rejected` must each be a reply: a string, or [one assistant message]": 1,
        "the prompt and its reply: the roles must alternate user, assistant, user, ... (after an optional system "
        "message)": 1,
        "`prompt` must be a string or a list of messages": 1,
        "no `prompt`, and `chosen` and `rejected` are not conversations that differ in their last turn only": 1,
        "a reply with no token within --seq_len": 1,
        "`chosen` and `rejected` the same within --seq_len": 1,
        "cut to --seq_len (kept)": 1,
    }


# ---- end to end --------------------------------------------------------------------------------
def test_dpo_starts_at_ln2_and_learns_the_toy_tasks_preferences(base_checkpoint, toy_pairs, tmp_path, chat_tokenizer):
    """A tiny random model, trained on toy_tasks.py's pairs and validated on the same pairs: at step 0
    the model is its own reference (loss ln 2, no reply wins), then the right sums win."""
    log_dir = tmp_path / "dpo"
    learn = "--beta 1.0 --max_lr 3e-2 --batch_size 16 --total_batch_size 512 --max_steps 30 --eval_interval 15".split()
    argv = ["--init", base_checkpoint, "--data_files", toy_pairs, "--val_files", toy_pairs, "--log_dir", str(log_dir)]
    dpo.main([*argv, *FLAGS, *learn])
    train, val = records(log_dir, "train"), records(log_dir, "val")
    assert train[0]["loss"] == pytest.approx(LN2, abs=1e-7)
    assert val[0]["loss"] == pytest.approx(LN2, abs=1e-7)
    for first in (train[0], val[0]):  # the reference is the model: the same numbers, bit for bit
        assert first["chosen_reward"] == first["rejected_reward"] == first["margin"] == first["accuracy"] == 0.0
    assert [v["step"] for v in val] == [0, 15, 30]
    assert 0 < val[1]["margin"] < val[2]["margin"] and val[2]["margin"] > 0.4  # 0.42, 0.52
    assert 0.6 < val[1]["accuracy"] < val[2]["accuracy"] and val[2]["accuracy"] > 0.8  # 0.78, 0.84
    assert val[2]["loss"] < 0.55  # 0.51
    first, last = train[1:11], train[-10:]
    assert sum(m["accuracy"] for m in first) / 10 < 0.6 < 0.7 < sum(m["accuracy"] for m in last) / 10  # 0.43, 0.79
    assert all(m["margin"] > 0 for m in last)
    # the checkpoint is a chat model as finetune.py writes them: sample.py, chat.py and chat_eval.py load it
    saved = checkpoint.load_checkpoint(str(log_dir / "model_00030.pt"))
    assert saved["template"]["name"] == "chat-v1" and saved["tokenizer"]["name"] == "gpt2-chat"
    assert saved["init"]["path"] == base_checkpoint and saved["lora"] is None
    assert checkpoint.model_from_checkpoint(str(log_dir / "model_00030.pt")).config.vocab_size == 50261


def test_lora_starts_at_ln2_and_resumes_exactly(base_checkpoint, toy_pairs, tmp_path):
    """With LoRA the model at step 0 is the --init model (B = 0): the reference. A run interrupted at
    step 3 and resumed takes the same steps, bit for bit, as one that was not."""
    common = ["--init", base_checkpoint, "--data_files", toy_pairs, *FLAGS, "--lora_rank", "4", "--max_lr", "1e-2"]
    common += ["--rpo_alpha", "0.5", "--eval_interval", "3"]
    dpo.main([*common, "--log_dir", str(tmp_path / "a"), "--max_steps", "6", "--ckpt_interval", "3"])
    whole = records(tmp_path / "a", "train")
    assert whole[0]["loss"] - 0.5 * whole[0]["nll"] == pytest.approx(LN2, abs=1e-6)  # RPO's term on top of ln 2
    assert whole[0]["margin"] == whole[0]["accuracy"] == 0.0
    (tmp_path / "b").mkdir()
    os.replace(tmp_path / "a" / "model_00003.pt", tmp_path / "b" / "model_00003.pt")
    dpo.main([*common, "--log_dir", str(tmp_path / "b"), "--max_steps", "6"])
    resumed = records(tmp_path / "b", "train")
    figures = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "nll", "grad_norm")
    assert [[m[f] for f in figures] for m in resumed] == [[m[f] for f in figures] for m in whole[3:]]
    assert [m["step"] for m in resumed] == [3, 4, 5]
    assert records(tmp_path / "b", "val")[-1] == records(tmp_path / "a", "val")[-1]
    assert checkpoint.load_checkpoint(str(tmp_path / "b" / "model_00006.pt"))["lora"]["rank"] == 4


@pytest.mark.parametrize(
    "peft",
    [
        "--lora_rank 4 --base_quant nf4",
        "--peft prefix --prefix_len 2",
        "--peft prefix --prefix_len 2 --base_quant int8",
    ],
)
def test_on_a_quantized_base_or_with_prefixes_the_reference_is_the_model_at_step_0(
    base_checkpoint, toy_pairs, tmp_path, peft
):
    """The reference is where the policy starts: the quantized --init, or --init with its initial
    prefixes. So step 0 is ln 2 with no reply winning, bit for bit, although the float --init's
    log-probs of the same replies differ; then the policy moves away from it."""
    log_dir = tmp_path / "dpo"
    common = ["--init", base_checkpoint, "--data_files", toy_pairs, *FLAGS, *peft.split(), "--max_lr", "3e-2"]
    dpo.main([*common, "--max_steps", "4", "--eval_interval", "4", "--log_dir", str(log_dir)])
    train, val = records(log_dir, "train"), records(log_dir, "val")
    for first in (train[0], val[0]):
        assert first["loss"] == pytest.approx(LN2, abs=1e-7)
        assert first["chosen_reward"] == first["rejected_reward"] == first["margin"] == 0.0
    assert val[-1]["step"] == 4 and val[-1]["margin"] != 0.0 and train[-1]["loss"] != pytest.approx(LN2, abs=1e-4)
    saved = checkpoint.load_checkpoint(str(log_dir / "model_00004.pt"))
    assert saved["base_quant"] == ("nf4" if "nf4" in peft else "int8" if "int8" in peft else None)
    assert (saved["prefix"] is not None) == ("prefix" in peft)
    # the float --init scores the replies otherwise: a reference taken from it would not start at ln 2
    tokenizer = get_tokenizer("gpt2-chat")
    x, y = pad_rows([chat_reply_row([{"role": "user", "content": "What is 2 + 3?"}], "5", tokenizer)], EOT, "cpu")
    start = checkpoint.adapt(checkpoint.load_init(base_checkpoint, 50261), saved, init=True)
    with torch.no_grad():
        float_init = checkpoint.load_init(base_checkpoint, 50261)
        assert not torch.equal(reply_logprobs(start, x, y), reply_logprobs(float_init, x, y))


@pytest.mark.parametrize("peft", ["", "--peft prefix --prefix_len 2 --base_quant nf4"])
def test_two_processes_train_as_one_process_with_accumulation(base_checkpoint, toy_pairs, tmp_path, peft):
    """2 gloo processes x 1 micro-step of 4 pairs take the same steps as 1 process x 2 micro-steps;
    the validation figures are the same, each process reading its share of the held-out pairs (on a
    prefix-tuned quantized policy too: each process computes the references of its batches with it)."""
    flags = ["--init", base_checkpoint, "--data_files", toy_pairs, *FLAGS, "--max_steps", "3", "--max_lr", "1e-2"]
    flags += "--batch_size 4 --total_batch_size 256 --val_fraction 0.1 --eval_interval 3".split() + peft.split()
    dpo.main([*flags, "--log_dir", str(tmp_path / "one")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*torchrun, str(REPO / "dpo.py"), *flags, "--log_dir", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy")
    for kind in ("train", "val"):
        one, two = records(tmp_path / "one", kind), records(tmp_path / "two", kind)
        assert len(one) == len(two) == (3 if kind == "train" else 2)
        for a, b in zip(one, two):
            assert [b[f] for f in figures] == pytest.approx([a[f] for f in figures], abs=1e-5)
    assert records(tmp_path / "one", "train")[-1]["loss"] != pytest.approx(LN2, abs=1e-3)  # the steps moved it


# ---- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rows, flags, message",
    [
        ([{"messages": [{"role": "user", "content": "hi"}]}] * 5, [], r"no usable preference pairs \(5 row\(s\)"),
        ([{"prompt": "hi", "chosen": "a", "rejected": "a"}] * 5, [], "are the same reply"),
        ([{"prompt": "hi", "chosen": "a", "rejected": "b"}] * 5, ["--beta", "0"], "--beta 0.0: it must be above 0"),
        ([{"prompt": "hi", "chosen": "a", "rejected": "b"}] * 5, ["--beta", "-1"], "--beta -1.0: it must be above 0"),
    ],
)
def test_no_pairs_and_a_beta_of_zero_or_less_are_one_message_each(tmp_path, base_checkpoint, rows, flags, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["--init", base_checkpoint, "--data_files", str(path), "--log_dir", str(tmp_path / "x"), *FLAGS, *flags]
    with pytest.raises(SystemExit, match=message):
        dpo.main(argv)
    assert not (tmp_path / "x").exists()  # nothing written
