"""
Talk to a chat model fine-tuned with finetune.py: in the terminal, or in a browser.

    python chat.py --checkpoint log/sft/model_00500.pt                       # a conversation in the terminal
    python chat.py --checkpoint log/sft/model_00500.pt --system "Be brief." --temperature 0.8 --top_p 0.95
    python chat.py --checkpoint log/sft/model_00500.pt --prompt "Capital of France?"   # one reply, then exit
    python chat.py --checkpoint log/sft/model_00500.pt --web [--host 127.0.0.1 --port 8000]
    python chat.py --checkpoint log/sft/model_00500.pt --bench 5             # time to first token, turn by turn

In the terminal, each reply streams as it is generated; /reset starts a new conversation, /quit (or
Ctrl-D) leaves, Ctrl-C stops the reply being written and the conversation goes on. A reply ends at
<|end|> (or any other special token, which is never printed), or after --max_new_tokens, marked
" [cut at --max_new_tokens N]" (on stderr with --prompt, so that stdout is the reply alone). When the
conversation no longer fits in the model's context with room for a reply, its oldest turns are dropped
(the system message stays) and chat.py says so.

The prompt is chat_template.py's render_prompt, the template the model was fine-tuned with, and the KV
cache is kept from one turn to the next. --web serves chat.html and POST /api/chat on 127.0.0.1. How
each works, and the API: docs/chat.md.
"""

import argparse
import asyncio
import contextlib
import html
import json
import math
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from chat_template import check_conversation, render_prompt
from checkpoint import add_model_args
from config import bounded
from device import add_device_args, pick_device, setup_precision
from errors import UserError, exit_on_error
from generate import generate_stream, new_cache
from sample import load_sampling_model, text_chunks


