"""The modern recipe (train_gpt2.py --recipe modern): each switch does what it says, against an
independent computation where there is one (transformers' Llama rotary embeddings, the softcap
formula, ln(vocab) at a zero head); Muon + AdamW step, checkpoint and resume as one optimizer; the
recipe works with everything the GPT-2 recipe does (exact resume, DDP, float16, the KV cache,
fine-tuning, sampling) and its export is refused with one message."""

import copy
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import REPO
from test_finetune import FLAGS as FINETUNE_FLAGS
from test_finetune import chat_data, chat_tokenizer  # noqa: F401 (fixtures)
from test_train import TINY, losses, resumed_halfway, run, write_shards

import checkpoint as ck
import export
import optim
import train_gpt2
from errors import UserError
from generate import generate, generate_stream
from model import GPT, MODERN_SWITCHES, GPTConfig, apply_rotary, rotary_angles
from optim import MuonWithAdamW, configure_optimizers
from training_log import read_metrics

MODERN = GPTConfig.from_name(
    "tiny",
    block_size=32,
    rope=True,
    rmsnorm=True,
    qk_norm=True,
    relu2=True,
    untied_head=True,
    zero_init=True,
    logit_softcap=15.0,
)


@pytest.fixture
def data_dir(tmp_path):
    return write_shards(tmp_path / "data")


