"""serve.py: the batching engine against one-at-a-time generation, the OpenAI API in-process (every
field checked, fuzzed request bodies) and over HTTP on 127.0.0.1 with the real `openai` client, the
page in a real headless Chromium, and a load test with clients that go away."""

import asyncio
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

import pytest
import torch
from conftest import REPO, usage_error
from test_chat import assistant, tiny_chat_model, user

import checkpoint as ck
import openai_api
import serve
from chat_template import render_prompt
from device import setup_precision
from engine import Engine, QueueFull, Sampling
from generate import generate_stream
from prefix import apply_prefix
from sample import TextStream
from tokenizer import get_tokenizer

API_KEY = "test-key"
SERVER_MAX_NEW_TOKENS = 24
SERVER_MAX_MESSAGE_CHARS = 200
HI = [user("Hi")]
CONVERSATION = {"messages": [user("Hello there"), assistant("Hi! How can I help?"), user("Tell me a joke")], "seed": 11}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_chat_model()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer, model):
    path = str(tmp_path_factory.mktemp("served", numbered=False) / "model_00000.pt")
    ck.save_checkpoint(path, ck.model_checkpoint(model, tokenizer))
    return path


def alone(model, prompt, sampling, stops):
    """The oracle: the tokens generate_stream samples for prompt alone, with sampling's settings and a
    generator of its seed, up to and with the first of stops (or max_tokens of them)."""
    generator = torch.Generator().manual_seed(sampling.seed)
    ids = []
    settings = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    for next_id in generate_stream(model, [prompt], sampling.max_tokens, generator=generator, **settings):
        ids.append(next_id.item())
        if ids[-1] in stops:
            break
    return ids


def reply_text(ids, tokenizer, stop=()):
    """(text, tokens used, ended by a stop string or a special token) of sampled ids, as a client sees them."""
    stream = TextStream(tokenizer, stop)
    text = []
    for n, token in enumerate(ids, 1):
        if token in tokenizer.special_tokens.values():  # what was held back (half a character) comes out
            return "".join(text) + stream.finish(), n, True
        text.append(stream.push(token))
        if stream.stopped:
            return "".join(text), n, True
    return "".join(text) + stream.finish(), len(ids), False


# ---- the engine ----


def run_requests(engine, requests, pause):
    """Submit (prompt, sampling) requests one after the other, `pause(i)` seconds apart, and return each
    one's events once all have ended."""
    events = [[] for _ in requests]
    ended = [threading.Event() for _ in requests]
    for i, (prompt, sampling) in enumerate(requests):

        def emit(event, i=i):
            events[i].append(event)
            if event[0] != "token":
                ended[i].set()

        engine.submit(prompt, sampling, emit)
        time.sleep(pause(i))
    assert all(end.wait(30) for end in ended)
    return events


@pytest.mark.parametrize("prefix_len", [0, 4])
def test_batched_rows_equal_each_request_generated_alone(model, tokenizer, prefix_len):
    """30 requests arriving while others are generated, prompts of 1 to 60 tokens, replies of 1 to 40,
    their own temperature, top-k, top-p and seed: each reply is the one generate_stream gives it alone,
    token for token, and the engine did batch them. A prefix-tuned model's prefix stays the first
    positions of every row's cache as rows join and leave."""
    if prefix_len:
        torch.manual_seed(0)
        model = apply_prefix(tiny_chat_model(), prefix_len)
    rng = random.Random(0)
    requests = []
    for i in range(30):
        prompt = [rng.randrange(50257) for _ in range(rng.randint(1, 60))]
        sampling = Sampling(
            max_tokens=rng.randint(1, 40),
            temperature=rng.choice([0.0, 0.7, 1.0]),
            top_k=rng.choice([None, 50]),
            top_p=rng.choice([None, 0.9]),
            seed=i,
        )
        requests.append((prompt, sampling))
    stops = {tokenizer.eot, tokenizer.special("<|end|>")}
    engine = Engine(model, stops, setup_precision("float32", "cpu"), max_batch=6).start()
    try:
        events = run_requests(engine, requests, pause=lambda i: rng.random() * 0.01)
    finally:
        engine.close()
    for (prompt, sampling), got in zip(requests, events):
        ids = alone(model, prompt, sampling, stops)
        tokens = [value for kind, value in got if kind == "token"]
        ended_by_stop = ids[-1] in stops
        assert tokens == (ids[:-1] if ended_by_stop else ids)
        assert got[-1] == ("end", "stop" if ended_by_stop else "length")
    assert engine.rows_stepped / engine.steps > 2  # rows per step: requests did share steps