class Chat:
    """A chat model's replies, each streamed as text. It keeps the KV cache of the tokens it last read
    (a prompt and its reply) for the next prompt, which usually starts with them."""

    def __init__(self, model, tokenizer, reuse_cache=True):
        self.model, self.tokenizer = model, tokenizer
        self.block_size = model.config.block_size
        self.stops = set(tokenizer.special_tokens.values())  # <|end|>, <|endoftext|>, <|user|>, ...: a reply ends
        self.reuse_cache = reuse_cache
        self.forget()

    def forget(self):
        self.cache, self.cached_ids = None, []  # one KVCache per layer; the ids of the positions it holds
        self.reused = 0  # positions of the last prompt that came from the cache
        self.finish_reason = None  # how the last reply ended: "stop" (a special token), "length" (max_new_tokens)

    def fit(self, messages, max_new_tokens):
        """(messages, dropped): the conversation (ending with the user's turn) without its `dropped` oldest
        turns, as few as it takes for its prompt and a reply of max_new_tokens to fit in the model's
        context. The system message stays; turns go in pairs (a user's message and its reply), so the
        user still speaks first."""
        system = messages[:1] if messages[0]["role"] == "system" else []
        turns = messages[len(system) :]
        room = self.block_size - max_new_tokens - len(render_prompt(system, self.tokenizer))
        # Each message is encoded on its own, between its opener and <|end|>, so a prompt's length is the
        # sum of its messages'. Count from the newest back, each message encoded once, and stop at the
        # first that does not fit: a long conversation costs what the context holds, not what was sent.
        empty = len(render_prompt([], self.tokenizer))  # <|endoftext|> ... <|assistant|>
        dropped, used = len(turns), 0  # turns[dropped:] fit, in `used` tokens
        for i in range(len(turns) - 1, -1, -1):
            used += len(render_prompt([turns[i]], self.tokenizer)) - empty
            if used > room:
                break
            if turns[i]["role"] == "user":  # what is kept starts with a user's message
                dropped = i
        if dropped == len(turns):  # not even the newest message fits
            need = len(render_prompt(system + turns[-1:], self.tokenizer)) + max_new_tokens
            raise UserError(
                f"the message is too long: it and {'the system message and ' if system else ''}room for a reply "
                f"of {max_new_tokens} tokens need {need} tokens, the model's context holds {self.block_size}: "
                "shorten it (or ask for a shorter reply)"
            )
        return system + turns[dropped:], dropped

    def reply(self, messages, max_new_tokens, **sampling):
        """The assistant's reply to messages (a conversation that ends with the user's turn and fits,
        see fit), as text chunks, each yielded as soon as its token is sampled (a chunk can be "": a
        character split over two tokens waits for the second). sampling: generate_stream's arguments.
        Once it has ended, finish_reason says how (None if it was stopped)."""
        prompt = render_prompt(messages, self.tokenizer)
        sampled = []  # every token, the one that ended the reply too: the cache may hold all but the last
        self.finish_reason = None

        def tokens():
            for next_id in generate_stream(
                self.model, [prompt], max_new_tokens, kv_cache=self.cache_for(prompt), **sampling
            ):
                sampled.append(next_id.item())
                if sampled[-1] in self.stops:
                    self.finish_reason = "stop"
                    return
                yield sampled[-1]
            self.finish_reason = "length"  # fit left room for max_new_tokens: the stream ends only there

        try:
            yield from text_chunks(tokens(), self.tokenizer, stop=())
        except GeneratorExit:  # closed between two tokens (the reader stopped): the cache is whole
            raise
        except BaseException:  # Ctrl-C can land inside a step, some layers' keys written and not others
            self.forget()
            raise
        finally:
            if self.cache is not None:
                self.cached_ids = (prompt + sampled)[: self.cache[0].length]

    def cache_for(self, prompt):
        """The KV cache to generate from prompt with (None: generate_stream makes a fresh one), holding
        the longest start the prompt shares with the tokens cached. A turn's prompt repeats the
        conversation so far, so that is most of it; not all of it when the reply, re-encoded from its
        text, comes out as other tokens than were sampled (same text, another split into tokens)."""
        if not self.reuse_cache:
            return None
        if self.cache is None:
            self.cache = new_cache(self.model, self.block_size)
        shared = 0
        # the prompt's last token always goes through the model: its logits give the first token
        for cached, token in zip(self.cached_ids, prompt[:-1]):
            if cached != token:
                break
            shared += 1
        for layer in self.cache:
            layer.length = shared  # positions past `length` are overwritten by the next append
        self.reused = shared
        return self.cache


# ---- a reply's settings, from the flags or from a request: checked in one place ----

# Above 0, a temperature or a top_p under 0.001 gives the greedy reply but for near-ties, and far under it
# sampling fails on nan: float32 turns the logits divided by a temperature of 1e-37 into inf, and rounds a
# top_p of 1e-46 to 0, which keeps no token. temperature=0 asks for the greedy reply outright.
SMALLEST = 0.001
# Each setting: the kind of value it takes, whether a value of that kind is in range, the range in words.
SETTINGS = {
    "max_new_tokens": ("an integer", lambda n: n >= 1, "at least 1"),
    "temperature": ("a number", lambda t: t == 0 or t >= SMALLEST, f"0 (the most likely token) or at least {SMALLEST}"),
    "top_k": ("an integer", lambda k: k >= 1, "at least 1"),
    "top_p": ("a number", lambda p: SMALLEST <= p <= 1, f"from {SMALLEST} to 1 (1 keeps every token)"),
    "seed": ("an integer", lambda s: 0 <= s < 2**64, "from 0 to 2**64 - 1"),  # torch.Generator's seeds
}


def is_integer(value):
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to JSON


