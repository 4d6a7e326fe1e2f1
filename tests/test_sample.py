"""Generation (model.py: the KV cache, padding, sampling filters) and sample.py (streaming, errors)."""

import pytest
import torch
import torch.nn.functional as F

import checkpoint as ck
import generate as generation
import sample
from errors import UserError
from generate import filter_logits, generate, generate_stream, next_token
from hf import from_pretrained
from model import GPT, GPTConfig

BLOCK_SIZE = 32


def tiny_model(seed=0, block_size=BLOCK_SIZE):
    """A 2-layer GPT whose matrices are N(0, 0.3): with GPT-2's N(0, 0.02) a random model mostly repeats
    its last token, whatever came before, and a test comparing two ways of generating would prove little."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_name("tiny", block_size=block_size)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    return model


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50257, (n,), generator=g).tolist() for n in lengths]


def stream(model, prompts, max_new_tokens, **kwargs):
    """generate_stream's steps as one (B, steps) tensor."""
    return torch.stack(list(generate_stream(model, prompts, max_new_tokens, **kwargs)), dim=1)


# ---- the KV cache gives the tokens that recomputing gives ----


@pytest.mark.parametrize("prompt_len", [1, 7, 20])
def test_cached_greedy_equals_recomputed_greedy(prompt_len):
    model = tiny_model()
    prompt = torch.tensor(random_prompts([prompt_len]))
    cached = generate(model, prompt, 12, temperature=0)
    recomputed = generate(model, prompt, 12, temperature=0, use_cache=False)
    assert cached.shape == (1, prompt_len + 12)
    assert torch.equal(cached, recomputed)


def test_batch_of_unequal_prompts_equals_each_prompt_alone():
    model = tiny_model()
    prompts = random_prompts([3, 11, 1, 6])  # left-padded to 11
    cached = stream(model, prompts, 15, temperature=0)
    recomputed = stream(model, prompts, 15, temperature=0, use_cache=False)
    alone = torch.cat([stream(model, [p], 15, temperature=0) for p in prompts])
    assert cached.shape == (4, 15)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, alone)


def test_cache_feeds_each_token_through_the_model_once():
    model = tiny_model()
    widths = []
    model.transformer.wte.register_forward_hook(lambda module, args, out: widths.append(args[0].size(1)))
    stream(model, random_prompts([5, 9]), 6, temperature=0)
    assert widths == [9, 1, 1, 1, 1, 1]  # prefill of the padded prompts, then one position per token
    widths.clear()
    stream(model, random_prompts([5, 9]), 6, temperature=0, use_cache=False)
    assert widths == [9, 10, 11, 12, 13, 14]


