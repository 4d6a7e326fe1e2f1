"""chat.py: replies (stop tokens, the kept KV cache, Ctrl-C), the context overflow, the terminal. The
server (the OpenAI API, the page) is tests/test_serve.py's."""

import io
import random
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import usage_error

import chat
import checkpoint as ck
from chat_template import render_prompt
from errors import UserError
from generate import generate_stream
from model import GPT, GPTConfig
from prefix import apply_prefix


def tiny_chat_model(seed=0):
    """A 2-layer GPT over gpt2-chat's 50,261 ids. Its matrices are N(0, 0.3): with GPT-2's N(0, 0.02) a
    random model barely looks at its context, and a test that two conversations do not mix would
    prove little."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=50261, n_layer=2, n_head=2, n_embd=32, block_size=128)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    return model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    path = str(tmp_path_factory.mktemp("random", numbered=False) / "model_00000.pt")  # the page shows both names
    ck.save_checkpoint(path, ck.model_checkpoint(tiny_chat_model(), tokenizer))
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def seeded(seed, temperature=1.0):
    return dict(temperature=temperature, top_k=None, top_p=None, generator=torch.Generator().manual_seed(seed))


class ScriptedModel:
    """Stands in for a GPT in Chat: 'samples' the given token ids, whatever the prompt. After
    interrupt_after of them it raises KeyboardInterrupt, as a Ctrl-C mid-reply does."""

    config = SimpleNamespace(block_size=128)

    def __init__(self, ids, interrupt_after=None):
        self.ids, self.interrupt_after = ids, interrupt_after

    def generate_stream(self, prompts, max_new_tokens, kv_cache=None, **sampling):
        for i, token in enumerate(self.ids[:max_new_tokens]):
            if i == self.interrupt_after:
                self.interrupt_after = None  # once
                raise KeyboardInterrupt
            yield torch.tensor([token])


@pytest.fixture(autouse=True)
def fake_models_stream_their_own_ids(monkeypatch):
    """chat.py streams with generate.generate_stream(model, ...): a ScriptedModel streams its own ids."""

    def stream(model, prompts, max_new_tokens, **sampling):
        if isinstance(model, ScriptedModel):
            return model.generate_stream(prompts, max_new_tokens, **sampling)
        return generate_stream(model, prompts, max_new_tokens, **sampling)

    monkeypatch.setattr(chat, "generate_stream", stream)


# ---- a reply: where it ends, what it prints ----


@pytest.mark.parametrize("stop", ["<|end|>", "<|endoftext|>", "<|user|>"])
def test_reply_ends_at_a_special_token_and_never_shows_it(tokenizer, stop):
    text = "Paris, of course 🙂"  # the emoji is split over several tokens: it must come out whole
    ids = tokenizer.encode(text) + [tokenizer.special(stop)] + tokenizer.encode(" and more")
    replier = chat.Chat(ScriptedModel(ids), tokenizer, reuse_cache=False)
    assert "".join(replier.reply([user("Capital of France?")], 50)) == text
    assert replier.finish_reason == "stop"


def test_reply_ends_after_max_new_tokens(tokenizer):
    ids = tokenizer.encode(" one two three four five")
    replier = chat.Chat(ScriptedModel(ids), tokenizer, reuse_cache=False)
    assert "".join(replier.reply([user("Count")], 3)) == tokenizer.decode(ids[:3])
    assert replier.finish_reason == "length"


@pytest.mark.parametrize("prefix_len", [0, 4])
def test_kept_cache_gives_the_replies_of_a_fresh_one(tokenizer, prefix_len):
    """Three turns, reusing the KV cache between them and not: the same replies, and from the second
    turn on at least the whole previous prompt comes from the cache. A prefix-tuned model's prefix
    stays the cache's first positions, whatever the turn reuses."""
    model = tiny_chat_model()
    if prefix_len:
        apply_prefix(model, prefix_len)
    replies = {}
    for reuse in (False, True):
        replier, messages, sampling = chat.Chat(model, tokenizer, reuse_cache=reuse), [], seeded(3)
        replies[reuse], previous_prompt = [], 0
        for text in ["Hello there", "Tell me more about it", "Thanks!"]:
            messages = messages + [user(text)]
            replies[reuse].append("".join(replier.reply(messages, 16, **sampling)))
            messages = messages + [assistant(replies[reuse][-1])]
            if reuse:
                assert replier.reused >= previous_prompt
            previous_prompt = len(render_prompt(messages[:-1], tokenizer))
    assert replies[True] == replies[False]
    assert len(set(replies[True])) == 3