def test_a_cancelled_request_frees_its_row_at_the_next_step(model):
    engine = Engine(model, set(), setup_precision("float32", "cpu"), max_batch=1).start()
    try:
        got, second = [], []
        first = engine.submit([1, 2, 3], Sampling(max_tokens=100), got.append)
        while not got:
            time.sleep(0.001)
        first.cancel()
        ended = threading.Event()
        engine.submit([4, 5], Sampling(max_tokens=3), lambda e: second.append(e) or (e[0] == "end" and ended.set()))
        assert ended.wait(10)  # the one row was given to the second request
        assert len(got) < 100 and [kind for kind, _ in second] == ["token"] * 3 + ["end"]
    finally:
        engine.close()


def test_a_full_queue_refuses_at_once(model):
    # not started: nothing leaves the queue
    engine = Engine(model, set(), setup_precision("float32", "cpu"), max_queue=2)
    for _ in range(2):
        engine.submit([1], Sampling(max_tokens=1), lambda event: None)
    with pytest.raises(QueueFull):
        engine.submit([1], Sampling(max_tokens=1), lambda event: None)


def test_a_client_that_goes_away_frees_its_rows(tokenizer):
    """A reply that is not streamed (2 choices of 1,000 tokens), its client gone: the wait ends at the
    next check (every quarter second), both rows are cancelled and leave at the next step: a third
    request, which had no row while they ran, is answered long before they could have ended."""
    from model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=50261, n_layer=2, n_head=2, n_embd=32, block_size=1024)).eval()
    engine = Engine(model, set(), setup_precision("float32", "cpu"), max_batch=2).start()
    sampling = [Sampling(max_tokens=1000, seed=i) for i in range(2)]
    job = openai_api.Job("completion", [[1, 2, 3]] * 2, sampling, [], False, False, 6)

    class Gone:
        async def is_disconnected(self):
            return True

    async def abandon():
        requests, events = openai_api.submit(engine, job, asyncio.get_running_loop())
        meta = {"id": "cmpl-1", "created": 0, "model": "tiny"}
        answer = await openai_api.unless_gone(
            Gone(), openai_api.whole(job, meta, openai_api.written(job, requests, events, tokenizer))
        )
        await asyncio.sleep(0)  # the cancelled task's finally runs
        return answer, requests

    try:
        answer, requests = asyncio.run(abandon())
        assert answer is None and all(request.cancelled for request in requests)
        ended = threading.Event()
        engine.submit([4], Sampling(max_tokens=2), lambda event: event[0] == "end" and ended.set())
        assert ended.wait(10)
        assert engine.steps < 900  # the 1,000-token rows would have taken 999 steps before it
    finally:
        engine.close()


# ---- the API in-process: every field checked, and fuzzed ----

APP_MAX_NEW_TOKENS = 8  # short replies keep a fuzz of a hundred requests fast
APP_MAX_REQUEST_BYTES = 8192


def app_args(*flags):
    return serve.parse_args(
        ["--model", "tiny", "--max_new_tokens", str(APP_MAX_NEW_TOKENS), "--seed", "1", "--system", "Be brief."]
        + ["--max_message_chars", str(SERVER_MAX_MESSAGE_CHARS), "--max_request_bytes", str(APP_MAX_REQUEST_BYTES)]
        + list(flags)
    )


class InProcess:
    """serve.py's app over an engine of its own, served by Starlette's TestClient: no socket."""

    def __init__(self, model, tokenizer, args):
        from fastapi.testclient import TestClient

        stops, precision = tokenizer.special_tokens.values(), setup_precision("float32", "cpu")
        self.engine = Engine(model, stops, precision, args.max_batch, args.max_queue).start()
        page = openai_api.read_page(openai_api.PAGE_FILE)
        self.client = TestClient(openai_api.make_app(self.engine, tokenizer, args, page, "tiny"))

    def __enter__(self):
        client = self.client.__enter__()
        client.engine = self.engine
        return client

    def __exit__(self, *exc):
        self.client.__exit__(*exc)
        self.engine.close()


