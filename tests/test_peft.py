"""Tests for quant.py and prefix.py, and finetune.py's --base_quant and --peft prefix: NF4's levels
against the table QLoRA publishes, quantization of hand-set numbers and its derived error bound, the
quantized layer against a float layer holding the dequantized weights; prefix attention against
attention over the concatenated keys and values written out by hand, generation with the cache
against without; fine-tuning end to end on a quantized base and with prefixes."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_finetune import write_secret_words

import checkpoint
import export
import finetune
import quant
from errors import UserError
from generate import generate_stream
from lora import LoRALinear, apply_lora, merge_lora
from model import GPT, GPTConfig
from optim import parameter_kinds
from prefix import apply_prefix, prefix_len
from token_rows import apply_token_rows, merge_token_rows
from tokenizer import get_tokenizer
from training_log import read_metrics

# bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")), as QLoRA's code ships it
BNB_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def tiny(seed=0, vocab_size=50261, n_embd=64, n_layer=2):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=64))


# ---- quant.py -----------------------------------------------------------------------------------
def test_nf4_levels_are_the_normal_quantiles_qlora_publishes():
    torch.testing.assert_close(quant.nf4_levels(), torch.tensor(BNB_NF4), rtol=0, atol=1e-6)


def test_quantize_then_dequantize_hand_set_numbers():
    block = torch.zeros(quant.BLOCK_SIZE)
    block[:4] = torch.tensor([2.0, -1.1, 0.3, 0.0])  # absmax 2: x / 2 = 1, -0.55, 0.15, 0
    codes, absmax = quant.quantize(block, "int8")
    assert absmax.tolist() == [2.0]
    assert codes[:4].tolist() == [254, 57, 146, 127]  # 127 + round(127 x / 2): 127, -69.85, 19.05, 0
    expected = torch.tensor([2.0, -70 / 127 * 2, 19 / 127 * 2, 0.0])
    torch.testing.assert_close(quant.dequantize(codes, absmax, "int8", (64,))[:4], expected)
    codes, absmax = quant.quantize(block, "nf4")
    # nearest levels: 1 (index 15), -0.5251 (2), 0.1609 (9), 0 (7); two to a byte, the first high
    assert codes.shape == (32,) and codes[:2].tolist() == [15 << 4 | 2, 9 << 4 | 7]
    expected = torch.tensor([2.0, BNB_NF4[2] * 2, BNB_NF4[9] * 2, 0.0])
    torch.testing.assert_close(quant.dequantize(codes, absmax, "nf4", (64,))[:4], expected)


@pytest.mark.parametrize("format, bound", [("int8", 1 / 254), ("nf4", (1 - 0.6961928) / 2)])
def test_dequantized_weights_are_within_half_the_widest_gap_times_the_block_absmax(format, bound):
    # half the widest gap between neighbouring levels: int8's are all 1/127, nf4's widest is -1 .. -0.696
    assert quant.error_bound(format) == pytest.approx(bound, abs=1e-6)
    torch.manual_seed(0)
    weight = torch.randn(192, 64) * 0.02
    weight[3, 5], weight[100, 0] = 0.5, -0.3  # outliers: only their own blocks lose precision
    codes, absmax = quant.quantize(weight, format)
    error = (quant.dequantize(codes, absmax, format, weight.shape) - weight).abs().view(-1, 64)
    assert (error <= bound * absmax[:, None] + 1e-7).all()
    assert error.max() / absmax.max() > bound / 4  # the bound is not vacuous: errors come close to it
    assert codes.numel() == weight.numel() // (2 if format == "nf4" else 1)


def test_a_quantized_layer_computes_what_a_float_layer_with_its_dequantized_weights_does():
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    layer = quant.QuantLinear(linear, "nf4")
    reference = nn.Linear(64, 96)
    with torch.no_grad():
        reference.weight.copy_(layer.weight)
        reference.bias.copy_(linear.bias)
    x = torch.randn(2, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), reference(x_ref)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)  # the backward dequantizes again, to the same weights
    assert not any(p.requires_grad for p in layer.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_a_quantized_model_stores_its_blocks_in_a_quarter_or_an_eighth_of_the_bytes():
    model = tiny()
    C, L, floats = 64, 2, quant.weight_bytes(tiny())
    block_matrices = L * 12 * C * C  # c_attn 3C^2, c_proj C^2, c_fc 4C^2, mlp c_proj 4C^2
    for format, bits in (("int8", 8), ("nf4", 4)):
        quantized = quant.quantize_linears(tiny(), format)
        scales = block_matrices // 64 * 4  # a float32 absmax per 64 numbers
        assert quant.weight_bytes(quantized) == floats - block_matrices * 4 + block_matrices * bits // 8 + scales
    assert sum(isinstance(m, quant.QuantLinear) for m in quant.quantize_linears(model, "nf4").modules()) == 4 * L
    plain = quant.dequantize_linears(model)
    assert not any(isinstance(m, quant.QuantLinear) for m in plain.modules())


def test_lora_on_a_quantized_base_starts_at_the_dequantized_base_and_merges_into_it():
    idx = torch.randint(0, 50261, (2, 16))
    model = apply_lora(quant.quantize_linears(tiny(), "nf4"), 4, 8, ["attn"])
    dequantized = quant.dequantize_linears(quant.quantize_linears(tiny(), "nf4"))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], dequantized(idx)[0])  # B = 0
        assert not torch.allclose(model(idx)[0], tiny()(idx)[0], atol=1e-3)  # 4 bits do change the logits
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_()
        adapted = model(idx)[0]
        merged = quant.dequantize_linears(merge_lora(model))(idx)[0]
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, (quant.QuantLinear, LoRALinear)) for m in model.modules())


# ---- token_rows.py ------------------------------------------------------------------------------
CHAT_IDS = [50257, 50258, 50259, 50260]


@pytest.mark.parametrize("modern", [False, True], ids=["tied", "untied head, soft cap"])
def test_trained_token_rows_equal_those_rows_edited_in_a_plain_model_and_get_their_gradient(modern):
    """The oracle: a plain GPT whose embedding (and untied head) rows were changed by hand. Zero at the
    start, the model is the base bit for bit; changed, its logits are the edited model's; the gradient
    of the change is the gradient the same rows of an unfrozen table get; merging gives the edited model."""
    switches = dict(untied_head=True, logit_softcap=15.0) if modern else {}

    def fresh():
        torch.manual_seed(0)
        return GPT(GPTConfig(vocab_size=50261, n_layer=2, n_head=2, n_embd=64, block_size=64, **switches))

    idx = torch.tensor([[50256, 50258, 464, 3139, 50260, 50259, 17], [50259, 50259, 11, 50257, 50260, 2, 9]])
    targets = torch.tensor([[50258, 464, 3139, 50260, 50259, 17, 50260], [50259, 11, 50257, 50260, 2, 9, 50258]])
    model = apply_token_rows(fresh().requires_grad_(False), CHAT_IDS)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], fresh()(idx)[0])  # the change starts at zero
        model.token_rows.embedding.normal_()
        if modern:
            model.token_rows.head.normal_()
    logits, loss = model(idx, targets)
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is not None] == [
        "token_rows.embedding",
        *(["token_rows.head"] if modern else []),
    ]
    edited = fresh()
    with torch.no_grad():
        for i, token in enumerate(CHAT_IDS):  # by hand, row by row
            edited.transformer.wte.weight[token] += model.token_rows.embedding[i]
            if modern:
                edited.lm_head.weight[token] += model.token_rows.head[i]
    edited_logits, edited_loss = edited(idx, targets)
    edited_loss.backward()
    torch.testing.assert_close(logits, edited_logits, rtol=1e-5, atol=1e-5)
    ids = torch.tensor(CHAT_IDS)
    if modern:  # the two tables apart: the input's rows and the head's rows
        torch.testing.assert_close(model.token_rows.embedding.grad, edited.transformer.wte.weight.grad[ids])
        torch.testing.assert_close(model.token_rows.head.grad, edited.lm_head.weight.grad[ids])
    else:  # tied: one table, as input and as output, its rows' gradient summing both uses
        torch.testing.assert_close(model.token_rows.embedding.grad, edited.transformer.wte.weight.grad[ids])
    merged = merge_token_rows(model)
    assert merged.token_rows is None
    with torch.no_grad():
        torch.testing.assert_close(merged(idx)[0], edited(idx)[0], rtol=1e-5, atol=1e-5)


def test_an_untied_head_trains_its_own_chat_rows_merged_into_the_head_and_grouped_with_it(tmp_path, chat_data):
    """The modern recipe's untied head: the run trains a change to the embedding's rows and one to the
    head's; loading adds each into its own table; the optimizer groups them with the embeddings and the
    head (not with the blocks' matrices, which Muon would take)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, n_layer=2, n_head=2, n_embd=64, block_size=64, untied_head=True)
    base = str(tmp_path / "base.pt")
    checkpoint.save_checkpoint(base, checkpoint.model_checkpoint(GPT(config), get_tokenizer("gpt2")))
    log_dir = tmp_path / "lora"
    finetune.main(
        ["--init", base, "--data_files", str(chat_data), *FLAGS, "--lora_rank", "2", "--max_steps", "2"]
        + ["--log_dir", str(log_dir)]
    )
    saved = checkpoint.load_checkpoint(str(log_dir / "model_00002.pt"))
    change = {part: saved["model"][f"token_rows.{part}"] for part in ("embedding", "head")}
    assert all(t.shape == (4, 64) and t.abs().sum() > 0 for t in change.values())
    merged = checkpoint.model_from_checkpoint(str(log_dir / "model_00002.pt"))
    weights = checkpoint.load_checkpoint(base)["model"]
    for table, part in (("transformer.wte.weight", "embedding"), ("lm_head.weight", "head")):
        weights[table][CHAT_IDS] += change[part]
        assert torch.equal(merged.state_dict()[table], weights[table]), table
    rows = apply_token_rows(GPT(config).requires_grad_(False), CHAT_IDS).token_rows
    embeddings, head, matrices, _ = parameter_kinds(rows.named_parameters(prefix="token_rows"))
    assert embeddings == [rows.embedding] and head == [rows.head] and matrices == []


# ---- prefix.py ----------------------------------------------------------------------------------
def by_hand_attention(attn, x, k_prefix, v_prefix):
    """The attention block's output with explicit softmax: the tokens' keys and values after the
    prefix's, token t seeing the whole prefix and tokens 0..t."""
    B, T, C = x.shape
    P, nh = k_prefix.size(0), attn.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    k, v = torch.cat([k_prefix.expand(B, P, C), k], 1), torch.cat([v_prefix.expand(B, P, C), v], 1)
    heads = lambda t: t.view(B, t.size(1), nh, C // nh).transpose(1, 2)  # noqa: E731
    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(C // nh)  # (B, nh, T, P + T)
    allowed = torch.tensor([[j < P or j - P <= t for j in range(P + T)] for t in range(T)])
    y = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ heads(v)  # (B, nh, T, hs)
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))


def test_prefix_attention_equals_attention_over_the_concatenated_keys_and_values():
    model = apply_prefix(tiny(), prefix_len=3)
    attn = model.transformer.h[1].attn
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), by_hand_attention(attn, x, attn.prefix.k, attn.prefix.v))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.prefix.{kv}" for i in range(2) for kv in "kv"}
    assert prefix_len(model) == 3 and prefix_len(tiny()) == 0