def test_ctrl_c_inside_a_step_leaves_no_half_written_cache(tokenizer):
    """A Ctrl-C between two layers of a step leaves the first layer's cache a position ahead of the
    second's: the next turn, which starts with the stopped reply, must not build on that."""
    model = tiny_chat_model()
    messages = [user("Hello there"), assistant("Hi! What can I do for you?"), user("Tell me a story")]
    replier = chat.Chat(model, tokenizer)
    layer = model.transformer.h[1]
    calls = []

    def interrupted_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # the 6th step: layer 0 has appended its keys, layer 1 never will
            raise KeyboardInterrupt
        return type(layer).forward(layer, *args, **kwargs)

    layer.forward = interrupted_forward
    shown = []
    with pytest.raises(KeyboardInterrupt):
        for chunk in replier.reply(messages, 16, **seeded(5)):
            shown.append(chunk)
    del layer.forward
    assert len(shown) == 5
    assert replier.cache is None or len({layer.length for layer in replier.cache}) == 1

    follow_up = messages + [assistant("".join(shown)), user("Go on")]
    fresh = "".join(chat.Chat(model, tokenizer, reuse_cache=False).reply(follow_up, 16, **seeded(6)))
    assert "".join(replier.reply(follow_up, 16, **seeded(6))) == fresh


# ---- the conversation outgrows the context ----


def test_oldest_turns_are_dropped_until_the_conversation_fits(tokenizer):
    replier = chat.Chat(tiny_chat_model(), tokenizer)  # block_size 128: prompts of 104 tokens leave room for 24
    system = {"role": "system", "content": "Be brief."}
    # dropping the long first question alone would be enough, but the answer to it must go too
    exchanges = [[user("A long first question, " * 10), assistant("Answer 0.")]]
    exchanges += [[user(f"Question number {i}?"), assistant(f"Answer number {i}.")] for i in range(1, 4)]
    messages = [system, *sum(exchanges, []), user("And the last question?")]
    assert len(render_prompt(messages, tokenizer)) > 104 >= len(render_prompt([system] + messages[2:], tokenizer))

    kept, dropped = replier.fit(messages, max_new_tokens=24)
    assert (kept, dropped) == ([system] + messages[3:], 2)
    assert replier.fit(kept, max_new_tokens=24) == (kept, 0)

    many = [
        system,
        *sum([[user(f"Question number {i}, a fairly long one."), assistant(f"Answer {i}.")] for i in range(8)], []),
        user("And the last question?"),
    ]
    kept, dropped = replier.fit(many, max_new_tokens=24)
    assert kept == [system] + many[1 + dropped :] and dropped % 2 == 0
    assert len(render_prompt(kept, tokenizer)) <= 104 < len(render_prompt([system] + many[dropped - 1 :], tokenizer))

    with pytest.raises(UserError, match="too long"):
        replier.fit([system, user("word " * 200)], max_new_tokens=24)