@pytest.fixture(scope="module")
def app(model, tokenizer):
    with InProcess(model, tokenizer, app_args()) as client:
        yield client


def post(client, body, path="/v1/chat/completions"):
    """The response to a request whose body is body's JSON (NaN and Infinity as Python writes them), or body's bytes."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=content, headers={"content-type": "application/json"})


def error_of(response, status):
    """The message of an error response, checked to be OpenAI's shape."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert error["message"] and "\n" not in error["message"]
    return error


@pytest.mark.parametrize(
    "fields, param, message",
    [
        ({"temperature": float("nan")}, "temperature", "temperature=NaN: must be a number"),
        ({"temperature": 10**400}, "temperature", "temperature=1000000000000000000000000000000000000000...: must be"),
        ({"temperature": True}, "temperature", "temperature=true: must be a number"),
        ({"temperature": 1e-40}, "temperature", "temperature=1e-40: must be 0 (the most likely token) or at least"),
        ({"top_p": 1.5}, "top_p", "top_p=1.5: must be from 0.001 to 1 (1 keeps every token)"),
        ({"top_k": 2.0}, "top_k", "top_k=2.0: must be an integer"),
        ({"seed": 10**23}, "seed", "seed=100000000000000000000000: must be from 0 to 2**64 - 1"),
        ({"max_tokens": False}, "max_tokens", "max_tokens=false: must be an integer"),
        ({"max_tokens": 9}, "max_tokens", "max_tokens=9: this server writes at most 8 tokens per reply"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens=0: must be at least 1"),
        ({"n": 0}, "n", "n=0: must be an integer from 1 to 16"),
        ({"stop": 3}, "stop", "stop=3: must be a string or a list of at most 4"),
        ({"stop": ["x" * 101]}, "stop", "a stop string of more than 100 characters: shorten it"),
        ({"stream_options": "yes"}, "stream_options", 'stream_options="yes": must be an object whose include_usage'),
        ({"stream": "no"}, "stream", 'stream="no": must be true or false'),
        ({"tools": [{"type": "function"}]}, "tools", "tools=a list: this server does not implement `tools`"),
        ({"logprobs": True}, "logprobs", "logprobs=true: this server does not implement `logprobs`"),
        ({"response_format": {"type": "json_object"}}, "response_format", "response_format=an object: this server"),
        ({"messages": [user("Hi"), assistant("Hello")]}, "messages", "the roles must alternate"),
        ({"messages": [user("x" * 201)]}, "messages", "a message of 201 characters: this server takes at"),
        ({"messages": [user("🙂" * 60)]}, "messages", "the message is too long"),  # 120 tokens
    ],
)
def test_every_field_is_checked_and_named_in_openais_error_shape(app, fields, param, message):
    error = error_of(post(app, {"messages": HI, **fields}), 400)
    assert error["message"].startswith(message) and (error["param"], error["type"]) == (param, "invalid_request_error")


def test_fields_it_does_not_know_are_ignored_as_openai_clients_expect(app):
    plain = post(app, {"messages": HI, "seed": 5}).json()
    extra = post(
        app, {"messages": HI, "seed": 5, "model": "gpt-4o", "user": "me", "temprature": 9, "tool_choice": "none"}
    )
    assert extra.status_code == 200 and extra.json()["choices"] == plain["choices"]


@pytest.mark.parametrize(
    "body, message",
    [
        (b"Hi", "the request body is not JSON: Expecting value: line 1 column 1 (char 0)"),
        (b'{"messages": ' + b"[" * 2000 + b"]" * 2000 + b"}", "the request body is JSON nested too deep"),
        (b"[]", "send a JSON object (OpenAI's request body)"),
        (
            json.dumps({"messages": [user("Hi"), assistant("Hello")] * 64 + HI}).encode(),
            "a conversation of 129 messages: this server takes at most 128 (each message takes 2 or more of the "
            "model's 128 tokens of context): leave out the oldest",
        ),
    ],
)
def test_bodies_that_are_no_request_get_a_clear_error(app, body, message):
    assert error_of(post(app, body), 400)["message"] == message


def test_null_fields_take_the_servers_settings(app):
    args = app_args()
    null = {name: None for name in ("max_tokens", "temperature", "top_p", "seed", "stream", "n", "stop")}
    flags = {"max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k, "seed": 1}
    replies = [post(app, {"messages": HI, **fields}).json()["choices"] for fields in ({}, null, flags)]
    assert replies[0] == replies[1] == replies[2] and replies[0][0]["message"]["content"]


def test_a_body_over_max_request_bytes_gets_413(app):
    body = json.dumps({"messages": HI}).encode()
    exactly = body + b" " * (APP_MAX_REQUEST_BYTES - len(body))  # JSON may end in white space
    assert post(app, exactly).status_code == 200
    error = error_of(post(app, exactly + b" "), 413)
    assert (
        error["message"] == "a request of more than 8,192 bytes: this server reads at most 8,192 (--max_request_bytes)"
    )
    # without a Content-Length (chunked), the body is read no further than the limit
    chunks = iter([exactly, b" " * 10_000, b"never read"])
    response = app.post("/v1/chat/completions", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_a_full_queue_gets_503_in_openais_shape(app, monkeypatch):
    """What the openai client sees when every place in the queue is taken (its retries off)."""
    openai = pytest.importorskip("openai")

    def full(*args):
        raise QueueFull

    monkeypatch.setattr(app.engine, "submit", full)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=app, max_retries=0)
    with pytest.raises(openai.InternalServerError) as busy:
        client.chat.completions.create(model="tiny", messages=HI)
    assert busy.value.status_code == 503 and busy.value.response.headers["retry-after"] == "1"
    assert busy.value.body == {
        "message": "the server is busy: every place in its queue is taken (--max_queue): try again shortly",
        "type": "server_error",
        "param": None,
        "code": "server_overloaded",
    }


def test_unknown_paths_answer_in_openais_shape(app):
    assert error_of(app.get("/v1/embeddings"), 404)["message"] == "Not Found"


def test_reading_and_fitting_run_off_the_event_loop(app, tokenizer, monkeypatch):
    """A 600-turn conversation once stalled every other client for 11 s: encoding and fitting must run
    in a thread, never in the event loop's."""
    on_the_loop = []

    def in_the_loop():
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text: on_the_loop.append(in_the_loop()) or encode(text))
    for stream in (True, False):
        on_the_loop.clear()
        assert post(app, {"messages": CONVERSATION["messages"], "stream": stream}).status_code == 200
        assert len(on_the_loop) > 3 and not any(on_the_loop)


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
        "max_tokens": st.none() | st.integers(1, APP_MAX_NEW_TOKENS),
        "temperature": st.none() | st.floats(0, 2),
        "top_k": st.none() | st.integers(1, 100),
        "top_p": st.none() | st.floats(0.001, 1),
        "seed": st.none() | st.integers(0, 2**64 - 1),
        "n": st.none() | st.integers(1, 3),
        "stop": st.none() | text | st.lists(text, max_size=4),
    }
    requests = st.fixed_dictionaries({"messages": conversations}, optional=sensible)
    one_field_off = st.builds(
        lambda request, name, value: {**request, name: value},
        requests,
        st.sampled_from([*sensible, "tools", "logprobs", "stream_options", "temprature"]),
        st.one_of(st.sampled_from(ODD_VALUES), st.floats(), st.integers(), anything),
    )
    messages = st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["system", "user", "assistant", "developer"]) | anything,
                "content": text | anything,
            }
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
    """A response's choices (its stream's, read to [DONE]), or its one-line error; AssertionError for anything else."""
    if response.status_code == 400:
        return error_of(response, 400)["message"]
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("text/event-stream"):
        blocks = [block[len("data: ") :] for block in response.text.split("\n\n") if block]
        assert blocks[-1] == "[DONE]"
        chunks = [json.loads(block) for block in blocks[:-1]]
        return [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    choices = response.json()["choices"]
    assert all(isinstance(c["message"]["content"], str) and c["finish_reason"] in ("stop", "length") for c in choices)
    return choices


# The values that broke the server once (NaN, 10**23, null) and their kin: the edges of JSON's numbers
ODD_VALUES = [None, True, False, 0, -1, 1, 0.5, 2.0, float("nan"), float("inf"), float("-inf"), 1e-40, 1e-300]
ODD_VALUES += [5e-324, 1e308, 2**63, 2**64 - 1, 2**64, 10**23, 10**400, "1", "", [], [1], {}, {"a": 1}]


@pytest.mark.parametrize("name", ["stream", "max_tokens", "temperature", "top_k", "top_p", "seed", "n", "stop"])
def test_each_field_at_the_edges_of_json_gets_200_or_400(app, capsys, name):
    """Each field set to each of ODD_VALUES, the rest of the request sensible: a reply or a one-line
    error, never a 500 nor a traceback in the server's log."""
    outcomes = {json.dumps(value): reply_or_error(post(app, {"messages": HI, name: value})) for value in ODD_VALUES}
    assert "Traceback" not in capsys.readouterr().err
    assert isinstance(outcomes["null"], list) and isinstance(outcomes["{}"], str)  # null: the server's setting


def test_fuzzed_requests_get_200_or_400_and_the_server_keeps_serving(app, capsys):
    """Any body at all: a reply (200, whose stream ends in [DONE]) or a one-line error (400), never a
    500 nor a traceback in the server's log; and afterwards the server replies as before."""
    from hypothesis import example, given, settings

    before = post(app, CONVERSATION).json()["choices"]
    statuses = set()

    @settings(max_examples=150, deadline=None, database=None)
    @given(request_bodies())
    @example({"messages": HI, "temperature": float("nan")})  # the faults found first
    @example({"messages": HI, "seed": 10**23, "stream": True})
    @example({"messages": HI, "temperature": None, "max_tokens": None, "seed": None})
    @example({"messages": ["Hi"]})  # with --system, the first message was read as a dict: a 500
    def ask(body):
        response = post(app, body)
        statuses.add(response.status_code)
        reply_or_error(response)

    ask()
    assert statuses == {200, 400}
    assert post(app, CONVERSATION).json()["choices"] == before
    assert "Traceback" not in capsys.readouterr().err


def test_a_base_model_continues_text_and_has_no_chat(tmp_path):
    """A model whose tokenizer has no chat tokens (a pretrained checkpoint, OpenAI's GPT-2): /v1/completions
    continues each prompt of a list as generate_stream does alone; /v1/chat/completions says why not."""
    openai = pytest.importorskip("openai")
    tokenizer = get_tokenizer("gpt2")
    torch.manual_seed(1)
    from model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=50257, n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    with InProcess(model, tokenizer, app_args()) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
        prompts = ["Hello, I'm a language model,", "The capital of France is"]
        answer = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, seed=3, n=2, temperature=1.0)
        assert [c.index for c in answer.choices] == [0, 1, 2, 3]
        for c in answer.choices:
            prompt = tokenizer.encode(prompts[c.index // 2])
            sampling = Sampling(max_tokens=8, temperature=1.0, top_k=50, seed=3 + c.index)
            text, used, stopped = reply_text(alone(model, prompt, sampling, {tokenizer.eot}), tokenizer)
            assert (c.text, c.finish_reason) == (text, "stop" if stopped else "length")
        assert answer.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
        assert answer.usage.completion_tokens == 4 * 8
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny", messages=HI)
        assert refused.value.body["code"] == "model_not_chat"


# ---- over HTTP, with the openai client ----


def start_server(checkpoint, *flags):
    """`python serve.py` in a subprocess: (process, URL, the lines it writes)."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "serve.py"), "--checkpoint", checkpoint, "--port", "0", *flags],
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
        pytest.fail(f"serve.py printed no URL within 60 s: {''.join(output)[-2000:]}")
    return proc, url, output


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    """serve.py on 127.0.0.1 with an API key: (URL, process, its output)."""
    proc, url, output = start_server(
        tiny_checkpoint,
        *["--max_new_tokens", str(SERVER_MAX_NEW_TOKENS), "--max_message_chars", str(SERVER_MAX_MESSAGE_CHARS)],
        *["--api_key", API_KEY, "--max_batch", "8"],
    )
    yield url, proc, output
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    import httpx

    http = httpx.Client(trust_env=False, timeout=60)  # trust_env=False: never through a proxy
    yield openai.OpenAI(base_url=server[0] + "v1", api_key=API_KEY, http_client=http, max_retries=0)
    http.close()


def expected(model, tokenizer, messages, seed, max_tokens=SERVER_MAX_NEW_TOKENS, stop=(), temperature=0.6):
    """(text, finish_reason, usage) of a chat reply, computed without the server."""
    prompt = render_prompt(messages, tokenizer)
    sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_k=50, seed=seed)
    ids = alone(model, prompt, sampling, set(tokenizer.special_tokens.values()))
    text, used, stopped = reply_text(ids, tokenizer, stop)
    return text, "stop" if stopped else "length", (len(prompt), used)


def test_replies_streamed_and_whole_equal_generation_alone(client, model, tokenizer):
    """The reply, its finish_reason and its usage, streamed and not: those of generate_stream alone with
    the request's seed, and the prompt's tokens are render_prompt's."""
    messages = CONVERSATION["messages"]
    text, finish_reason, (prompt_tokens, completion_tokens) = expected(model, tokenizer, messages, seed=11)
    answer = client.chat.completions.create(model="tiny", messages=messages, seed=11)
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (text, finish_reason)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert answer.object == "chat.completion" and answer.model == "served/model_00000.pt"

    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, seed=11, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [chunk.choices[0].delta.content for chunk in chunks[1:-2]]
    assert len(pieces) > 1 and all(pieces) and "".join(pieces) == text  # token by token
    assert chunks[-2].choices[0].finish_reason == finish_reason and chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt_tokens, completion_tokens)


def test_a_stop_string_ends_the_reply_before_it(client, model, tokenizer):
    messages = [user("Tell me a story")]
    whole_text, _, _ = expected(model, tokenizer, messages, seed=4)
    stop = whole_text[len(whole_text) // 2 : len(whole_text) // 2 + 3]  # three characters from its middle
    text, finish_reason, (_, completion_tokens) = expected(model, tokenizer, messages, seed=4, stop=[stop])
    assert finish_reason == "stop" and text == whole_text[: whole_text.index(stop)]
    for stream in (False, True):
        answer = client.chat.completions.create(
            model="tiny", messages=messages, seed=4, stop=["never there", stop], stream=stream
        )
        if stream:
            chunks = list(answer)
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
            assert chunks[-1].choices[0].finish_reason == "stop"
        else:
            assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (text, "stop")
            assert answer.usage.completion_tokens == completion_tokens


def test_a_reply_ended_by_the_model_is_stop_and_counts_its_end_token(tmp_path, tokenizer):
    """A model rigged to say <|end|> at once: an empty reply, finish_reason "stop", 1 completion token."""
    model = tiny_chat_model()
    with torch.no_grad():  # logits = ln_f(x) . wte: a bias on one channel that only <|end|>'s row reads
        model.transformer.ln_f.bias[0] = 50.0
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[tokenizer.special("<|end|>"), 0] = 50.0
    openai = pytest.importorskip("openai")
    with InProcess(model, tokenizer, app_args()) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
        answer = client.chat.completions.create(model="tiny", messages=HI)
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == ("", "stop")
    assert answer.usage.completion_tokens == 1


def test_seeded_replies_do_not_depend_on_what_else_is_generated(client):
    """The same seeded request, alone and among 7 others sent at once: the same reply each time."""
    asked = dict(model="tiny", messages=CONVERSATION["messages"], seed=21, temperature=1.0)
    first = client.chat.completions.create(**asked).choices[0].message.content
    results = {}

    def ask(i):
        other = dict(model="tiny", messages=[user(f"Question {i}?")], seed=i, temperature=1.0)
        results[i] = client.chat.completions.create(**(asked if i % 2 else other)).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 8 and all(results[i] == first for i in (1, 3, 5, 7))
    assert len({results[i] for i in (0, 2, 4, 6)} | {first}) == 5


def test_every_endpoint_wants_the_api_key(server, client):
    openai = pytest.importorskip("openai")
    assert [model.id for model in client.models.list()] == ["served/model_00000.pt"]
    import httpx

    with httpx.Client(trust_env=False, timeout=30) as http:
        wrong = openai.OpenAI(base_url=server[0] + "v1", api_key="wrong", http_client=http, max_retries=0)
        for call in (
            lambda: wrong.models.list(),
            lambda: wrong.chat.completions.create(model="tiny", messages=HI),
            lambda: wrong.completions.create(model="tiny", prompt="Hi"),
        ):
            with pytest.raises(openai.AuthenticationError) as refused:
                call()
            assert refused.value.body["code"] == "invalid_api_key"
        none = http.post(server[0] + "v1/chat/completions", json={"messages": HI})
        assert none.status_code == 401 and none.json()["error"]["type"] == "invalid_request_error"
        assert http.get(server[0]).status_code == 200  # the page itself holds nothing to protect


def test_bad_requests_get_400_with_openais_error(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=[user("Hi")], max_tokens=SERVER_MAX_NEW_TOKENS + 1)
    assert refused.value.body == {
        "message": f"max_tokens={SERVER_MAX_NEW_TOKENS + 1}: this server writes at most {SERVER_MAX_NEW_TOKENS} "
        "tokens per reply (--max_new_tokens)",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": None,
    }


def test_leaving_loopback_takes_an_api_key_or_open(monkeypatch):
    monkeypatch.delenv("SERVE_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exit:
        serve.main(["--checkpoint", "no/such/model.pt", "--host", "0.0.0.0", "--port", "0"])
    assert str(exit.value.code).startswith(
        "error: --host 0.0.0.0 serves every machine that can reach this one: set an API key (--api_key, or "
        "$SERVE_API_KEY) that clients send as `Authorization: Bearer KEY`, or pass --open if you mean an open server"
    )
    for allowed in (["--api_key", "k"], ["--open"]):  # past the check: the missing checkpoint is what stops it
        with pytest.raises(SystemExit) as exit:
            serve.main(["--checkpoint", "no/such/model.pt", "--host", "0.0.0.0", "--port", "0", *allowed])
        assert "no/such/model.pt" in str(exit.value.code)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "argument --port: must be between 0 and 65535, not 70000"),
        (["--port", "-1"], "argument --port: must be between 0 and 65535, not -1"),
        (["--max_request_bytes", "0"], "argument --max_request_bytes: must be at least 1, not 0"),
        (["--max_batch", "0"], "argument --max_batch: must be at least 1, not 0"),
    ],
)
def test_flags_out_of_range_are_refused_when_parsed(flags, message, capsys):
    """--port 70000 was an OverflowError's traceback once the model had loaded."""
    assert usage_error(serve.main, ["--checkpoint", "no/such/model.pt", *flags], capsys).endswith(f"error: {message}")


