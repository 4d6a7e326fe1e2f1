"""model.py: parity with Hugging Face GPT-2, initialisation, tying, optimizer groups, generation."""

import math

import pytest
import torch
import torch.nn.functional as F

from generate import generate
from hf import from_pretrained, save_pretrained
from model import GPT, GPTConfig
from optim import configure_optimizers

transformers = pytest.importorskip("transformers")


def random_hf_model(tmp_path, vocab_size=50257, seed=0):
    """A small randomly initialised transformers GPT-2, saved as a local Hugging Face folder."""
    torch.manual_seed(seed)
    eot = vocab_size - 1  # GPT-2 uses 50256; keep it inside a smaller test vocab
    hf_config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=48, n_layer=2, n_head=4, bos_token_id=eot, eos_token_id=eot
    )
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    hf_model.save_pretrained(tmp_path)
    return hf_model


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_name("tiny", block_size=32, **overrides))


def test_from_pretrained_logits_match_transformers(tmp_path):
    hf_model = random_hf_model(tmp_path)
    model = from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf_model(idx).logits
    assert ours.shape == theirs.shape == (3, 40, 50257)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_loss_matches_transformers_shifted_labels(tmp_path):
    hf_model = random_hf_model(tmp_path, vocab_size=1000)
    model = from_pretrained(str(tmp_path)).eval()
    tokens = torch.randint(0, 1000, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, ours = model(tokens[:, :-1], tokens[:, 1:])
        theirs = hf_model(tokens, labels=tokens).loss  # transformers shifts the labels itself
    assert abs(ours.item() - theirs.item()) < 1e-5


def test_save_pretrained_round_trips_through_transformers(tmp_path):
    model = tiny_model().eval()
    save_pretrained(model, tmp_path)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf_model(idx).logits, rtol=0, atol=1e-5)


def test_fresh_124m_model_loss_is_uniform_guess():
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50257, (2, 64), generator=g)
    targets = torch.randint(0, 50257, (2, 64), generator=g)
    with torch.no_grad():
        _, loss = model(idx, targets)
    # a freshly initialised model predicts roughly uniformly: -ln(1/50257) = 10.82
    assert abs(loss.item() - math.log(50257)) < 0.2


def test_gpt2_124m_shapes_parameters_and_flops():
    model = GPT(GPTConfig())
    assert model.config.padded_vocab_size == 50304
    assert model.transformer.wte.weight.shape == (50304, 768)
    # OpenAI's 124,439,808 parameters plus 47 padding rows of 768
    assert model.num_params() == 124_439_808 + 47 * 768
    # ~0.855 GFLOP per token at T=1024 by 6N + 12*L*H*Q*T (PaLM paper, appendix B)
    assert model.flops_per_token(1024) == pytest.approx(0.855e9, rel=1e-3)


def test_lm_head_is_tied_to_token_embedding():
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 50257, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    # one tensor, one gradient that holds both the input-embedding and output-layer contributions
    assert model.transformer.wte.weight.grad is model.lm_head.weight.grad


def test_residual_projections_are_scaled_by_depth():
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, n_layer=8, n_head=4, n_embd=256)
    model = GPT(config)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.count_nonzero(block.attn.c_proj.bias) == 0
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_optimizer_decays_matrices_and_not_biases_or_layernorm():
    config = GPTConfig.from_name("tiny", block_size=32)
    model = GPT(config)
    optimizer = configure_optimizers(
        model, weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95), eps=1e-8, device_type="cpu"
    )
    decay, no_decay = optimizer.param_groups
    C, L, V = config.n_embd, config.n_layer, config.padded_vocab_size
    # matrices: wte (tied with lm_head, counted once), wpe, and per block c_attn, c_proj, c_fc, c_proj
    expected_decay = V * C + config.block_size * C + L * (3 * C * C + C * C + 4 * C * C + 4 * C * C)
    # vectors: per block the biases of those four layers and two LayerNorms (gain + bias); ln_f
    expected_no_decay = L * (3 * C + C + 4 * C + C + 2 * 2 * C) + 2 * C
    assert sum(p.numel() for p in decay["params"]) == expected_decay
    assert sum(p.numel() for p in no_decay["params"]) == expected_no_decay
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert expected_decay + expected_no_decay == model.num_params()


def test_ignored_targets_are_left_out_of_the_loss():
    model = tiny_model()
    idx = torch.randint(0, 50257, (2, 16))
    targets = torch.randint(0, 50257, (2, 16))
    masked = targets.clone()
    masked[:, :10] = -1
    with torch.no_grad():
        logits, loss = model(idx, masked)
    expected = F.cross_entropy(logits[:, 10:].reshape(-1, 50257), targets[:, 10:].reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_generation_is_reproducible_with_a_seeded_generator():
    model = tiny_model()
    prompt = torch.tensor([[464, 2068, 7586]])  # "The quick brown"

    def sample(seed):
        return generate(model, prompt, 20, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(seed))

    first, again, other = sample(42), sample(42), sample(7)
    assert first.shape == (1, 23)
    assert torch.equal(first[:, :3], prompt)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_top_1_sampling_is_greedy_decoding():
    model = tiny_model()
    prompt = torch.tensor([[464, 2068]])
    greedy = generate(model, prompt, 10, temperature=0)
    top1 = generate(model, prompt, 10, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, top1)


def test_padding_token_ids_are_never_sampled():
    model = tiny_model()
    with torch.no_grad():
        # Make the 47 padding rows of the tied embedding huge: without the -inf mask in forward,
        # every sampled token would be a padding id.
        model.transformer.wte.weight[50257:] = 100.0
    logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape[-1] == 50257
    out = generate(model, torch.zeros(8, 1, dtype=torch.long), 16, generator=torch.Generator().manual_seed(0))
    assert out.max().item() < 50257


def test_sequence_longer_than_block_size_is_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match="longer than the model's block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_generation_crops_context_to_block_size():
    model = tiny_model()
    out = generate(model, torch.zeros(1, 30, dtype=torch.long), 10, temperature=0)
    assert out.shape == (1, 40)


def test_unknown_model_size_names_the_choices():
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPTConfig.from_name("gpt5")
