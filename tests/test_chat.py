"""chat.py: replies (stop tokens, the kept KV cache, Ctrl-C), the context overflow, the terminal, the
web API in-process (every field checked, fuzzed request bodies) and over HTTP on 127.0.0.1, and the page
in a real headless Chromium."""

import asyncio
import io
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import chat
import checkpoint as ck
from chat_template import render_prompt
from device import setup_precision
from errors import UserError
from generate import generate_stream
from model import GPT, GPTConfig
from prefix import apply_prefix
from tokenizer import get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_MAX_NEW_TOKENS = 24
SERVER_MAX_MESSAGE_CHARS = 200


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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model gains nothing from a second thread, and on a busy 2-core machine each op then waits
    for a thread that is not running: torch.multinomial over 50k ids took 23 ms instead of 1 here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("gpt2-chat")


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
        (["--web", "--port", "70000"], "argument --port: must be between 0 and 65535, not 70000"),
        (["--web", "--port", "-1"], "argument --port: must be between 0 and 65535, not -1"),
        (["--web", "--max_request_bytes", "0"], "argument --max_request_bytes: must be at least 1, not 0"),
        (["--bench", "0"], "argument --bench: must be at least 1, not 0"),
    ],
)
def test_flags_out_of_range_are_refused_when_parsed(flags, message, capsys):
    """--port 70000 was an OverflowError's traceback once the model had loaded."""
    with pytest.raises(SystemExit) as exit:
        chat.main(["--checkpoint", "no/such/model.pt", *flags])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    assert err.endswith(f"error: {message}\n")