def test_the_prefix_starts_as_the_base_keys_and_values_of_real_tokens():
    model = tiny()
    torch.manual_seed(5)
    tokens = torch.randint(0, 50261, (1, 4))
    torch.manual_seed(5)
    apply_prefix(model, prefix_len=4)
    block = model.transformer.h[0]
    with torch.no_grad():  # the first layer's keys and values of the tokens, after its norm
        _, k, v = block.attn.c_attn(block.ln_1(model.embed(tokens, torch.arange(4))[0]))[0].split(64, dim=1)
    torch.testing.assert_close(block.attn.prefix.k.data, k)
    torch.testing.assert_close(block.attn.prefix.v.data, v)


def test_with_qk_norm_the_prefix_starts_as_the_normed_keys_attention_uses():
    """With --qk_norm 1 attention norms each head's key to RMS 1: a prefix starting from c_attn's raw
    keys would start at another scale than every token's key."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50261, n_layer=2, n_head=2, n_embd=64, block_size=64, qk_norm=True))
    torch.manual_seed(5)
    tokens = torch.randint(0, 50261, (1, 4))
    torch.manual_seed(5)
    apply_prefix(model, prefix_len=4)
    block = model.transformer.h[0]
    with torch.no_grad():
        _, k, _ = block.attn.c_attn(block.ln_1(model.embed(tokens, torch.arange(4))[0]))[0].split(64, dim=1)
    heads = k.view(4, 2, 32)  # (P, nh, hs), normed by hand: x / sqrt(mean(x^2) + eps)
    eps = torch.finfo(k.dtype).eps  # F.rms_norm's default
    torch.testing.assert_close(
        block.attn.prefix.k.data, (heads / (heads.pow(2).mean(-1, keepdim=True) + eps).sqrt()).view(4, 64)
    )


def greedy(model, prompts, n, use_cache=True):
    """(B, n) greedy tokens after each prompt."""
    return torch.stack(list(generate_stream(model, prompts, n, temperature=0, use_cache=use_cache)), dim=1)


def test_greedy_generation_with_the_prefix_in_the_cache_equals_recomputing_every_step():
    model = apply_prefix(tiny(), prefix_len=5).eval()
    with torch.no_grad():
        for block in model.transformer.h:  # a trained prefix, far from its start
            block.attn.prefix.k.normal_()
            block.attn.prefix.v.normal_()
    prompts = [[11, 12, 13, 14, 15, 16], [7, 8]]  # left-padded: positions and masks per row
    cached = greedy(model, prompts, 20)
    assert torch.equal(cached, greedy(model, prompts, 20, use_cache=False))
    # the first token is forward's own: the argmax of forward's last logits
    with torch.no_grad():
        assert cached[0, 0].item() == model(torch.tensor([prompts[0]]))[0][0, -1].argmax().item()


# ---- end to end ---------------------------------------------------------------------------------
FLAGS = (
    "--batch_size 4 --seq_len 32 --total_batch_size 128 --device cpu --dtype float32 --compile 0 "
    "--val_fraction 0.1 --eval_interval 10 --warmup_steps 2 --max_lr 1e-2"
).split()


@pytest.fixture
def chat_data(tmp_path):
    return write_secret_words(tmp_path / "chat.jsonl", people=8, repeats=5)


@pytest.fixture
def base_checkpoint(tmp_path):
    path = str(tmp_path / "base.pt")
    checkpoint.save_checkpoint(path, checkpoint.model_checkpoint(tiny(vocab_size=50257), get_tokenizer("gpt2")))
    return path


def val_losses(log_dir):
    return [m["loss"] for m in read_metrics(log_dir / "metrics.jsonl") if m["kind"] == "val"]


def test_qlora_trains_adapters_only_and_loads_merged_into_the_dequantized_base(tmp_path, chat_data, base_checkpoint):
    log_dir = tmp_path / "qlora"
    common = ["--init", base_checkpoint, "--data_files", str(chat_data), *FLAGS, "--max_steps", "20"]
    finetune.main([*common, "--lora_rank", "4", "--base_quant", "nf4", "--log_dir", str(log_dir)])
    saved = checkpoint.load_checkpoint(str(log_dir / "model_00020.pt"))
    assert saved["base_quant"] == "nf4" and saved["prefix"] is None
    assert saved["model"] and all("lora_" in name for name in saved["model"] if name != "token_rows.embedding")
    assert saved["token_rows"] == {"ids": CHAT_IDS}  # and the chat tokens' rows: no codes, no base weights
    losses = val_losses(log_dir)
    assert losses[-1] < losses[0] - 0.5, losses  # the adapters learn on a 4-bit base
    # loaded: a plain GPT whose block weights are the dequantized base plus B A
    model = checkpoint.model_from_checkpoint(str(log_dir / "model_00020.pt")).eval()
    assert not any(isinstance(m, (quant.QuantLinear, LoRALinear)) for m in model.modules())
    trained = checkpoint.adapt(checkpoint.load_init(base_checkpoint, 50261), saved, init=False)
    checkpoint.load_weights(trained, saved["model"], "x")
    idx = torch.randint(0, 50261, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], trained(idx)[0], rtol=1e-4, atol=1e-4)
    export.main([str(log_dir / "model_00020.pt"), "--hf_dir", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "config.json").is_file()


def test_prefix_tuning_trains_prefixes_only_and_samples_through_the_cache(tmp_path, chat_data, base_checkpoint):
    log_dir = tmp_path / "prefix"
    common = ["--init", base_checkpoint, "--data_files", str(chat_data), *FLAGS, "--max_steps", "20"]
    # a prefix steers attention only, and this base is random: it takes a large LR to move the loss
    finetune.main([*common, "--peft", "prefix", "--prefix_len", "4", "--max_lr", "0.1", "--log_dir", str(log_dir)])
    saved = checkpoint.load_checkpoint(str(log_dir / "model_00020.pt"))
    assert saved["prefix"] == {"len": 4} and saved["lora"] is None
    prefixes = {f"transformer.h.{i}.attn.prefix.{kv}" for i in range(2) for kv in "kv"}
    assert set(saved["model"]) == prefixes | {"token_rows.embedding"}
    losses = val_losses(log_dir)
    assert losses[-1] < losses[0] - 0.2, losses
    model = checkpoint.model_from_checkpoint(str(log_dir / "model_00020.pt")).eval()
    base = checkpoint.load_checkpoint(base_checkpoint)["model"]
    base["transformer.wte.weight"][CHAT_IDS] += saved["model"]["token_rows.embedding"]  # the rows that train
    for name, tensor in model.state_dict().items():  # the rest of the base is bit-identical after training
        assert ".prefix." in name or torch.equal(tensor, base[name]), name
    assert prefix_len(model) == 4
    prompt = [[50258, 1867, 318, 14862, 338]]
    assert torch.equal(greedy(model, prompt, 8), greedy(model, prompt, 8, use_cache=False))
    with pytest.raises(SystemExit, match="is prefix-tuned .* cannot be exported"):
        export.main([str(log_dir / "model_00020.pt"), "--hf_dir", str(tmp_path / "hf")])
    # nor a base to train on: its run would save prefixes that no record describes (then fail to load)
    again = ["--data_files", str(chat_data), *FLAGS, "--log_dir", str(tmp_path / "again")]
    with pytest.raises(SystemExit, match="is prefix-tuned .* cannot be trained further as a base"):
        finetune.main(["--init", str(log_dir / "model_00020.pt"), *again])


def test_prefix_on_a_quantized_base_and_resume_are_exact(tmp_path, chat_data, base_checkpoint):
    common = [
        *("--init", base_checkpoint, "--data_files", str(chat_data), *FLAGS),
        *("--peft", "prefix", "--prefix_len", "2", "--base_quant", "int8", "--dtype", "bfloat16"),
    ]
    finetune.main([*common, "--log_dir", str(tmp_path / "a"), "--max_steps", "6", "--ckpt_interval", "3"])
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "model_00003.pt").rename(tmp_path / "b" / "model_00003.pt")
    finetune.main([*common, "--log_dir", str(tmp_path / "b"), "--max_steps", "6"])
    losses = lambda d: {m["step"]: m["loss"] for m in read_metrics(d / "metrics.jsonl") if m["kind"] == "train"}  # noqa: E731
    assert {s: v for s, v in losses(tmp_path / "b").items() if s >= 3} == {
        s: v for s, v in losses(tmp_path / "a").items() if s >= 3
    }


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--peft", "prefix"], "--peft prefix: pass --prefix_len P"),
        (["--peft", "prefix", "--prefix_len", "4", "--lora_rank", "4"], "and no --lora_rank"),
        (["--prefix_len", "4"], "--prefix_len: prefix tuning needs --peft prefix"),
        (["--base_quant", "nf4"], "--base_quant nf4 freezes the base: train adapters on it with --lora_rank"),
    ],
)
def test_peft_flags_that_do_not_go_together_are_one_message(flags, message, tmp_path, chat_data, base_checkpoint):
    with pytest.raises(SystemExit, match=message):
        finetune.main(["--init", base_checkpoint, "--data_files", str(chat_data), *FLAGS, *flags])


def test_a_weight_that_does_not_split_into_blocks_is_refused():
    with pytest.raises(UserError, match="blocks of 64: give the model an n_embd that is a multiple of 8"):
        quant.quantize(torch.zeros(3, 7), "nf4")


def test_prefix_attention_under_bf16_autocast_keeps_the_tokens_dtype():
    model = apply_prefix(tiny(), prefix_len=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(torch.randint(0, 50261, (2, 8)), torch.randint(0, 50261, (2, 8)))
    loss.backward()
    assert model.transformer.h[0].attn.prefix.k.grad is not None
    assert F.softmax(logits.float(), -1).isfinite().all()


# ---- memory_plan.py / finetune.py --plan --------------------------------------------------------
def test_the_fine_tuning_plan_counts_a_frozen_base_at_its_stored_bytes():
    import memory_plan

    config = GPTConfig.from_name("gpt2-xl")
    P, bf16 = memory_plan.parameter_counts(config)[0], torch.bfloat16
    full = memory_plan.finetune_memory(config, 4, 512, bf16, P, "none")
    # full fine-tuning on one GPU is pretraining's plan (DDP column, one process)
    assert sum(full.values()) == sum(memory_plan.memory_plan(config, 4, 512, 1, bf16, "ddp", False).values())
    lora = memory_plan.finetune_memory(config, 4, 512, bf16, 10**6, "nf4")
    blocks = 12 * 1600**2 * 48  # the blocks' four matrices, stored in 4 bits and a float32 per 64
    assert lora["base weights"] == blocks * (0.5 + 4 / 64) + (4 + 2) * (P - blocks)
    assert lora["optimizer (adamw)"] == 8 * 10**6 and lora["gradients"] == 4 * 10**6
    sgd = memory_plan.finetune_memory(config, 4, 512, bf16, 10**6, "nf4", optimizer="sgd")
    assert sgd["optimizer (sgd)"] == 0 and sum(sgd.values()) == sum(lora.values()) - 8 * 10**6


def test_finetune_plan_prints_the_three_bases_and_a_verdict_from_the_shapes_alone(tmp_path, capsys):
    # a checkpoint whose weights are not there at all: the plan reads its config, never its tensors
    config = tiny(vocab_size=50257).config
    checkpoint.save_checkpoint(str(tmp_path / "shapes.pt"), {"config": vars(config), "model": {}})
    plan = ["--plan", "--init", str(tmp_path / "shapes.pt"), "--lora_rank", "4", "--base_quant", "nf4"]
    finetune.main([*plan, "--gpu_memory", "4"])
    out = capsys.readouterr().out
    # 2 layers x rank 4 x (in + out): (64 + 192) + (64 + 64) + (64 + 256) + (256 + 64) = 8,192, and the
    # chat tokens' 4 rows of 64 (--train_chat_tokens)
    assert "8,448 trained" in out
    assert "GiB, base in" in out and "verdict: --base_quant nf4 fits" in out
    # a Hugging Face folder's config.json, and a hub name's size: nothing downloaded (this test is offline)
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64).save_pretrained(tmp_path / "hf")
    finetune.main(["--plan", "--init", str(tmp_path / "hf"), "--lora_rank", "4", "--gpu_memory", "4"])
    assert "8,448 trained" in capsys.readouterr().out
    finetune.main(["--plan", "--init", "gpt2-xl", "--lora_rank", "8", "--gpu_memory", "16"])
    assert "1557.7M parameters, 9,836,800 trained" in capsys.readouterr().out  # 48 x 8 x 25,600 + 4 x 1,600