def is_number(value):
    """A finite int or float: JSON's NaN and Infinity parse as floats, and 1e999 as inf."""
    if not (is_integer(value) or isinstance(value, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float, 10**400
        return False


def shown(value):
    """value as JSON, short, for a message: a list or an object only by its kind (it may be huge)."""
    if isinstance(value, list | dict):
        return "a list" if isinstance(value, list) else "an object"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:40] + "..."


def check_settings(settings, most_new_tokens=None):
    """The settings of a reply ({name: value} for each of SETTINGS; top_k and top_p may be None, no
    limit), with temperature and top_p as floats; UserError for the first that cannot generate, of the
    wrong kind (a bool is not a number), not finite, or out of range. most_new_tokens: the server's cap."""
    for name, (kind, in_range, limits) in SETTINGS.items():
        value = settings[name]
        if value is None and name in ("top_k", "top_p"):
            continue
        if not (is_integer(value) if kind == "an integer" else is_number(value)):
            raise UserError(f"{name}={shown(value)}: must be {kind}")
        if not in_range(value):
            raise UserError(f"{name}={shown(value)}: must be {limits}")
    if most_new_tokens is not None and settings["max_new_tokens"] > most_new_tokens:
        raise UserError(
            f"max_new_tokens={settings['max_new_tokens']}: this server writes at most "
            f"{most_new_tokens} tokens per reply (--max_new_tokens)"
        )
    as_float = {name: float(settings[name]) for name in ("temperature", "top_p") if settings[name] is not None}
    return {**settings, **as_float}  # a temperature of 10**300 as an int would overflow torch's int64


def sampling_settings(args, device):
    """generate_stream's sampling arguments from the flags; the generator is seeded once, so a whole
    conversation (the same messages, the same flags) replays the same."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)


# ---- the terminal ----


def say(chat, messages, max_new_tokens, sampling, marks=None):
    """Print the reply to messages as it streams, and return its text. Ctrl-C stops it (what was
    printed stays the reply, marked [stopped] on screen); a reply cut at max_new_tokens is marked
    too. marks: the file the marks go to (None: stdout, with the reply)."""
    chunks = chat.reply(messages, max_new_tokens, **sampling)
    printed = []
    try:
        for chunk in chunks:
            print(chunk, end="", flush=True)
            printed.append(chunk)
        if chat.finish_reason == "length":
            print(f" [cut at --max_new_tokens {max_new_tokens}]", end="", file=marks or sys.stdout, flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="", file=marks or sys.stdout)
    finally:
        chunks.close()
    print()
    return "".join(printed)


def chat_loop(chat, system, max_new_tokens, sampling):
    """The conversation in the terminal, until /quit or the end of input."""
    messages = list(system)
    while True:
        try:
            text = input("you> ")
        except EOFError:  # Ctrl-D, or the end of piped input
            print()
            return
        except KeyboardInterrupt:  # the reply had ended already: one Ctrl-C too many should not end it all
            print("\n(/quit or Ctrl-D leaves)")
            continue
        if text.strip() == "/quit":
            return
        if text.strip() == "/reset":
            messages = list(system)
            print("(a new conversation)")
            continue
        if not text.strip():
            continue
        try:
            asked, dropped = chat.fit(messages + [{"role": "user", "content": text}], max_new_tokens)
        except UserError as e:
            print(f"({e})")
            continue
        if dropped:
            print(
                f"(the conversation outgrew the model's context of {chat.block_size} tokens: "
                f"dropped its oldest {dropped} turns)"
            )
        messages = asked + [{"role": "assistant", "content": say(chat, asked, max_new_tokens, sampling)}]


# ---- time to first token, with the cache reused and without ----

BENCH_MESSAGES = [
    "Hi! Can you tell me a little about how the GPT-2 language model was trained?",
    "What is the difference between a token and a word, and why do models read tokens?",
    "How does a KV cache make generating text faster, and what does it cost in memory?",
    "Could you sum up what we have talked about so far in three sentences?",
    "Thanks. What should I read next to learn more about transformers?",
]


def bench(chat, system, turns, max_new_tokens, args, device):
    """Time to first token at each turn of a scripted conversation (the user's side is BENCH_MESSAGES,
    the replies are the model's, each up to max_new_tokens), once reusing the KV cache between turns
    and once computing every prompt afresh. Prints one line per turn and mode."""
    first_token = {}
    for reuse in (False, True):
        chat.reuse_cache = reuse
        chat.forget()
        messages, sampling = list(system), sampling_settings(args, device)
        for turn in range(turns):
            user = {"role": "user", "content": BENCH_MESSAGES[turn % len(BENCH_MESSAGES)]}
            messages, _ = chat.fit(messages + [user], max_new_tokens)
            start = time.perf_counter()
            chunks = chat.reply(messages, max_new_tokens, **sampling)
            reply = [next(chunks)]  # the text of the first token (maybe ""): it has been sampled
            first_token[reuse, turn] = time.perf_counter() - start
            reply += list(chunks)
            prompt_len, ms = len(render_prompt(messages, chat.tokenizer)), 1000 * first_token[reuse, turn]
            print(
                f"cache reused: {'yes' if reuse else 'no '}  turn {turn + 1}: prompt of {prompt_len} tokens, "
                f"{chat.reused} from the cache, first token after {ms:.1f} ms"
            )
            messages = messages + [{"role": "assistant", "content": "".join(reply)}]
    last = turns - 1
    print(
        f"turn {turns}: time to first token {1000 * first_token[False, last]:.1f} ms computing the whole prompt, "
        f"{1000 * first_token[True, last]:.1f} ms reusing the cache "
        f"({first_token[False, last] / first_token[True, last]:.1f}x)"
    )


# ---- the web server: one page, one endpoint ----

PAGE_FILE = Path(__file__).with_name("chat.html")  # HTML, CSS and JavaScript in one file, no build step


def listen(host, port):
    """A socket bound to host:port, made before the model loads: a port in use is a one-line error at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out old connections
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reason = e.strerror or e
        raise UserError(f"cannot serve on {host}:{port}: {reason} (another server there? pass --port)") from None
    return sock


def serve(app, sock):
    import uvicorn

    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    print(f"chat.py: serving {url} (Ctrl-C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


REQUEST_FIELDS = ("messages", "stream", *SETTINGS)


async def read_body(request, limit):
    """The bytes of a request's body, or None if there are more than limit: it is read no further."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def read_request(data, args, block_size):
    """(messages, settings, stream) of a request to /api/chat (its body's bytes), every field checked
    here, against the server's limits; a field that is null or left out takes the server's flag.
    UserError says what is wrong, and the page shows it."""
    try:
        body = json.loads(data)
    except ValueError as e:
        raise UserError(f"the request body is not JSON: {e}") from None
    except RecursionError:
        raise UserError("the request body is JSON nested too deep") from None
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise UserError("send a JSON object whose `messages` is the conversation so far, ending with the user's turn")
    unknown = [name for name in body if name not in REQUEST_FIELDS]
    if unknown:
        raise UserError(f"no field {shown(unknown[0])}: a request has {', '.join(REQUEST_FIELDS)}")
    messages = body["messages"]
    if len(messages) > block_size:
        raise UserError(
            f"a conversation of {len(messages):,} messages: this server takes at most {block_size:,} (each "
            f"message takes 2 or more of the model's {block_size:,} tokens of context): leave out the oldest"
        )
    if args.system and not (isinstance(messages[0], dict) and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": args.system}] + messages
    # check_conversation wants a conversation the assistant speaks in: the reply about to be written
    problem = check_conversation(messages + [{"role": "assistant", "content": ""}])
    if problem:
        raise UserError(problem)
    for message in messages:
        if message["role"] != "assistant" and len(message["content"]) > args.max_message_chars:
            raise UserError(
                f"a message of {len(message['content']):,} characters: this server takes at most "
                f"{args.max_message_chars:,} (--max_message_chars)"
            )
    stream = True if body.get("stream") is None else body["stream"]
    if not isinstance(stream, bool):
        raise UserError(f"stream={shown(stream)}: must be true or false")
    settings = {name: getattr(args, name) if body.get(name) is None else body[name] for name in SETTINGS}
    return messages, check_settings(settings, most_new_tokens=args.max_new_tokens), stream


async def reply_events(chat, lock, messages, settings, dropped, precision, device):
    """The reply as the page's events: {"text"} as it is written, then {"done"} or {"error"}. The model
    runs in a thread, one reply at a time (the lock), so the server goes on answering while it works;
    if the page goes away the thread stops at the next token."""
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()
    gone = threading.Event()

    def put(event):
        loop.call_soon_threadsafe(events.put_nowait, event)

    def generate():
        try:
            with lock, precision.autocast():
                generator = torch.Generator(device=device).manual_seed(settings["seed"])
                chunks = chat.reply(
                    messages,
                    settings["max_new_tokens"],
                    temperature=settings["temperature"],
                    top_k=settings["top_k"],
                    top_p=settings["top_p"],
                    generator=generator,
                )
                reply = []
                for chunk in chunks:
                    if gone.is_set():
                        chunks.close()  # now, under the lock: closing records what the cache holds
                        return
                    if chunk:
                        reply.append(chunk)
                        put({"text": chunk})
                put({"done": True, "reply": "".join(reply), "dropped": dropped, "finish_reason": chat.finish_reason})
        except Exception as e:  # a bug: its traceback for the server's terminal, one line for the page
            traceback.print_exc()
            put({"error": f"the reply failed: {type(e).__name__}: {e}"})

    threading.Thread(target=generate, daemon=True).start()
    try:
        while True:
            event = await events.get()
            yield event
            if "text" not in event:
                return
    finally:
        gone.set()


async def server_sent(events):
    """Events as server-sent events: "data: {json}" and a blank line each."""
    async with contextlib.aclosing(events):  # a page that goes away stops the reply at once, not at garbage collection
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"


def read_page(path):
    """The text of the chat page, its {{placeholders}} still in it."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        reason = e.strerror or e
        raise UserError(f"cannot read the chat page {path}: {reason} (it belongs beside chat.py)") from None


def fill_page(page, **values):
    """The page with each {{name}} replaced by its value, HTML-escaped (a checkpoint's name may hold < or &)."""
    for name, value in values.items():
        page = page.replace("{{" + name + "}}", html.escape(str(value)))
    return page


def make_app(chat, args, precision, device, page, name):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    app = FastAPI(title="chat.py")
    lock = threading.Lock()  # one model, one reply at a time
    page = fill_page(page, model=name, temperature=args.temperature, max_new_tokens=args.max_new_tokens)

    @app.get("/")
    def index():
        return HTMLResponse(page)

    def read_and_fit(data):
        messages, settings, stream = read_request(data, args, chat.block_size)
        messages, dropped = chat.fit(messages, settings["max_new_tokens"])
        return messages, settings, stream, dropped

    @app.post("/api/chat")
    async def api_chat(request: Request):
        data = await read_body(request, args.max_request_bytes)
        if data is None:
            limit = args.max_request_bytes
            error = f"a request of more than {limit:,} bytes: this server reads at most {limit:,} (--max_request_bytes)"
            return JSONResponse({"error": error}, status_code=413)
        try:
            # parsing, checking and fitting a conversation take CPU time: in a thread, as the reply is
            # written, so that the event loop goes on serving the other clients meanwhile
            messages, settings, stream, dropped = await asyncio.to_thread(read_and_fit, data)
        except UserError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        events = reply_events(chat, lock, messages, settings, dropped, precision, device)
        if stream:
            return StreamingResponse(server_sent(events), media_type="text/event-stream")
        async for event in events:
            if "error" in event:
                return JSONResponse(event, status_code=500)
            if event.get("done"):
                return {name: event[name] for name in ("reply", "dropped", "finish_reason")}

    return app


# ---- the command line ----


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--system", default=None, help="a system message that opens every conversation")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prompt", default=None, help="reply to this one message, print the reply and exit")
    mode.add_argument("--web", action="store_true", help="serve the chat page and its API instead of the terminal")
    mode.add_argument(
        "--bench",
        type=bounded(int, 1, None),
        metavar="TURNS",
        default=None,
        help="time to first token over a scripted conversation of TURNS turns, cache reused and not",
    )
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        default=None,
        help="tokens per reply, at most (default: 256, or half the context of a model with less)",
    )
    # nanochat's chat defaults: a little below 1 and the 50 most likely tokens keep a small model on topic
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.6,
        help="0: always the most likely token (greedy); below 1 safer, above 1 wilder",
    )
    parser.add_argument("--top_k", type=int, default=50, help="sample only among the k most likely tokens")
    parser.add_argument(
        "--top_p",
        type=float,
        default=None,
        help="sample only among the most likely tokens that together hold this probability",
    )
    parser.add_argument("--seed", type=int, default=1337, help="the same seed, flags and messages: the same replies")
    add_device_args(parser)
    web = parser.add_argument_group("--web")
    web.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every network, take care)")
    web.add_argument("--port", type=bounded(int, 0, 65535), default=8000, help="port to serve on (0: any free one)")
    web.add_argument(
        "--max_message_chars",
        type=bounded(int, 1, None),
        default=4000,
        help="longest user or system message the server takes, in characters",
    )
    # GPT-2's context of 1,024 tokens holds some 4 KB of English: 256 KiB is room for 60 such conversations
    web.add_argument(
        "--max_request_bytes",
        type=bounded(int, 1, None),
        default=2**18,
        help="largest request body the server reads, in bytes (more: HTTP 413)",
    )
    return parser.parse_args(argv)