def fit_by_rendering_again(replier, messages, max_new_tokens):
    """Chat.fit as it was first written, the oracle: render what is left after dropping each pair of
    turns, all of it again each time (quadratic in the conversation's length)."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    dropped = 0
    while len(render_prompt(system + turns[dropped:], replier.tokenizer)) > replier.block_size - max_new_tokens:
        if dropped + 1 >= len(turns):
            raise UserError("the message is too long")
        dropped += 2
    return system + turns[dropped:], dropped


def random_conversation(rng, exchanges, words):
    """A conversation of `exchanges` user/assistant pairs and a last user message, maybe with a system
    message first, each message 0 to `words` random words long."""

    def text():
        return " ".join(
            rng.choice(["the", "model", "🙂", "tokenisation", "a", "Paris"]) for _ in range(rng.randint(0, words))
        )

    messages = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
    for _ in range(exchanges):
        messages += [user(text()), assistant(text())]
    return messages + [user(text())]


def test_fit_keeps_the_turns_that_rendering_again_kept(tokenizer):
    replier = chat.Chat(ScriptedModel([]), tokenizer)  # block_size 128
    rng = random.Random(0)
    outcomes = set()
    for _ in range(300):
        messages = random_conversation(rng, exchanges=rng.randint(0, 12), words=rng.choice([3, 12, 40]))
        max_new_tokens = rng.choice([1, 24, 64])
        try:
            expected = fit_by_rendering_again(replier, messages, max_new_tokens)
        except UserError:
            with pytest.raises(UserError, match="^the message is too long"):
                replier.fit(messages, max_new_tokens)
            outcomes.add("too long")
            continue
        assert replier.fit(messages, max_new_tokens) == expected
        outcomes.add("dropped" if expected[1] else "whole")
    assert outcomes == {"too long", "dropped", "whole"}  # every case, many times over


def test_fit_of_a_600_turn_conversation_encodes_only_what_fits(tokenizer, monkeypatch):
    """A 600-turn conversation of 600 KB (each message within --max_message_chars) took 14 s to fit
    when every dropped pair of turns re-encoded all the rest: each message is now encoded once at
    most, and those older than what fits not at all."""
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(300):
        messages += [
            user(f"Question {i}: " + "why is the sky blue? " * 50),
            assistant(f"Answer {i}: " + "light. " * 140),
        ]
    messages.append(user("And the last question?"))
    total_chars = sum(len(message["content"]) for message in messages)
    assert len(messages) == 602 and total_chars > 600_000
    replier = chat.Chat(ScriptedModel([]), tokenizer)  # block_size 128
    encoded = []
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text: encoded.append(text) or encode(text))

    kept, dropped = replier.fit(messages, max_new_tokens=24)
    assert sum(map(len, encoded)) <= total_chars  # linear: no message encoded twice
    assert len(encoded) <= len(kept) + 2  # the kept messages, and the one or two before them that did not fit
    monkeypatch.undo()
    assert kept == messages[:1] + messages[1 + dropped :] and kept[1]["role"] == "user" and dropped % 2 == 0
    room = replier.block_size - 24
    assert (
        len(render_prompt(kept, tokenizer))
        <= room
        < len(render_prompt(messages[:1] + messages[dropped - 1 :], tokenizer))
    )


# ---- the terminal ----


def test_prompt_prints_the_reply_and_exits(tiny_checkpoint, tokenizer, capsys):
    chat.main(
        [
            "--checkpoint",
            tiny_checkpoint,
            "--prompt",
            "Capital of France?",
            "--system",
            "Be brief.",
            "--max_new_tokens",
            "12",
            "--temperature",
            "0.8",
            "--top_k",
            "100",
            "--seed",
            "7",
        ]
    )
    out = capsys.readouterr()
    # the same reply, computed without chat.py: the template, the sampling flags, the stop tokens
    model = ck.model_from_checkpoint(tiny_checkpoint).eval()
    messages = [{"role": "system", "content": "Be brief."}, user("Capital of France?")]
    generator = torch.Generator().manual_seed(7)
    steps = generate_stream(
        model, [render_prompt(messages, tokenizer)], 12, temperature=0.8, top_k=100, generator=generator
    )
    ids = []
    for next_id in steps:
        if next_id.item() in tokenizer.special_tokens.values():
            break
        ids.append(next_id.item())
    assert ids and out.out == tokenizer.decode(ids) + "\n"
    # stdout is the reply alone; the mark of a reply cut at 12 tokens goes to stderr
    assert out.err == (" [cut at --max_new_tokens 12]" if len(ids) == 12 else "")


def test_terminal_conversation_goes_on_past_the_context(tiny_checkpoint, monkeypatch, capsys):
    lines = [f"This is message number {i} of a long conversation" for i in range(8)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines[:6] + ["/reset"] + lines[6:] + ["/quit"]) + "\n"))
    chat.main(["--checkpoint", tiny_checkpoint, "--max_new_tokens", "24"])
    out = capsys.readouterr().out
    assert out.count("you> ") == 10  # 8 messages, /reset, /quit
    assert "dropped its oldest 2 turns" in out
    assert "(a new conversation)" in out


def test_a_reply_cut_at_max_new_tokens_is_marked(tokenizer, monkeypatch, capsys):
    ids = tokenizer.encode(" one two three four five") + [tokenizer.special("<|end|>")]
    replier = chat.Chat(ScriptedModel(ids), tokenizer, reuse_cache=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Count\n/quit\n"))
    chat.chat_loop(replier, [], 3, {})
    assert capsys.readouterr().out == f"you> {tokenizer.decode(ids[:3])} [cut at --max_new_tokens 3]\nyou> "


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "nan"], "temperature=NaN: must be a number"),
        (["--temperature", "1e-40"], "temperature=1e-40: must be 0 (the most likely token) or at least 0.001"),
        (["--top_p", "nan"], "top_p=NaN: must be a number"),
        (["--top_k", "0"], "top_k=0: must be at least 1"),
        (["--seed", str(10**23)], "seed=100000000000000000000000: must be from 0 to 2**64 - 1"),
        (["--max_new_tokens", "0"], "max_new_tokens=0: must be at least 1"),
    ],
)
def test_sampling_flags_are_checked_before_the_model_loads(flags, message):
    with pytest.raises(SystemExit) as exit:
        chat.main(["--checkpoint", "no/such/model.pt", "--prompt", "Hi", *flags])
    assert exit.value.code == f"error: {message}"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--bench", "0"], "argument --bench: must be at least 1, not 0"),
        (["--top_k", "x"], "argument --top_k: invalid int value: 'x'"),
    ],
)
def test_flags_out_of_range_are_refused_when_parsed(flags, message, capsys):
    assert usage_error(chat.main, ["--checkpoint", "no/such/model.pt", *flags], capsys).endswith(f"error: {message}")


def test_ctrl_c_stops_the_reply_and_the_conversation_goes_on(tokenizer, monkeypatch, capsys):
    ids = tokenizer.encode(" Once upon a time there was a model") + [tokenizer.special("<|end|>")]
    replier = chat.Chat(ScriptedModel(ids, interrupt_after=3), tokenizer, reuse_cache=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Tell me a story\nAgain, please\n/quit\n"))
    chat.chat_loop(replier, [], 50, {})
    out = capsys.readouterr().out
    assert f"you> {tokenizer.decode(ids[:3])} [stopped]\n" in out
    assert "you>  Once upon a time there was a model\n" in out