def test_ctrl_c_stops_the_reply_and_the_conversation_goes_on(tokenizer, monkeypatch, capsys):
    ids = tokenizer.encode(" Once upon a time there was a model") + [tokenizer.special("<|end|>")]
    replier = chat.Chat(ScriptedModel(ids, interrupt_after=3), tokenizer, reuse_cache=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Tell me a story\nAgain, please\n/quit\n"))
    chat.chat_loop(replier, [], 50, {})
    out = capsys.readouterr().out
    assert f"you> {tokenizer.decode(ids[:3])} [stopped]\n" in out
    assert "you>  Once upon a time there was a model\n" in out


# ---- the web API, in-process: every field of a request checked, and fuzzed ----

APP_MAX_NEW_TOKENS = 8  # short replies keep a fuzz of a hundred requests fast
APP_MAX_REQUEST_BYTES = 8192


def app_args(max_new_tokens=APP_MAX_NEW_TOKENS):
    return chat.parse_args(
        ["--model", "tiny", "--web", "--max_new_tokens", str(max_new_tokens)]
        + ["--max_message_chars", str(SERVER_MAX_MESSAGE_CHARS), "--max_request_bytes", str(APP_MAX_REQUEST_BYTES)]
    )


def in_process(replier, args):
    """chat.py's app, served by Starlette's TestClient: no socket, no subprocess."""
    from fastapi.testclient import TestClient

    page = chat.read_page(chat.PAGE_FILE)
    return TestClient(chat.make_app(replier, args, setup_precision("float32", "cpu"), "cpu", page, "tiny"))


@pytest.fixture(scope="module")
def app(tokenizer):
    with in_process(chat.Chat(tiny_chat_model(), tokenizer), app_args()) as client:
        yield client


def post(client, body):
    """The response to a request whose body is body's JSON (NaN and Infinity as Python writes them), or body's bytes."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/api/chat", content=content, headers={"content-type": "application/json"})


def events_of(response):
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    return [json.loads(block[len("data: ") :]) for block in response.text.split("\n\n") if block]


HI = [user("Hi")]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"temperature": float("nan")}, "temperature=NaN: must be a number"),
        ({"temperature": float("inf")}, "temperature=Infinity: must be a number"),
        ({"temperature": 10**400}, "temperature=1000000000000000000000000000000000000000...: must be a number"),
        ({"temperature": True}, "temperature=true: must be a number"),
        ({"temperature": "hot"}, 'temperature="hot": must be a number'),
        ({"temperature": -0.5}, "temperature=-0.5: must be 0 (the most likely token) or at least 0.001"),
        ({"temperature": 1e-40}, "temperature=1e-40: must be 0 (the most likely token) or at least 0.001"),
        ({"top_p": float("nan")}, "top_p=NaN: must be a number"),
        ({"top_p": 1e-300}, "top_p=1e-300: must be from 0.001 to 1 (1 keeps every token)"),
        ({"top_p": 1.5}, "top_p=1.5: must be from 0.001 to 1 (1 keeps every token)"),
        ({"top_k": 2.0}, "top_k=2.0: must be an integer"),
        ({"top_k": 0}, "top_k=0: must be at least 1"),
        ({"seed": 10**23}, "seed=100000000000000000000000: must be from 0 to 2**64 - 1"),
        ({"seed": -1}, "seed=-1: must be from 0 to 2**64 - 1"),
        ({"seed": [1]}, "seed=a list: must be an integer"),
        ({"max_new_tokens": False}, "max_new_tokens=false: must be an integer"),
        ({"max_new_tokens": 0}, "max_new_tokens=0: must be at least 1"),
        ({"max_new_tokens": 9}, "max_new_tokens=9: this server writes at most 8 tokens per reply (--max_new_tokens)"),
        ({"stream": "no"}, 'stream="no": must be true or false'),
        (
            {"temprature": 0.5},
            'no field "temprature": a request has messages, stream, max_new_tokens, temperature, top_k, top_p, seed',
        ),
    ],
)
def test_every_field_is_checked_for_kind_finiteness_and_range(app, fields, message):
    response = post(app, {"messages": HI, **fields})
    assert (response.status_code, response.json()) == (400, {"error": message})


@pytest.mark.parametrize(
    "body, message",
    [
        (b"Hi", "the request body is not JSON: Expecting value: line 1 column 1 (char 0)"),
        (
            b"\xff{}",
            "the request body is not JSON: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte",
        ),
        (b'{"messages": ' + b"[" * 2000 + b"]" * 2000 + b"}", "the request body is JSON nested too deep"),
        (b"[]", "send a JSON object whose `messages` is the conversation so far, ending with the user's turn"),
        (
            json.dumps({"messages": [user("Hi"), assistant("Hello")] * 64 + HI}).encode(),
            "a conversation of 129 messages: this server takes at most 128 (each message takes 2 or more of the "
            "model's 128 tokens of context): leave out the oldest",
        ),
    ],
)
def test_bodies_that_are_no_request_get_a_clear_error(app, body, message):
    response = post(app, body)
    assert (response.status_code, response.json()) == (400, {"error": message})


def test_null_fields_take_the_servers_settings(app):
    args = app_args()
    null = {name: None for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")}
    flags = {name: getattr(args, name) for name in null}
    replies = [post(app, {"messages": HI, **fields, "stream": False}).json() for fields in ({}, null, flags)]
    assert replies[0] == replies[1] == replies[2] and replies[0]["reply"]
    assert events_of(post(app, {"messages": HI, **null, "stream": None}))[-1]["reply"] == replies[0]["reply"]


def test_a_body_over_max_request_bytes_gets_413(app):
    body = json.dumps({"messages": HI, "stream": False}).encode()
    exactly = body + b" " * (APP_MAX_REQUEST_BYTES - len(body))  # JSON may end in white space
    assert post(app, exactly).status_code == 200
    response = post(app, exactly + b" ")
    assert (response.status_code, response.json()) == (
        413,
        {"error": "a request of more than 8,192 bytes: this server reads at most 8,192 (--max_request_bytes)"},
    )
    # without a Content-Length (chunked), the body is read no further than the limit
    chunks = iter([exactly, b" " * 10_000, b"never read"])
    response = app.post("/api/chat", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_reading_fitting_and_writing_run_off_the_event_loop(app, tokenizer, monkeypatch):
    """A 600-turn conversation once stalled every other client for 11 s: encoding, fitting and
    generating must run in threads, never in the event loop's."""
    on_the_loop = []

    def in_the_loop():
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    encode, stream = tokenizer.encode, chat.generate_stream
    monkeypatch.setattr(tokenizer, "encode", lambda text: on_the_loop.append(in_the_loop()) or encode(text))
    monkeypatch.setattr(chat, "generate_stream", lambda *a, **k: on_the_loop.append(in_the_loop()) or stream(*a, **k))
    for stream_it in (True, False):
        on_the_loop.clear()
        assert post(app, {"messages": CONVERSATION["messages"], "stream": stream_it}).status_code == 200
        assert len(on_the_loop) > 3 and not any(on_the_loop)


@pytest.mark.parametrize("stream", [True, False])
def test_the_api_says_whether_the_reply_was_cut(tokenizer, stream):
    ids = tokenizer.encode(" Paris, of course.") + [tokenizer.special("<|end|>")] + tokenizer.encode(" More")
    with in_process(chat.Chat(ScriptedModel(ids), tokenizer, reuse_cache=False), app_args(24)) as client:
        replies = []
        for max_new_tokens in (24, 2):
            response = post(client, {"messages": HI, "max_new_tokens": max_new_tokens, "stream": stream})
            reply = events_of(response)[-1] if stream else response.json()
            replies.append({name: reply[name] for name in ("reply", "dropped", "finish_reason")})
    assert replies == [
        {"reply": " Paris, of course.", "dropped": 0, "finish_reason": "stop"},
        {"reply": tokenizer.decode(ids[:2]), "dropped": 0, "finish_reason": "length"},
    ]


def request_bodies():
    """Hypothesis strategy: request bodies, from well-formed to nonsense: a conversation with fields
    that make sense, the same with one field set to any number or JSON value at all (the faults
    hide there: NaN, 10**23, null, true), messages of any shape, any JSON, bytes that are not JSON."""
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
    anything = st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    )
    text = st.text(max_size=40)  # any code points, lone surrogates too
    conversations = st.builds(
        lambda system, pairs, last: (
            ([{"role": "system", "content": system}] if system is not None else [])
            + [message for question, answer in pairs for message in (user(question), assistant(answer))]
            + [user(last)]
        ),
        st.none() | text,
        st.lists(st.tuples(text, text), max_size=3),
        st.one_of(text, text, text, st.just("x" * (SERVER_MAX_MESSAGE_CHARS + 1)), st.just("🙂" * 60)),  # too long
    )
    sensible = {
        "stream": st.none() | st.booleans(),
        "max_new_tokens": st.none() | st.integers(1, APP_MAX_NEW_TOKENS),
        "temperature": st.none() | st.floats(0, 2),
        "top_k": st.none() | st.integers(1, 100),
        "top_p": st.none() | st.floats(0.001, 1),
        "seed": st.none() | st.integers(0, 2**64 - 1),
    }
    requests = st.fixed_dictionaries({"messages": conversations}, optional=sensible)
    one_field_off = st.builds(
        lambda request, name, value: {**request, name: value},
        requests,
        st.sampled_from([*sensible, "temprature"]),
        st.one_of(st.sampled_from(ODD_VALUES), st.floats(), st.integers(), anything),
    )
    messages = st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant"]) | anything, "content": text | anything}
        )
        | anything,
        max_size=4,
    )
    return st.one_of(
        requests,
        one_field_off,
        one_field_off,
        one_field_off,
        st.fixed_dictionaries({"messages": messages}),
        anything,
        st.binary(max_size=40),
    )