@exit_on_error
def main(argv=None):
    args = parse_args(argv)
    flags = {name: getattr(args, name) for name in SETTINGS}
    if args.max_new_tokens is None:
        flags["max_new_tokens"] = 1  # its default waits for the model's context
    check_settings(flags)
    page = read_page(PAGE_FILE) if args.web else None  # a missing page fails now too, not after loading
    sock = listen(args.host, args.port) if args.web else None  # a port in use fails now, not after loading
    device = pick_device(args.device, local_rank=0)
    precision = setup_precision(args.dtype, device.split(":")[0])
    model, tokenizer = load_sampling_model(args, device)
    if "<|assistant|>" not in tokenizer.special_tokens:
        raise UserError(
            f"the {tokenizer.name} tokenizer has no chat tokens: chat.py talks to a model fine-tuned by "
            "finetune.py (GPT-2's BPE with chat tokens is --tokenizer gpt2-chat)"
        )
    if args.max_new_tokens is None:
        args.max_new_tokens = min(256, model.config.block_size // 2)
    if args.max_new_tokens > model.config.block_size // 2:
        raise UserError(
            f"--max_new_tokens {args.max_new_tokens} leaves the conversation less than half of the "
            f"model's context of {model.config.block_size} tokens: ask for at most "
            f"{model.config.block_size // 2}"
        )
    chat = Chat(model, tokenizer)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.web:
        name = args.model or "/".join(Path(args.checkpoint).parts[-2:])  # log/sft/model_00500.pt -> sft/model_00500.pt
        app = make_app(chat, args, precision, device, page, name)
        return serve(app, sock)
    with precision.autocast():
        if args.bench:
            return bench(chat, system, args.bench, args.max_new_tokens, args, device)
        if args.prompt is not None:
            messages, _ = chat.fit(system + [{"role": "user", "content": args.prompt}], args.max_new_tokens)
            return say(chat, messages, args.max_new_tokens, sampling_settings(args, device), marks=sys.stderr)
        print(
            f"chat.py: {args.checkpoint or args.model} ({model.num_params() / 1e6:.1f}M parameters, a context of "
            f"{chat.block_size} tokens). /reset starts over, /quit leaves, Ctrl-C stops a reply."
        )
        chat_loop(chat, system, args.max_new_tokens, sampling_settings(args, device))


if __name__ == "__main__":
    main()