def test_missing_page_is_a_one_line_error(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "PAGE_FILE", tmp_path / "chat.html")
    with pytest.raises(SystemExit) as exit:
        serve.main(["--checkpoint", tiny_checkpoint, "--port", "0"])
    message = str(exit.value.code)
    assert message.startswith(f"error: cannot read the chat page {tmp_path / 'chat.html'}: ") and "\n" not in message


def test_busy_port_is_a_one_line_error(tiny_checkpoint):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit:
            serve.main(["--checkpoint", tiny_checkpoint, "--port", str(port)])
    message = str(exit.value.code)
    assert message.startswith(f"error: cannot serve on 127.0.0.1:{port}: ") and "\n" not in message


def test_the_page_is_one_self_contained_file_filled_in_html_escaped(server):
    import httpx

    page = httpx.get(server[0], trust_env=False).text
    assert "<script>" in page and "<style>" in page
    assert not re.search(r"<script[^>]* src=|<link|@import|https?://", page)  # nothing fetched from elsewhere
    assert "served/model_00000.pt" in page and f'value="{SERVER_MAX_NEW_TOKENS}"' in page and "{{" not in page
    filled = openai_api.fill_page(page.replace("served/model_00000.pt", "{{model}}"), model="<b>a & b</b>")
    assert "<h1>serve.py &middot; &lt;b&gt;a &amp; b&lt;/b&gt;</h1>" in filled


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