def reply_or_error(response):
    """A response's reply (its stream's "done" event), or its one-line error; AssertionError for anything else."""
    if response.status_code == 400:
        error = response.json()["error"]
        assert isinstance(error, str) and error and "\n" not in error
        return error
    assert response.status_code == 200, response.text
    reply = events_of(response)[-1] if response.headers["content-type"].startswith("text/") else response.json()
    assert isinstance(reply["reply"], str) and reply["finish_reason"] in ("stop", "length"), reply
    return reply


# The values that broke the server once (NaN, 10**23, null) and their kin: the edges of JSON's numbers
ODD_VALUES = [None, True, False, 0, -1, 1, 0.5, 2.0, float("nan"), float("inf"), float("-inf"), 1e-40, 1e-300]
ODD_VALUES += [5e-324, 1e308, 2**63, 2**64 - 1, 2**64, 10**23, 10**400, "1", "", [], [1], {}, {"a": 1}]


@pytest.mark.parametrize("name", ["stream", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "temprature"])
def test_each_field_at_the_edges_of_json_gets_200_or_400(app, capsys, name):
    """Each field set to each of ODD_VALUES, the rest of the request sensible: a reply or a one-line
    error, never a 500 nor a traceback in the server's log."""
    outcomes = {json.dumps(value): reply_or_error(post(app, {"messages": HI, name: value})) for value in ODD_VALUES}
    assert "Traceback" not in capsys.readouterr().err
    if name == "temprature":  # not a field
        assert set(outcomes.values()) == {outcomes["null"]} and outcomes["null"].startswith('no field "temprature"')
    else:  # null takes the server's setting; a list is never a setting
        assert isinstance(outcomes["null"], dict) and isinstance(outcomes["[]"], str)


