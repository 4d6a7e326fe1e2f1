"""chat.py: replies (stop tokens, the kept KV cache, Ctrl-C), the context overflow, the terminal, the
web API over HTTP on 127.0.0.1, and the page in a real headless Chromium."""

import io
import json
import os
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
from errors import UserError
from generate import generate_stream
from model import GPT, GPTConfig
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


def test_reply_ends_after_max_new_tokens(tokenizer):
    ids = tokenizer.encode(" one two three four five")
    replier = chat.Chat(ScriptedModel(ids), tokenizer, reuse_cache=False)
    assert "".join(replier.reply([user("Count")], 3)) == tokenizer.decode(ids[:3])


def test_kept_cache_gives_the_replies_of_a_fresh_one(tokenizer):
    """Three turns, reusing the KV cache between them and not: the same replies, and from the second
    turn on at least the whole previous prompt comes from the cache."""
    model = tiny_chat_model()
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
    out = capsys.readouterr().out
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
    assert ids and out == tokenizer.decode(ids) + "\n"


def test_terminal_conversation_goes_on_past_the_context(tiny_checkpoint, monkeypatch, capsys):
    lines = [f"This is message number {i} of a long conversation" for i in range(8)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines[:6] + ["/reset"] + lines[6:] + ["/quit"]) + "\n"))
    chat.main(["--checkpoint", tiny_checkpoint, "--max_new_tokens", "24"])
    out = capsys.readouterr().out
    assert out.count("you> ") == 10  # 8 messages, /reset, /quit
    assert "dropped its oldest 2 turns" in out
    assert "(a new conversation)" in out


def test_ctrl_c_stops_the_reply_and_the_conversation_goes_on(tokenizer, monkeypatch, capsys):
    ids = tokenizer.encode(" Once upon a time there was a model") + [tokenizer.special("<|end|>")]
    replier = chat.Chat(ScriptedModel(ids, interrupt_after=3), tokenizer, reuse_cache=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Tell me a story\nAgain, please\n/quit\n"))
    chat.chat_loop(replier, [], 50, {})
    out = capsys.readouterr().out
    assert f"you> {tokenizer.decode(ids[:3])} [stopped]\n" in out
    assert "you>  Once upon a time there was a model\n" in out


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


def whole(http, url, body):
    response = http.post(url + "api/chat", json={**body, "stream": False})
    assert response.status_code == 200, response.text
    return response.json()["reply"]


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
    assert done == {"done": True, "reply": "".join(texts), "dropped": 0}
    assert whole(http, server, CONVERSATION) == done["reply"]


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

        messages = []
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
            assert reply and reply == whole(http, server, body)
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