def random_weights(config, seed=0):
    """A model whose matrices are N(0, 0.3), so that two ways of computing its outputs can disagree
    (zero_init's zeros, or GPT-2's N(0, 0.02), make most outputs alike)."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    return model


# ---- the flags ----


def test_recipe_modern_turns_every_switch_on_and_a_flag_still_turns_one_off():
    modern = train_gpt2.parse_config(["--recipe", "modern"])
    assert all(getattr(modern, name) for name in MODERN_SWITCHES)
    assert (modern.optimizer, modern.lr_schedule, modern.min_lr_ratio) == ("muon", "wsd", 0.0)
    without_rope = train_gpt2.parse_config(["--recipe", "modern", "--rope", "0"])
    assert not without_rope.rope and without_rope.qk_norm
    gpt2 = train_gpt2.parse_config([])
    assert train_gpt2.make_model_config(gpt2, 50257) == GPTConfig()  # GPT-2's architecture, every switch off
    assert train_gpt2.make_model_config(modern, 50257).is_gpt2 is False


def test_wsd_holds_max_lr_then_decays_linearly_to_min_lr_over_decay_frac():
    cfg = train_gpt2.parse_config(
        "--lr_schedule wsd --max_steps 100 --warmup_steps 10 --max_lr 1.0 --min_lr_ratio 0.0 --decay_frac 0.4".split()
    )
    lrs = [optim.get_lr(step, cfg) for step in range(101)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # warmup
    assert lrs[10:61] == [1.0] * 51  # stable until step 60 = 100 - 40
    assert lrs[60:] == pytest.approx([1 - (s - 60) / 40 for s in range(60, 101)])  # straight down to 0 at 100


def test_unknown_choices_and_muon_under_fsdp_are_refused_before_training(capsys):
    for flag, value, choices in (
        ("--optimizer", "lion", "'sgd', 'momentum', 'nesterov', 'adagrad', 'rmsprop', 'adam', 'adamw', 'muon'"),
        ("--lr_schedule", "linear", "'cosine', 'wsd'"),
        ("--recipe", "speedrun", "'gpt2', 'modern'"),
    ):
        with pytest.raises(SystemExit):
            train_gpt2.parse_config([flag, value])
        assert f"argument {flag}: invalid choice: '{value}' (choose from {choices})" in capsys.readouterr().err
    config = GPTConfig()
    for flags, message in (
        (["--optimizer", "muon", "--parallel", "fsdp"], "Newton-Schulz"),
        (["--optimizer", "muon", "--muon_lr", "0"], "would never move the blocks' matrices"),
        (["--head_lr", "1e-3"], "--head_lr is for an untied output layer"),
    ):
        with pytest.raises(UserError, match=message):
            train_gpt2.check_config(train_gpt2.parse_config(flags), config, world_size=2)


# ---- each switch ----


def test_rotary_embeddings_equal_transformers_llama_and_depend_only_on_distance():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    B, nh, T, hs = 2, 3, 10, 16
    q, k = torch.randn(2, B, nh, T, hs).unbind(0)
    pos = torch.arange(T)
    ours_q, ours_k = apply_rotary(q, rotary_angles(pos, hs)), apply_rotary(k, rotary_angles(pos, hs))
    llama = LlamaConfig(hidden_size=nh * hs, num_attention_heads=nh, rope_theta=10000.0, max_position_embeddings=64)
    cos, sin = LlamaRotaryEmbedding(llama)(q, pos[None])
    theirs_q, theirs_k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(ours_q, theirs_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_k, theirs_k, atol=1e-5, rtol=1e-5)
    # q at m, k at n: the score depends on m - n only (here both shifted by 5)
    score = (ours_q[..., 2, :] * ours_k[..., 0, :]).sum(-1)
    shifted_q = apply_rotary(q, rotary_angles(pos + 5, hs))
    shifted_k = apply_rotary(k, rotary_angles(pos + 5, hs))
    torch.testing.assert_close((shifted_q[..., 2, :] * shifted_k[..., 0, :]).sum(-1), score, atol=1e-4, rtol=1e-4)


def test_rope_drops_the_position_embedding_and_untied_head_adds_an_output_layer():
    gpt2, modern = GPT(replace(MODERN, **{name: False for name in MODERN_SWITCHES})), GPT(MODERN)
    names = dict(modern.named_parameters())
    assert "transformer.wpe.weight" not in names and "transformer.wpe.weight" in dict(gpt2.named_parameters())
    assert modern.lm_head.weight is not modern.transformer.wte.weight
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    C = MODERN.n_embd
    # RMSNorm without a gain has no parameters: LayerNorm's 2C per norm (2 per block + ln_f) go too
    norms = (2 * MODERN.n_layer + 1) * 2 * C
    assert modern.num_params() == gpt2.num_params() + MODERN.padded_vocab_size * C - 32 * C - norms


def test_rmsnorm_normalises_each_position_to_unit_rms():
    model = GPT(replace(GPTConfig.from_name("tiny"), rmsnorm=True))
    x = torch.randn(3, 5, 64) * 7 + 2
    y = model.transformer.h[0].ln_1(x)
    torch.testing.assert_close(y, x / x.pow(2).mean(-1, keepdim=True).sqrt(), atol=1e-5, rtol=1e-5)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    """Scaling the query and key rows of c_attn by 10 changes softmax(q k^T) of GPT-2's attention, not
    that of attention with QK-norm, which normalises q and k first."""
    x = torch.randn(2, 8, 64)
    for qk_norm in (False, True):
        attn = random_weights(replace(GPTConfig.from_name("tiny"), qk_norm=qk_norm)).transformer.h[0].attn
        before = attn(x)
        with torch.no_grad():
            attn.c_attn.weight[: 2 * 64] *= 10
            attn.c_attn.bias[: 2 * 64] *= 10
        if qk_norm:
            torch.testing.assert_close(attn(x), before, atol=1e-4, rtol=1e-4)
        else:
            assert not torch.allclose(attn(x), before, atol=1e-2)


def test_relu2_mlp_is_the_square_of_relu():
    mlp = random_weights(replace(GPTConfig.from_name("tiny"), relu2=True)).transformer.h[0].mlp
    x = torch.randn(4, 64)
    expected = mlp.c_proj(torch.clamp(mlp.c_fc(x), min=0) ** 2)
    torch.testing.assert_close(mlp(x), expected)


def test_zero_init_starts_every_block_as_the_identity_and_the_loss_at_ln_vocab():
    model = GPT(replace(GPTConfig.from_name("tiny"), zero_init=True, untied_head=True))
    x = torch.randn(2, 6, 64)
    assert torch.equal(model.transformer.h[0](x), x)
    idx = torch.randint(0, 50257, (2, 6))
    logits, loss = model(idx, idx)
    assert torch.equal(logits, torch.zeros_like(logits))
    assert loss.item() == pytest.approx(math.log(50257), abs=1e-5)  # a uniform guess over the real tokens
    # tied, the head is the embedding: zero_init leaves it random
    tied = GPT(replace(GPTConfig.from_name("tiny"), zero_init=True))
    assert tied.transformer.wte.weight.std() > 0.01


def test_logit_softcap_is_cap_tanh_of_the_plain_logits():
    plain = random_weights(replace(MODERN, logit_softcap=0.0))
    with torch.no_grad():
        plain.lm_head.weight *= 10  # logits far beyond the cap
    capped = GPT(MODERN).eval()
    capped.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 50257, (2, 9))
    raw, _ = plain(idx)
    assert raw.abs().max() > 30
    logits, _ = capped(idx)
    torch.testing.assert_close(logits, 15 * torch.tanh(raw / 15), atol=1e-4, rtol=1e-4)
    assert logits.abs().max() < 15


def test_flops_per_token_counts_an_untied_head_but_not_the_embedding_lookup():
    gpt2, untied = GPT(GPTConfig.from_name("tiny")), GPT(replace(GPTConfig.from_name("tiny"), untied_head=True))
    assert untied.flops_per_token(16) == gpt2.flops_per_token(16)  # the same matmuls: only the lookup is new


# ---- Muon + AdamW ----


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest_each_group_at_its_lr():
    model = GPT(MODERN)
    optimizer = configure_optimizers(
        model, 0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu", muon_lr=0.02, embed_lr=0.05, head_lr=2e-3
    )
    assert isinstance(optimizer, MuonWithAdamW)
    muon, adamw = optimizer.optimizers
    names = {id(p): name for name, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert muon_names == {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    by_lr = {g["lr"]: {names[id(p)] for p in g["params"]} for g in adamw.param_groups}
    assert by_lr[0.05] == {"transformer.wte.weight"} and by_lr[2e-3] == {"lm_head.weight"}
    assert all(model.get_parameter(n).dim() == 1 for n in by_lr[1e-3])  # the biases
    assert sorted(g["lr_scale"] for g in optimizer.param_groups) == pytest.approx([1.0, 2.0, 20.0, 50.0])
    assert len(optimizer.param_groups) == 4 and sum(len(g["params"]) for g in optimizer.param_groups) == len(names)


def test_muon_with_adamw_state_dict_round_trips_to_the_same_next_steps():
    def train(model, optimizer, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(0, 50257, (2, 8), generator=g)
            optimizer.zero_grad()
            model(idx, idx)[1].backward()
            optimizer.step()

    def make():
        torch.manual_seed(0)
        model = GPT(MODERN)
        return model, configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu", muon_lr=0.02)

    model_a, opt_a = make()
    train(model_a, opt_a, 2, seed=1)
    state = copy.deepcopy({"model": model_a.state_dict(), "optimizer": opt_a.state_dict()})  # not views of them
    assert sorted(state["optimizer"]["state"]) == list(range(len(list(model_a.parameters()))))  # one numbering
    train(model_a, opt_a, 2, seed=2)
    model_b, opt_b = make()
    model_b.load_state_dict(state["model"])
    opt_b.load_state_dict(state["optimizer"])
    train(model_b, opt_b, 2, seed=2)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


# ---- with everything that exists ----

MODERN_FLAGS = ["--recipe", "modern", "--max_lr", "1e-2", "--muon_lr", "0.02"]


def test_modern_recipe_trains_and_resumes_bit_identically_from_a_checkpoint(data_dir, tmp_path):
    whole, resumed, part = resumed_halfway(data_dir, tmp_path, *MODERN_FLAGS)
    assert losses(whole)[5] < losses(whole)[0]
    assert {s: v for s, v in losses(whole).items() if s >= 3} == losses(resumed)  # exact, every step
    assert losses(resumed, "val")[6] == losses(whole, "val")[6]
    saved = ck.load_checkpoint(str(part / "model_00006.pt"))
    assert saved["config"]["rope"] and saved["args"]["optimizer"] == "muon"


def test_resuming_with_another_optimizer_or_recipe_is_one_message(data_dir, tmp_path):
    run(data_dir, tmp_path / "run", "--max_steps", "2", "--eval_interval", "0", *MODERN_FLAGS)
    with pytest.raises(SystemExit, match="was trained with --optimizer muon, this run has adamw"):
        run(
            data_dir,
            tmp_path / "run",
            "--max_steps",
            "4",
            "--eval_interval",
            "0",
            *MODERN_FLAGS,
            "--optimizer",
            "adamw",
        )
    with pytest.raises(SystemExit, match="was trained with --muon_lr 0.02, this run has 0.03"):
        run(data_dir, tmp_path / "run", "--max_steps", "4", "--eval_interval", "0", *MODERN_FLAGS, "--muon_lr", "0.03")
    with pytest.raises(SystemExit, match=r"rope=True \(flags say False\)"):
        run(data_dir, tmp_path / "run", "--max_steps", "4", "--eval_interval", "0")


def test_float16_with_muon_unscales_before_clipping(data_dir, tmp_path):
    steps = ["--max_steps", "1", "--eval_interval", "10", *MODERN_FLAGS]
    fp32 = run(data_dir, tmp_path / "fp32", *steps)
    fp16 = run(data_dir, tmp_path / "fp16", *steps, "--dtype", "float16")
    norm32, norm16 = ([m["grad_norm"] for m in metrics if m["kind"] == "train"][0] for metrics in (fp32, fp16))
    assert norm16 == pytest.approx(norm32, rel=0.05)


def test_two_process_ddp_with_muon_equals_one_process_with_accumulation(data_dir, tmp_path):
    """Each process orthogonalises the same all-reduced gradient, so the weights stay the same everywhere
    and match one process that accumulates both halves of the batch."""
    steps = ["--max_steps", "3", "--eval_interval", "3", "--total_batch_size", "64", *MODERN_FLAGS]
    single = run(data_dir, tmp_path / "single", *steps, "--val_steps", "4")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    flags = ["--data_dir", data_dir, "--log_dir", str(tmp_path / "ddp"), *TINY, *steps, "--val_steps", "2"]
    result = subprocess.run(
        [*torchrun, str(REPO / "train_gpt2.py"), *flags], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ddp = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    for step, loss in losses(single).items():
        assert losses(ddp)[step] == pytest.approx(loss, abs=1e-5)
    assert losses(ddp, "val")[3] == pytest.approx(losses(single, "val")[3], abs=1e-5)


def test_kv_cache_with_rotary_positions_equals_recomputing_and_each_prompt_alone():
    """Left-padded rows get rotary angles counted from their first real token, as they would alone."""
    model = random_weights(MODERN)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in (3, 11, 1, 6)]  # left-padded to 11
    # 21 new tokens: up to block_size 32, where the cache and recomputing agree (GPT.generate_stream)
    cached = torch.stack(list(generate_stream(model, prompts, 21, temperature=0)), dim=1)
    recomputed = torch.stack(list(generate_stream(model, prompts, 21, temperature=0, use_cache=False)), dim=1)
    alone = torch.cat([torch.stack(list(generate_stream(model, [p], 21, temperature=0)), dim=1) for p in prompts])
    assert torch.equal(cached, recomputed) and torch.equal(cached, alone)
    assert len({tuple(row) for row in cached.tolist()}) == 4  # four different continuations: the test can fail


def test_modern_checkpoint_samples_fine_tunes_and_refuses_the_hf_export(tmp_path, chat_data, capsys):  # noqa: F811
    import finetune
    import sample
    from tokenizer import get_tokenizer

    base = str(tmp_path / "base.pt")
    model = random_weights(replace(MODERN, block_size=64))
    ck.save_checkpoint(base, ck.model_checkpoint(model, get_tokenizer("gpt2")))
    sample.main(
        [
            "--checkpoint",
            base,
            "--prompt",
            "Hello",
            "--num_samples",
            "1",
            "--max_new_tokens",
            "5",
            "--temperature",
            "0",
            "--no_stream",
        ]
    )
    greedy = generate(model, torch.tensor([get_tokenizer("gpt2").encode("Hello")]), 5, temperature=0)[0].tolist()
    assert get_tokenizer("gpt2").decode(greedy) in capsys.readouterr().out
    log_dir = tmp_path / "sft"
    finetune.main(
        [
            "--init",
            base,
            "--data_files",
            str(chat_data),
            "--log_dir",
            str(log_dir),
            *FINETUNE_FLAGS,
            "--max_steps",
            "4",
            "--lora_rank",
            "4",
        ]
    )
    sft = read_metrics(log_dir / "metrics.jsonl")
    assert sorted(losses(sft)) == [0, 1, 2, 3] and all(math.isfinite(v) for v in losses(sft).values())
    merged = ck.model_from_checkpoint(str(log_dir / "model_00004.pt"), "cpu")
    assert merged.config == replace(MODERN, block_size=64, vocab_size=merged.config.vocab_size)
    with pytest.raises(SystemExit, match="GPT2LMHeadModel cannot hold"):
        export.main([base, "--hf_dir", str(tmp_path / "hf")])
    assert not os.path.exists(tmp_path / "hf")
