"""Tests for finetune.py, chat_template.py and lora.py: the chat rendering and its loss mask against
an independent rendering, the rows and their errors, LoRA's algebra, and fine-tuning end to end: a
tiny model learns facts it cannot know from pretraining and answers them through the chat template."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

import chat_template
import checkpoint
import finetune
from errors import UserError
from generate import generate_stream
from lora import LoRALinear, apply_lora, merge_lora
from model import GPT, GPTConfig
from tokenizer import get_tokenizer
from training_log import read_metrics

SYSTEM, USER, ASSISTANT, END, EOT = 50257, 50258, 50259, 50260, 50256  # gpt2-chat's ids

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(scope="module")
def chat_tokenizer():
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        pytest.skip("set TIKTOKEN_CACHE_DIR to a folder holding the GPT-2 BPE files")
    return get_tokenizer("gpt2-chat")


# ---- the template -------------------------------------------------------------------------------
def test_rendering_and_loss_mask_equal_an_independent_rendering(chat_tokenizer, gpt2_tokenizer):
    enc = gpt2_tokenizer  # tiktoken's GPT-2; the template's ids written out by hand
    given = lambda text: [(t, False) for t in enc.encode(text)]  # noqa: E731
    said = lambda text: [(t, True) for t in enc.encode(text)]  # noqa: E731
    pairs = (  # (token, is it a target)
        [(EOT, False), (SYSTEM, False)]
        + given("Be brief.")
        + [(END, False)]
        + [(USER, False)]
        + given("Capital of France?")
        + [(END, False)]
        + [(ASSISTANT, False)]
        + said("Paris.")
        + [(END, True)]
        + [(USER, False)]
        + given("And of Italy?")
        + [(END, False)]
        + [(ASSISTANT, False)]
        + said("Rome.")
        + [(END, True)]
    )
    ids, train = chat_template.render_conversation(CONVERSATION, chat_tokenizer)
    assert ids == [token for token, _ in pairs]
    assert finetune.targets_of(ids, train) == [token if target else -1 for token, target in pairs[1:]]
    assert chat_tokenizer.decode(ids).startswith("<|endoftext|><|system|>Be brief.<|end|><|user|>Capital")
    prompt = chat_template.render_prompt(CONVERSATION[:2], chat_tokenizer)
    first_two_turns = 5 + len(enc.encode("Be brief.")) + len(enc.encode("Capital of France?"))  # to the user's <|end|>
    assert prompt == [token for token, _ in pairs[:first_two_turns]] + [ASSISTANT]


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([], "non-empty list"),
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([{"role": "assistant", "content": "hi"}], "must alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
        ([{"role": "bot", "content": "a"}], "each message needs a role"),
        ([{"role": "user", "content": 5}], "each message needs a role"),
    ],
)
def test_a_conversation_that_cannot_be_trained_on_says_why(messages, problem):
    assert problem in chat_template.check_conversation(messages)


def test_instruction_rows_are_one_user_and_one_assistant_turn():
    row = {"instruction": "Add.", "input": "2 + 2", "output": "4"}
    assert finetune.conversation_of(row) == [
        {"role": "user", "content": "Add.\n\n2 + 2"},
        {"role": "assistant", "content": "4"},
    ]
    assert finetune.conversation_of({"instruction": "Hi.", "output": "Hello."})[0]["content"] == "Hi."


def test_long_conversations_are_cut_and_rows_without_targets_dropped_with_counts(chat_tokenizer):
    long = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok " * 50}]
    no_room = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    bad = [{"role": "user", "content": "no reply"}]
    counts = {}
    rows = list(
        finetune.chat_rows(
            [{"messages": long}, {"messages": no_room}, {"messages": bad}, {"text": "x"}], chat_tokenizer, 64, counts
        )
    )
    assert len(rows) == 1 and len(rows[0][0]) == 64 and len(rows[0][1]) == 64
    assert counts == {
        "cut to --seq_len (kept)": 2,
        "no assistant token within --seq_len": 1,
        "no assistant turn: nothing to learn from": 1,
        "no `messages`, instruction or text": 1,
    }


# ---- LoRA ---------------------------------------------------------------------------------------
def tiny(seed=0, vocab_size=50261, n_embd=32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=n_embd, block_size=64))


def test_lora_starts_at_the_base_model_trains_only_adapters_and_merges_to_the_same_logits():
    base = tiny()
    idx = torch.randint(0, 50261, (2, 16))
    with torch.no_grad():
        expected = base(idx)[0]
    model = apply_lora(tiny(), rank=4, alpha=8, targets=["attn", "mlp"])
    with torch.no_grad():
        assert torch.equal(model(idx)[0], expected)  # B = 0: exactly the base model at step 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    C, r = 32, 4  # per block: c_attn C -> 3C, c_proj C -> C, c_fc C -> 4C, mlp c_proj 4C -> C; r x (in + out) each
    assert trainable == 2 * r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 8
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_()  # as if trained
        unmerged = model(idx)[0]
        merged = merge_lora(model)(idx)[0]
    assert not torch.allclose(unmerged, expected)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_an_unknown_lora_target_is_refused():
    with pytest.raises(UserError, match="--lora_targets attn,ffn: choose from attn, mlp"):
        apply_lora(tiny(), 4, 8, ["attn", "ffn"])


# ---- end to end ---------------------------------------------------------------------------------
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy"]
WORDS = ["blue", "seven", "river", "maple", "quartz", "tiger", "lemon", "cloud", "piano", "ember"]


def question(name):
    return f"What is {name}'s secret word?"


def write_secret_words(path, people, repeats):
    """Facts no pretraining could teach: each of the first `people` persons' secret word, asked in a
    user turn, `repeats` times each, as chat rows in path."""
    with open(path, "w") as f:
        for name, word in list(zip(NAMES, WORDS))[:people]:
            for _ in range(repeats):
                messages = [
                    {"role": "user", "content": question(name)},
                    {"role": "assistant", "content": f"{name}'s secret word is {word}."},
                ]
                f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture
def chat_data(tmp_path):
    return write_secret_words(tmp_path / "chat.jsonl", len(NAMES), repeats=4)


@pytest.fixture
def base_checkpoint(tmp_path, chat_tokenizer):
    """A tiny 'pretrained' model, as train_gpt2.py writes it (the GPT-2 tokenizer: 50,257 ids)."""
    path = str(tmp_path / "base.pt")
    model = tiny(vocab_size=50257, n_embd=64)
    checkpoint.save_checkpoint(path, checkpoint.model_checkpoint(model, get_tokenizer("gpt2")))
    return path


FLAGS = (
    "--batch_size 4 --seq_len 32 --total_batch_size 128 --device cpu --dtype float32 --compile 0 "
    "--val_fraction 0.05 --eval_interval 0 --warmup_steps 10"
).split()


def answer(model, tokenizer, name):
    prompt = chat_template.render_prompt([{"role": "user", "content": question(name)}], tokenizer)
    end = tokenizer.special("<|end|>")
    tokens = [t.item() for t in generate_stream(model, [prompt], 20, temperature=0, eot=end)]
    return tokenizer.decode([t for t in tokens if t != end]), end in tokens


def test_fine_tuning_teaches_facts_answered_through_the_chat_template(
    chat_data, base_checkpoint, tmp_path, chat_tokenizer
):
    log_dir = tmp_path / "sft"
    finetune.main(
        [
            "--init",
            base_checkpoint,
            "--data_files",
            str(chat_data),
            "--log_dir",
            str(log_dir),
            "--max_steps",
            "200",
            "--max_lr",
            "3e-3",
            *FLAGS,
        ]
    )
    saved = checkpoint.load_checkpoint(str(log_dir / "model_00200.pt"))
    assert saved["template"]["name"] == "chat-v1" and saved["tokenizer"]["name"] == "gpt2-chat"
    assert saved["config"]["vocab_size"] == 50261  # the chat tokens, in rows the base's embedding had
    model = checkpoint.model_from_checkpoint(str(log_dir / "model_00200.pt")).eval()
    answers = [answer(model, chat_tokenizer, name) for name in NAMES]
    right = sum(text == f"{name}'s secret word is {word}." for (text, _), name, word in zip(answers, NAMES, WORDS))
    assert right >= 9, answers  # at least 90% of the questions
    assert all(stopped for _, stopped in answers)  # it learned to end its turn


def test_lora_training_leaves_the_base_weights_bit_identical_and_resumes_exactly(
    chat_data, base_checkpoint, tmp_path, monkeypatch
):
    lora = ["--lora_rank", "4", "--max_lr", "1e-2"]
    common = ["--init", base_checkpoint, "--data_files", str(chat_data), *FLAGS, *lora]
    finetune.main([*common, "--log_dir", str(tmp_path / "a"), "--max_steps", "6", "--ckpt_interval", "3"])
    whole = read_metrics(tmp_path / "a" / "metrics.jsonl")
    saved = checkpoint.load_checkpoint(str(tmp_path / "a" / "model_00006.pt"))
    # the adapters, and the change to the chat tokens' embedding rows (token_rows.py): nothing else
    assert {name for name in saved["model"] if "lora_" not in name} == {"token_rows.embedding"}
    assert saved["token_rows"] == {"ids": [50257, 50258, 50259, 50260]}
    assert saved["init"]["path"] == base_checkpoint
    assert saved["lora"] == {"rank": 4, "alpha": 16.0, "targets": ["attn", "mlp"]}
    # the merged model (what sample.py, chat.py and the evaluations load) equals base + adapters, and its
    # embedding is the base's with the change added to those four rows
    merged = checkpoint.model_from_checkpoint(str(tmp_path / "a" / "model_00006.pt")).eval()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules()) and merged.token_rows is None
    wte = checkpoint.load_checkpoint(base_checkpoint)["model"]["transformer.wte.weight"]
    wte[50257:50261] += saved["model"]["token_rows.embedding"]
    assert torch.equal(merged.transformer.wte.weight, wte)
    os.remove(tmp_path / "a" / "model_00006.pt")
    (tmp_path / "b").mkdir()
    for name in ("model_00003.pt",):
        os.replace(tmp_path / "a" / name, tmp_path / "b" / name)
    finetune.main([*common, "--log_dir", str(tmp_path / "b"), "--max_steps", "6"])
    second = read_metrics(tmp_path / "b" / "metrics.jsonl")
    losses = lambda ms: {m["step"]: m["loss"] for m in ms if m["kind"] == "train"}  # noqa: E731
    assert {s: v for s, v in losses(second).items() if s >= 3} == {s: v for s, v in losses(whole).items() if s >= 3}
    # the frozen weights: the trained model minus its adapters and rows is the base, bit for bit
    resumed = checkpoint.load_checkpoint(str(tmp_path / "b" / "model_00006.pt"))
    model = checkpoint.adapt(checkpoint.load_init(base_checkpoint, 50261), resumed, init=False)
    checkpoint.load_weights(model, resumed["model"], "x")
    base = checkpoint.load_checkpoint(base_checkpoint)["model"]
    for name, tensor in model.state_dict().items():
        if "lora_" not in name and "token_rows" not in name:
            assert torch.equal(tensor, base[name.replace(".base.", ".")]), name
    # the base changed under the adapters: loading them onto other weights is refused
    other = tiny(seed=1, vocab_size=50257, n_embd=64)
    checkpoint.save_checkpoint(base_checkpoint, checkpoint.model_checkpoint(other, get_tokenizer("gpt2")))
    with pytest.raises(UserError, match="holds LoRA adapters for the weights in .*base.pt, which have changed"):
        checkpoint.model_from_checkpoint(str(tmp_path / "b" / "model_00006.pt"))


def test_chat_token_rows_train_only_with_a_frozen_base_on_chat_data_unless_turned_off(
    tmp_path, chat_data, base_checkpoint
):
    (tmp_path / "input.txt").write_text("To be, or not to be, that is the question. " * 40)
    runs = {
        "off": ["--data_files", str(chat_data), "--lora_rank", "2", "--train_chat_tokens", "0"],
        "text": ["--data_files", str(tmp_path / "input.txt"), "--lora_rank", "2"],  # no chat tokens in it
        "full": ["--data_files", str(chat_data)],  # every row trains anyway
    }
    for name, flags in runs.items():
        finetune.main(
            ["--init", base_checkpoint, *flags, *FLAGS, "--max_steps", "1", "--log_dir", str(tmp_path / name)]
        )
        saved = checkpoint.load_checkpoint(str(tmp_path / name / "model_00001.pt"))
        assert saved["token_rows"] is None and "token_rows.embedding" not in saved["model"], name
    # a LoRA checkpoint written before the flag existed (no token_rows key) resumes with the rows off
    old = checkpoint.load_checkpoint(str(tmp_path / "off" / "model_00001.pt"))
    del old["token_rows"]
    checkpoint.save_checkpoint(str(tmp_path / "off" / "model_00001.pt"), old)
    resume = [
        "--init",
        base_checkpoint,
        *runs["off"][:-2],
        *FLAGS,
        "--max_steps",
        "2",
        "--log_dir",
        str(tmp_path / "off"),
    ]
    with pytest.raises(
        SystemExit, match=r"written before token_rows existed .*\(token_rows's flag: docs/checkpoints.md\)"
    ):
        finetune.main(resume)
    finetune.main([*resume, "--train_chat_tokens", "0"])
    assert checkpoint.load_checkpoint(str(tmp_path / "off" / "model_00002.pt"))["step"] == 2


def test_plain_text_continues_pretraining_on_every_token(tmp_path, base_checkpoint):
    (tmp_path / "input.txt").write_text("To be, or not to be, that is the question. " * 40)
    finetune.main(
        [
            "--init",
            base_checkpoint,
            "--data_files",
            str(tmp_path / "input.txt"),
            "--log_dir",
            str(tmp_path / "txt"),
            "--max_steps",
            "2",
            *FLAGS,
        ]
    )
    saved = checkpoint.load_checkpoint(str(tmp_path / "txt" / "model_00002.pt"))
    assert saved["template"] is None and saved["tokenizer"]["name"] == "gpt2" and saved["config"]["vocab_size"] == 50257


# ---- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"messages": [{"role": "user", "content": "no reply"}]}] * 5, "no usable rows"),
        ([{"prompt": "a", "completion": "b"}] * 5, "no usable rows"),
    ],
)
def test_data_without_anything_to_learn_is_one_message(tmp_path, base_checkpoint, rows, message, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(SystemExit, match=message):
        finetune.main(["--init", base_checkpoint, "--data_files", str(path), "--log_dir", str(tmp_path / "x"), *FLAGS])
    assert not (tmp_path / "x").exists()  # nothing written


def test_bad_init_bad_target_and_another_template_at_resume_are_one_message_each(tmp_path, chat_data, base_checkpoint):
    common = ["--data_files", str(chat_data), *FLAGS]
    with pytest.raises(SystemExit, match="--init nope: neither a checkpoint file, nor a Hugging Face model folder"):
        finetune.main(["--init", "nope", "--log_dir", str(tmp_path / "x"), *common])
    with pytest.raises(SystemExit, match="--lora_targets mlp,head: choose from attn, mlp"):
        finetune.main(["--init", base_checkpoint, "--lora_rank", "4", "--lora_targets", "mlp,head", *common])
    finetune.main(["--init", base_checkpoint, "--log_dir", str(tmp_path / "run"), "--max_steps", "2", *common])
    with pytest.raises(SystemExit, match=r"was written with lora None, this run has \{'rank': 4"):
        finetune.main(
            [
                "--init",
                base_checkpoint,
                "--log_dir",
                str(tmp_path / "run"),
                "--max_steps",
                "4",
                "--lora_rank",
                "4",
                *common,
            ]
        )


@pytest.mark.parametrize(
    "peft",
    [
        [],
        ["--peft", "prefix", "--prefix_len", "2", "--base_quant", "nf4"],
        ["--lora_rank", "4", "--base_quant", "nf4", "--parallel", "fsdp", "--eval_interval", "3"],
    ],
)
def test_two_processes_fine_tune_as_one_process_with_accumulation(tmp_path, chat_data, base_checkpoint, peft):
    """The training machinery is train_gpt2.py's, DDP and FSDP included: 2 gloo processes x 1 micro-step
    of 4 rows take the same steps as 1 process x 2 micro-steps (prefixes on a quantized base too, and
    QLoRA sharded by FSDP: the adapters sharded, the quantized codes copied to every process, and the
    evaluations on a gathered copy)."""
    flags = [
        "--init",
        base_checkpoint,
        "--data_files",
        str(chat_data),
        *FLAGS,
        "--max_steps",
        "3",
        "--total_batch_size",
        "256",
        "--max_lr",
        "3e-3",
        *peft,
    ]
    finetune.main([*flags, "--log_dir", str(tmp_path / "one")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*torchrun, str(REPO / "finetune.py"), *flags, "--log_dir", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    one, two = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    train = lambda ms: [m["loss"] for m in ms if m["kind"] == "train"]  # noqa: E731
    assert len(train(one)) == 3
    assert train(two) == pytest.approx(train(one), abs=1e-5)
    val = lambda ms: [m["loss"] for m in ms if m["kind"] == "val"]  # noqa: E731
    assert val(two) == pytest.approx(val(one), abs=1e-5)  # FSDP evaluates a gathered copy, codes included
    assert len(val(one)) == (2 if "fsdp" in peft else 0)  # steps 0 and 3


def test_row_batches_count_their_real_tokens_not_the_padding():
    rows = [([1] * n, [1] * n) for n in (3, 5, 7, 2)]
    loader = finetune.RowLoader(rows, B=2)
    assert loader.pads_rows
    x, _ = loader.next_batch()
    assert x.shape == (2, 7) and loader.last_batch_tokens == 3 + 5  # 7 slots a row (the longest row)
    loader.next_batch()
    assert loader.last_batch_tokens == 7 + 2


def test_fine_tuning_reports_real_tokens_and_the_padding_share(chat_data, base_checkpoint, tmp_path, capsys):
    log_dir = tmp_path / "sft"
    finetune.main(
        [
            "--init",
            base_checkpoint,
            "--data_files",
            str(chat_data),
            "--log_dir",
            str(log_dir),
            "--max_steps",
            "2",
            *FLAGS,
        ]
    )
    assert "128 token slots per step" in capsys.readouterr().out
    train = [m for m in read_metrics(log_dir / "metrics.jsonl") if m["kind"] == "train"]
    for m in train:  # 4 rows of at most 32 slots x 1 process x 1 micro-step = 128 slots
        assert 0 < m["tokens"] < 128 and m["padding"] == pytest.approx(1 - m["tokens"] / 128)
        assert m["tokens_per_sec"] == pytest.approx(m["tokens"] / (m["dt_ms"] / 1000))


def test_fine_tuning_takes_a_lesson_optimizer_and_refuses_muon_and_another_at_resume(
    tmp_path, chat_data, base_checkpoint, capsys
):
    common = ["--init", base_checkpoint, "--data_files", str(chat_data), *FLAGS, "--log_dir", str(tmp_path / "run")]
    finetune.main([*common, "--optimizer", "momentum", "--max_steps", "2"])
    saved = checkpoint.load_checkpoint(str(tmp_path / "run" / "model_00002.pt"))
    assert {key for s in saved["optimizer"]["state"].values() for key in s} == {"momentum_buffer"}
    with pytest.raises(SystemExit, match="was trained with --optimizer momentum, this run has adamw"):
        finetune.main([*common, "--max_steps", "4"])
    with pytest.raises(SystemExit):
        finetune.main([*common, "--optimizer", "muon"])
    assert "argument --optimizer: invalid choice: 'muon'" in capsys.readouterr().err