def test_fuzzed_requests_get_200_or_400_and_the_server_keeps_serving(app, capsys):
    """Any body at all: a reply (200, whose stream ends in "done") or a one-line error (400), never a
    500 nor a traceback in the server's log; and afterwards the server replies as before."""
    from hypothesis import example, given, settings

    before = post(app, {**CONVERSATION, "stream": False}).json()
    statuses = set()

    @settings(max_examples=150, deadline=None, database=None)
    @given(request_bodies())
    @example({"messages": HI, "temperature": float("nan"), "stream": False})  # the faults found first
    @example({"messages": HI, "temperature": float("nan")})
    @example({"messages": HI, "seed": 10**23})
    @example({"messages": HI, "temperature": None, "max_new_tokens": None, "seed": None})
    def ask(body):
        response = post(app, body)
        statuses.add(response.status_code)
        reply_or_error(response)

    ask()
    assert statuses == {200, 400}
    assert post(app, {**CONVERSATION, "stream": False}).json() == before
    assert "Traceback" not in capsys.readouterr().err


# ---- the web API, over HTTP ----


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    """`python chat.py --web` in a subprocess; its URL, read from what it prints."""
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO, "chat.py"),
            "--checkpoint",
            tiny_checkpoint,
            "--web",
            "--port",
            "0",
            "--max_new_tokens",
            str(SERVER_MAX_NEW_TOKENS),
            "--max_message_chars",
            str(SERVER_MAX_MESSAGE_CHARS),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    output = []
    threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 60
    url = None
    while url is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        url = next((m.group(0) for line in output if (m := re.search(r"http://127\.0\.0\.1:\d+/", line))), None)
    if url is None:
        proc.kill()
        pytest.fail(f"chat.py --web printed no URL within 60 s: {''.join(output)[-2000:]}")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def http():
    httpx = pytest.importorskip("httpx")
    with httpx.Client(trust_env=False, timeout=30) as client:  # trust_env=False: never through a proxy
        yield client


def streamed(http, url, body):
    """The events of a streamed reply."""
    with http.stream("POST", url + "api/chat", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line]


def whole(http, url, body, field="reply"):
    """A field of the reply (None: all of it, {"reply", "dropped", "finish_reason"}), not streamed."""
    response = http.post(url + "api/chat", json={**body, "stream": False})
    assert response.status_code == 200, response.text
    return response.json() if field is None else response.json()[field]


CONVERSATION = {"messages": [user("Hello there"), assistant("Hi! How can I help?"), user("Tell me a joke")], "seed": 11}
OTHER = {"messages": [user("What is the capital of France?")], "seed": 12, "temperature": 0.9}


def test_the_page_is_one_self_contained_file(server, http):
    page = http.get(server).text
    assert "<script>" in page and "<style>" in page
    assert not re.search(r"<script[^>]* src=|<link|@import|https?://", page)  # nothing fetched from elsewhere
    assert "random/model_00000.pt" in page and f'value="{SERVER_MAX_NEW_TOKENS}"' in page and "{{" not in page


def test_the_page_is_filled_in_html_escaped():
    page = chat.fill_page(chat.read_page(chat.PAGE_FILE), model="<b>a & b</b>", temperature=0.6, max_new_tokens=24)
    assert "<h1>chat.py &middot; &lt;b&gt;a &amp; b&lt;/b&gt;</h1>" in page
    assert 'value="0.6"' in page and 'value="24"' in page and "{{" not in page


def test_missing_page_is_a_one_line_error(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(chat, "PAGE_FILE", tmp_path / "chat.html")
    with pytest.raises(SystemExit) as exit:
        chat.main(["--checkpoint", tiny_checkpoint, "--web", "--port", "0"])
    message = str(exit.value.code)
    assert message.startswith(f"error: cannot read the chat page {tmp_path / 'chat.html'}: ") and "\n" not in message


def test_streamed_reply_equals_the_whole_reply(server, http):
    events = streamed(http, server, CONVERSATION)
    texts, done = [e["text"] for e in events[:-1]], events[-1]
    assert len(texts) > 1 and all(texts)  # token by token
    assert done == {"done": True, "reply": "".join(texts), "dropped": 0, "finish_reason": done["finish_reason"]}
    assert done["finish_reason"] in ("stop", "length")
    assert whole(http, server, CONVERSATION, field=None) == {
        key: done[key] for key in ("reply", "dropped", "finish_reason")
    }


def test_concurrent_conversations_do_not_mix(server, http):
    alone = [whole(http, server, CONVERSATION), whole(http, server, OTHER)]
    assert alone[0] != alone[1]
    results = {}

    def converse(i, body):
        events = streamed(http, server, body)
        results[i] = ("".join(e.get("text", "") for e in events), events[-1])

    threads = [threading.Thread(target=converse, args=(i, body)) for i, body in enumerate([CONVERSATION, OTHER] * 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 6
    for i, (text, done) in results.items():
        assert text == done["reply"] == alone[i % 2]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"messages": [user("x" * (SERVER_MAX_MESSAGE_CHARS + 1))]}, "at most 200 (--max_message_chars)"),
        ({"messages": [user("Hi")], "max_new_tokens": SERVER_MAX_NEW_TOKENS + 1}, "at most 24 tokens per reply"),
        ({"messages": [user("Hi"), assistant("Hello")]}, "must alternate"),
        ({"messages": [user("Hi")], "temperature": "hot"}, "must be a number"),
        ({"messages": [user("🙂" * 60)]}, "too long"),  # 60 characters, 120 tokens
    ],
)
def test_limits_and_bad_requests_get_a_clear_error(server, http, body, message):
    for stream in (True, False):
        response = http.post(server + "api/chat", json={**body, "stream": stream})
        assert response.status_code == 400
        assert message in response.json()["error"]