def test_browser_chat_streams_replies_through_the_openai_endpoint(server, client, tmp_path):
    browser = chromium_driver()
    try:
        browser.get(server[0])
        box = browser.find_element("id", "input")
        send = browser.find_element("id", "send")

        def texts(selector):
            return browser.execute_script(f"return [...document.querySelectorAll('{selector}')].map(e=>e.textContent)")

        browser.execute_script("document.getElementById('temperature').value = '0'")  # greedy: one reply
        messages, cut = [], 0
        for turn, text in enumerate(["Hello! Who are you?", "Tell me about the weather."]):
            box.send_keys(text + "\n")  # Enter sends
            if turn == 0:  # the server wants its key: the page asks for it once
                assert wait_for(lambda: alert_open(browser))
                browser.switch_to.alert.send_keys(API_KEY)
                browser.switch_to.alert.accept()
            assert wait_for(lambda n=turn + 1: len(texts(".assistant")) == n and send.is_enabled())
            reply = texts(".assistant")[-1]
            # the page's conversation, asked once more at the page's settings: the same reply
            messages += [user(text)]
            answer = client.chat.completions.create(model="tiny", messages=messages, temperature=0)
            assert reply and reply == answer.choices[0].message.content
            cut += answer.choices[0].finish_reason == "length"  # a reply cut at max tokens is marked under it
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
    finally:
        browser.quit()