def test_reaching_block_size_slides_the_window_and_prefills_its_newest_half():
    model = tiny_model()
    prompt = torch.tensor(random_prompts([BLOCK_SIZE - 4]))
    cached = generate(model, prompt, 20, temperature=0)
    recomputed = generate(model, prompt, 20, temperature=0, use_cache=False)
    assert cached.shape == recomputed.shape == (1, BLOCK_SIZE - 4 + 20)
    # Up to a full block both see every token; the token after needs block_size + 1 positions.
    assert torch.equal(cached[:, : BLOCK_SIZE + 1], recomputed[:, : BLOCK_SIZE + 1])
    assert not torch.equal(cached, recomputed)  # then the windows differ, as documented
    # the cached path goes on as if its prompt were the newest block_size // 2 tokens
    kept = cached[:, BLOCK_SIZE + 1 - BLOCK_SIZE // 2 : BLOCK_SIZE + 1]
    again = generate(model, kept, cached.size(1) - BLOCK_SIZE - 1, temperature=0)
    assert torch.equal(cached[:, BLOCK_SIZE + 1 :], again[:, kept.size(1) :])


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_far_beyond_block_size_never_fails(use_cache):
    model = tiny_model(block_size=8)
    prompts = random_prompts([8, 2])  # one prompt already fills the block
    out = stream(model, prompts, 30, temperature=1.0, generator=torch.Generator().manual_seed(0), use_cache=use_cache)
    assert out.shape == (2, 30)
    assert out.max().item() < 50257


# ---- the same tokens as Hugging Face transformers ----


@pytest.fixture
def hf_pair(tmp_path):
    """A random transformers GPT2LMHeadModel and our GPT loaded from its save_pretrained folder."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=1000,
        n_positions=64,
        n_embd=48,
        n_layer=2,
        n_head=4,
        initializer_range=0.3,
        bos_token_id=999,
        eos_token_id=999,
    )  # see tiny_model
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    hf_model.save_pretrained(tmp_path)
    return hf_model, from_pretrained(str(tmp_path)).eval()


def hf_greedy(hf_model, idx, attention_mask, max_new_tokens):
    eot = hf_model.config.eos_token_id  # passed, so that it neither warns nor falls back to other settings
    return hf_model.generate(
        idx,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=eot,
        eos_token_id=eot,
    )


def test_greedy_equals_transformers_generate(hf_pair):
    hf_model, model = hf_pair
    idx = torch.randint(0, 999, (3, 9), generator=torch.Generator().manual_seed(1))
    theirs = hf_greedy(hf_model, idx, torch.ones_like(idx), 40)
    ours = generate(model, idx, 40, temperature=0, eot=999)
    assert ours.shape == (3, 9 + 40)
    assert torch.equal(ours, theirs)


def test_left_padded_batch_equals_transformers_with_an_attention_mask(hf_pair):
    hf_model, model = hf_pair
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    idx = torch.tensor([[999] * (8 - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (8 - len(p)) + [1] * len(p) for p in prompts])
    theirs = hf_greedy(hf_model, idx, attention_mask, 30)[:, 8:]
    assert torch.equal(stream(model, prompts, 30, temperature=0, eot=999), theirs)


# ---- sampling ----


def test_seeded_sampling_is_reproducible():
    model = tiny_model()
    prompts = random_prompts([4, 2])

    def draw(seed):
        return stream(
            model, prompts, 20, temperature=0.9, top_k=100, top_p=0.9, generator=torch.Generator().manual_seed(seed)
        )

    first, again, other = draw(42), draw(42), draw(7)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


LOGITS = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]).log()  # a hand-built distribution; token 4 has p=0


def filtered_probs(**kwargs):
    return torch.softmax(filter_logits(LOGITS, **kwargs), dim=-1)[0]


def test_top_k_keeps_exactly_the_k_most_likely_tokens():
    expected = torch.tensor([0.5, 0.3, 0.15, 0, 0]) / 0.95
    torch.testing.assert_close(filtered_probs(top_k=3), expected)
    torch.testing.assert_close(filtered_probs(top_k=1), torch.tensor([1.0, 0, 0, 0, 0]))


def test_top_p_keeps_the_fewest_tokens_that_reach_p():
    torch.testing.assert_close(filtered_probs(top_p=0.7), torch.tensor([0.5, 0.3, 0, 0, 0]) / 0.8)
    torch.testing.assert_close(filtered_probs(top_p=0.4), torch.tensor([1.0, 0, 0, 0, 0]))
    torch.testing.assert_close(filtered_probs(top_p=0.9), torch.tensor([0.5, 0.3, 0.15, 0, 0]) / 0.95)
    torch.testing.assert_close(filtered_probs(top_p=1.0), torch.tensor([0.5, 0.3, 0.15, 0.05, 0]))
    # top_k first, then top_p of what is left: 0.5 / 0.8 = 0.625 < 0.7, so the second token stays
    torch.testing.assert_close(filtered_probs(top_k=2, top_p=0.7), torch.tensor([0.5, 0.3, 0, 0, 0]) / 0.8)


@pytest.mark.parametrize("kwargs, allowed", [(dict(top_k=2), {0, 1}), (dict(top_p=0.9), {0, 1, 2})])
def test_sampling_never_emits_a_filtered_token(kwargs, allowed):
    logits = LOGITS.expand(4000, -1)  # 4,000 draws at once
    drawn = next_token(logits, temperature=1.0, generator=torch.Generator().manual_seed(0), **kwargs)
    assert set(drawn.tolist()) == allowed


def test_generation_stops_at_eot():
    model = tiny_model()
    prompt = torch.tensor(random_prompts([3]))
    free = generate(model, prompt, 10, temperature=0)
    eot = free[0, 3 + 4].item()  # make the fifth new token the end-of-text token
    assert eot not in free[0, 3 : 3 + 4].tolist()
    assert torch.equal(generate(model, prompt, 10, temperature=0, eot=eot), free[:, : 3 + 5])


def test_finished_rows_repeat_eot_until_every_row_has_finished(monkeypatch):
    model = tiny_model()
    EOT = 7
    wanted = torch.tensor([[1, 2, EOT, 3, 4, 5], [4, 5, 6, 8, EOT, 9]])  # (B, steps): the token each step picks
    step = iter(range(6))
    one_hot = lambda model, idx, real, kv_cache=None: F.one_hot(wanted[:, next(step)], 50257).float()  # noqa: E731
    monkeypatch.setattr(generation, "next_logits", one_hot)
    assert stream(model, [[1], [2, 3]], 6, temperature=0, eot=EOT).tolist() == [
        [1, 2, EOT, EOT, EOT],
        [4, 5, 6, 8, EOT],
    ]


TOO_LONG = [[1] * 33]  # BLOCK_SIZE + 1 tokens


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens=0: generate at least 1 token"),
        (dict(temperature=-0.5), "temperature=-0.5: must be >= 0"),
        (dict(top_k=0), "top_k=0: must be at least 1"),
        (dict(top_p=0.0), r"top_p=0.0: must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5: must be in \(0, 1\]"),
        (dict(prompts=[[1, 2], []]), "empty prompt"),
        (dict(prompts=TOO_LONG), f"prompt of 33 tokens is longer than the model's block_size={BLOCK_SIZE}"),
    ],
)
def test_bad_generation_arguments_raise_before_the_first_token(kwargs, message):
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=5) | kwargs
    with pytest.raises(UserError, match=message):
        generate_stream(tiny_model(), **args)  # no iteration: the error comes from the call itself


# ---- sample.py ----


@pytest.fixture
def tokenizer(gpt2_tokenizer):  # gpt2_tokenizer skips the test when the BPE files are not here
    from tokenizer import get_tokenizer

    return get_tokenizer("gpt2")


def test_text_stream_never_splits_a_multi_byte_character(tokenizer):
    text = "héllo 🤖 wörld 日本語"
    tokens = tokenizer.encode(text)
    assert len(tokens) > len(text.split())  # the emoji and the kanji span several tokens
    text_stream = sample.TextStream(tokenizer)
    chunks = [text_stream.push(token) for token in tokens] + [text_stream.finish()]
    assert "".join(chunks) == text
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_text_stream_ends_before_a_stop_string_that_spans_tokens(tokenizer):
    text_stream = sample.TextStream(tokenizer, stop=["ld 日"])
    shown = ""
    for token in tokenizer.encode("héllo 🤖 wörld 日本語"):
        shown += text_stream.push(token)
        if text_stream.stopped:
            break
    assert shown + text_stream.finish() == "héllo 🤖 wör"


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = tiny_model(block_size=64)
    path = tmp_path / "model_00010.pt"
    torch.save(ck.model_checkpoint(model), path)
    return str(path), model


def test_cli_streams_the_same_text_as_generate(tiny_checkpoint, tokenizer, capsys):
    path, model = tiny_checkpoint
    sample.main(
        [
            "--checkpoint",
            path,
            "--num_samples",
            "2",
            "--max_new_tokens",
            "15",
            "--seed",
            "3",
            "--top_k",
            "50",
            "--top_p",
            "0.95",
            "--device",
            "cpu",
        ]
    )
    prompt = tokenizer.encode(sample.SAMPLE_PROMPT)
    generator = torch.Generator().manual_seed(3)  # streamed: one sample after the other, one generator
    expected = ""
    for i in range(2):
        out = generate(model, torch.tensor([prompt]), 15, top_k=50, top_p=0.95, generator=generator)
        expected += f"--- sample {i + 1}/2\n{tokenizer.decode(out[0].tolist())}\n"
    assert capsys.readouterr().out == expected


def test_cli_no_stream_generates_one_batch(tiny_checkpoint, tokenizer, tmp_path, capsys):
    path, model = tiny_checkpoint
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Once upon a time\n", encoding="utf-8")
    sample.main(
        [
            "--checkpoint",
            path,
            "--prompt_file",
            str(prompt_file),
            "--num_samples",
            "3",
            "--max_new_tokens",
            "10",
            "--seed",
            "5",
            "--no_stream",
        ]
    )
    prompt = tokenizer.encode("Once upon a time\n")
    out = generate(model, torch.tensor([prompt] * 3), 10, generator=torch.Generator().manual_seed(5))
    expected = "".join(f"--- sample {i + 1}/3\n{tokenizer.decode(row)}\n" for i, row in enumerate(out.tolist()))
    assert capsys.readouterr().out == expected


def test_cli_greedy_stops_at_a_stop_string(tiny_checkpoint, tokenizer, capsys):
    path, model = tiny_checkpoint
    prompt = tokenizer.encode("The")
    greedy = tokenizer.decode(generate(model, torch.tensor([prompt]), 12, temperature=0)[0, 1:].tolist())
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 3]  # three characters from the middle of the text
    sample.main(
        [
            "--checkpoint",
            path,
            "--prompt",
            "The",
            "--num_samples",
            "1",
            "--max_new_tokens",
            "12",
            "--temperature",
            "0",
            "--stop",
            stop,
        ]
    )
    assert capsys.readouterr().out == f"--- sample 1/1\nThe{greedy[: greedy.index(stop)]}\n"


@pytest.mark.parametrize("flags, samples", [([], 1), (["--num_samples", "3"], 3), (["--no_stream"], 1)])
def test_cli_greedy_prints_one_sample_unless_told(tiny_checkpoint, tokenizer, capsys, flags, samples):
    """The README's greedy line (--temperature 0, no --num_samples): one sample, not four identical
    ones; asked for three, three, and a note on stderr that they are the same."""
    path, model = tiny_checkpoint
    sample.main(["--checkpoint", path, "--prompt", "The", "--max_new_tokens", "8", "--temperature", "0", *flags])
    greedy = tokenizer.decode(generate(model, torch.tensor([tokenizer.encode("The")]), 8, temperature=0)[0].tolist())
    out, err = capsys.readouterr()
    assert out == "".join(f"--- sample {i + 1}/{samples}\n{greedy}\n" for i in range(samples))
    note = "note: --temperature 0 is greedy: the 3 samples will be identical\n"
    assert err == (note if samples > 1 else "")


def test_cli_help_says_greedy_prints_one_sample(capsys):
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    assert "(default: 4; 1 with --temperature 0, as greedy ones are all the same)" in " ".join(
        capsys.readouterr().out.split()
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt", ""], "empty prompt"),
        (["--prompt", " word" * 70], "prompt of 70 tokens is longer than the model's block_size=64"),
        (["--max_new_tokens", "0"], "max_new_tokens=0"),
        (["--top_p", "1.5"], r"top_p=1.5: must be in \(0, 1\]"),
        (["--top_p", "0"], r"top_p=0.0: must be in \(0, 1\]"),
        (["--temperature", "-1"], "temperature=-1.0: must be >= 0"),
        (["--top_k", "0"], "top_k=0: must be at least 1"),
        (["--num_samples", "0"], "--num_samples 0"),
        (["--prompt_file", "no/such/prompt.txt"], "--prompt_file no/such/prompt.txt: cannot read it"),
    ],
)
def test_cli_errors_are_one_line(tiny_checkpoint, tokenizer, capsys, flags, message):
    with pytest.raises(SystemExit, match=message) as exit_info:
        sample.main(["--checkpoint", tiny_checkpoint[0], "--max_new_tokens", "5"] + flags)
    assert str(exit_info.value).startswith("error: ") and "\n" not in str(exit_info.value)
    assert capsys.readouterr().out == ""  # nothing printed before the error


@pytest.mark.parametrize("content", [None, b"not a checkpoint"])
def test_cli_missing_or_unreadable_checkpoint_is_one_line(tmp_path, content):
    path = tmp_path / "model_00010.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--checkpoint", str(path)])
    message = str(exit_info.value)
    assert message.startswith(f"error: {'cannot read checkpoint' if content else 'checkpoint'} {path}")
    assert "\n" not in message