def test_a_body_over_max_request_bytes_gets_413_over_http(server, http):
    """The server's default --max_request_bytes, 256 KiB: it answers without reading what is past it."""
    body = json.dumps({"messages": [user("Hi"), assistant("x" * 2**18), user("Hi")]}).encode()
    response = http.post(server + "api/chat", content=body, headers={"content-type": "application/json"})
    assert (response.status_code, response.json()) == (
        413,
        {"error": "a request of more than 262,144 bytes: this server reads at most 262,144 (--max_request_bytes)"},
    )
    assert whole(http, server, CONVERSATION)  # and it goes on serving


def test_busy_port_is_a_one_line_error(tiny_checkpoint):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit:
            chat.main(["--checkpoint", tiny_checkpoint, "--web", "--port", str(port)])
    message = str(exit.value.code)
    assert message.startswith(f"error: cannot serve on 127.0.0.1:{port}: ") and "\n" not in message


# ---- the page, in a real browser ----


def chromium_driver():
    """Headless Chromium through Selenium, with Debian's chromium and chromium-driver (nothing
    downloaded); skips when they are not installed."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("Chromium not found: apt-get install chromium chromium-driver (as .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=800,640",
        # 127.0.0.1 only: no background requests, and no host name resolves
        "--disable-background-networking",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def wait_for(condition, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_browser_chat_streams_replies_and_shows_errors(server, http, tmp_path):
    browser = chromium_driver()
    try:
        browser.get(server)
        box = browser.find_element("id", "input")
        send = browser.find_element("id", "send")

        def texts(selector):
            return browser.execute_script(f"return [...document.querySelectorAll('{selector}')].map(e=>e.textContent)")

        messages, cut = [], 0
        for turn, text in enumerate(["Hello! Who are you?", "Tell me about the weather."]):
            box.send_keys(text + "\n")  # Enter sends
            assert wait_for(lambda n=turn + 1: len(texts(".assistant")) == n and send.is_enabled())
            reply = texts(".assistant")[-1]
            # the page's conversation, asked once more at the page's settings: the same reply
            messages += [user(text)]
            body = {
                "messages": messages,
                "temperature": chat.parse_args(["--model", "x"]).temperature,
                "max_new_tokens": SERVER_MAX_NEW_TOKENS,
            }
            asked = whole(http, server, body, field=None)
            assert reply and reply == asked["reply"]
            cut += asked["finish_reason"] == "length"  # a reply cut at max tokens is marked under it
            assert texts(".note") == ["The reply was cut at max tokens."] * cut
            messages += [assistant(reply)]
        assert texts(".user") == ["Hello! Who are you?", "Tell me about the weather."]
        browser.save_screenshot(str(tmp_path / "chat.png"))
        if os.environ.get("CHAT_SCREENSHOT"):  # the README's picture: CHAT_SCREENSHOT=docs/chat.png pytest ...
            browser.save_screenshot(os.environ["CHAT_SCREENSHOT"])

        too_long = "y" * (SERVER_MAX_MESSAGE_CHARS + 1)
        browser.execute_script("arguments[0].value = arguments[1]", box, too_long)
        send.click()
        assert wait_for(lambda: texts(".error"))
        assert "at most 200 (--max_message_chars)" in texts(".error")[0]
        assert box.get_attribute("value") == too_long  # given back, to shorten
        assert len(texts(".user")) == 2  # and not part of the conversation
        browser.save_screenshot(str(tmp_path / "chat_error.png"))
    finally:
        browser.quit()