def alert_open(browser):
    try:
        browser.switch_to.alert.text  # noqa: B018 (raises when there is none)
        return True
    except Exception:
        return False


# ---- under load ----


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmRSS:")))


def test_under_load_every_request_is_answered_in_full_and_memory_comes_back(server, tokenizer):
    """8 clients send 200 requests, 1 in 5 abandoned mid-reply: every other one gets its whole reply (a
    finish_reason and [DONE]), the log holds no error, and the memory after is that after warm-up."""
    httpx = pytest.importorskip("httpx")
    url, proc, output = server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    rng = random.Random(0)
    plan = [(i, rng.random() < 0.2, rng.choice([True, False])) for i in range(200)]  # (i, abandon, stream)
    answered, abandoned, failures = [], [], []
    lock = threading.Lock()

    def ask(http, i, abandon, stream):
        body = {"messages": [user(f"Question number {i}, please answer it.")], "seed": i, "stream": stream}
        if abandon:  # read the first chunk of a streamed reply, then hang up
            with http.stream("POST", url + "v1/chat/completions", json={**body, "stream": True}) as response:
                next(response.iter_lines())
            return abandoned.append(i)
        response = http.post(url + "v1/chat/completions", json=body)
        if response.status_code != 200:
            return failures.append((i, response.status_code, response.text))
        if stream:
            blocks = [b[len("data: ") :] for b in response.text.split("\n\n") if b]
            finished = blocks[-1] == "[DONE]" and json.loads(blocks[-2])["choices"][0]["finish_reason"]
        else:
            finished = response.json()["choices"][0]["finish_reason"]
        (answered if finished in ("stop", "length") else failures).append(i)

    def client_thread(jobs):
        with httpx.Client(trust_env=False, timeout=60, headers=headers) as http:
            while True:
                with lock:
                    if not jobs:
                        return
                    job = jobs.pop()
                ask(http, *job)

    def run(jobs):
        threads = [threading.Thread(target=client_thread, args=(jobs,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)

    run([(i, False, True) for i in range(1000, 1040)])  # warm-up: the allocator's pools, every batch size
    time.sleep(0.5)
    warm = rss_kb(proc.pid)
    answered.clear()
    log_before = len(output)
    run(list(reversed(plan)))
    time.sleep(0.5)
    assert failures == []
    assert sorted(answered + abandoned) == list(range(200)) and len(abandoned) > 20
    assert not [line for line in output[log_before:] if "Traceback" in line or "ERROR" in line]
    assert rss_kb(proc.pid) < warm + 30_000  # KB: each batch's cache freed, nothing kept per request


def test_more_replies_than_the_queue_ever_holds_is_a_400_not_a_503(model, tokenizer):
    """A 503 says "try again": the openai client would retry forever a request that can never fit."""
    with InProcess(model, tokenizer, app_args("--max_queue", "4")) as small:
        response = small.post("/v1/chat/completions", json={"messages": HI, "n": 5, "max_tokens": 1})
        error = error_of(response, 400)
        assert error["param"] == "n" and error["message"] == (
            "5 replies (prompts x n) in one request, more than this server ever queues (4, --max_queue): ask for fewer"
        )
        assert small.post("/v1/chat/completions", json={"messages": HI, "n": 4, "max_tokens": 1}).status_code == 200
