"""
The OpenAI HTTP API that serve.py serves, over the batching engine (engine.py): what the openai Python
and JS clients, Open WebUI, LangChain and curl scripts copied from OpenAI's docs all speak.

    POST /v1/chat/completions   a conversation in, the assistant's reply out (a model fine-tuned to chat)
    POST /v1/completions        text in, its continuation out (any model: pretrained, or OpenAI's GPT-2)
    GET  /v1/models             the one model loaded
    GET  /                      the chat page, chat.html, which talks to /v1/chat/completions too

Requests and replies are OpenAI's; the fields taken, and what each does here, are in docs/chat.md.
`"stream": true` sends server-sent events, `chat.completion.chunk`s (`text_completion`s), ending with
`data: [DONE]`. Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a
bad request, 401 for a missing or wrong API key, 413 for a body over the limit, 503 when the engine's
queue is full (try again). A field this server does not know is ignored, as OpenAI's clients expect;
one that would change what the reply means and is not implemented here (tools, logprobs, ...) is a 400.
"""

import asyncio
import contextlib
import hmac
import html
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from chat_template import check_conversation, fit_conversation, render_prompt
from engine import QueueFull, Sampling
from errors import UserError
from reply_settings import FieldError, check_setting, is_integer, shown
from sample import TextStream

PAGE_FILE = Path(__file__).with_name("chat.html")  # HTML, CSS and JavaScript in one file, no build step
MOST_CHOICES = 16  # n (times the prompts of a list): each choice is a row of the engine's batch
MOST_STOPS = 4  # OpenAI's limit on stop strings
# Each token checks whether the reply ends with the start of a stop string (sample.held_back), a cost that
# grows with the square of the string's length: a 256 KB stop string would stall the event loop.
LONGEST_STOP = 100

# Fields that change what a reply means, not implemented here: refused unless they hold their neutral value
UNSUPPORTED = {
    "tools": lambda value: not value,
    "tool_choice": lambda value: value in (None, "none"),
    "functions": lambda value: not value,
    "function_call": lambda value: value in (None, "none"),
    "logprobs": lambda value: value in (None, False),
    "top_logprobs": lambda value: value is None,
    "logit_bias": lambda value: not value,
    "presence_penalty": lambda value: value in (None, 0),
    "frequency_penalty": lambda value: value in (None, 0),
    "response_format": lambda value: value in (None, {"type": "text"}),
    "echo": lambda value: value in (None, False),
    "suffix": lambda value: value in (None, ""),
    "best_of": lambda value: value in (None, 1),
}


@dataclass
class Job:
    """A request read and checked: what the engine generates (a prompt and its Sampling per choice) and
    how the answer is written."""

    kind: str  # "chat" or "completion"
    prompts: list  # token ids, one list per choice
    sampling: list  # engine.Sampling, one per choice
    stop: list  # stop strings: a choice ends before the first that appears
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    prompt_tokens: int
    dropped: int = 0  # chat: the oldest messages left out so that the conversation fits the context


# ---- reading a request ----


def read_json(data):
    try:
        body = json.loads(data)
    except ValueError as e:
        raise UserError(f"the request body is not JSON: {e}") from None
    except RecursionError:
        raise UserError("the request body is JSON nested too deep") from None
    if not isinstance(body, dict):
        raise UserError("send a JSON object (OpenAI's request body)")
    return body


def check_supported(body):
    for name, neutral in UNSUPPORTED.items():
        try:
            fine = neutral(body.get(name))
        except TypeError:  # an unhashable value compared with a tuple's
            fine = False
        if not fine:
            raise FieldError(f"{name}={shown(body[name])}: this server does not implement `{name}`: leave it out", name)


def read_sampling(body, args):
    """(Sampling of the first choice, n, stop strings, stream, include_usage) from a request's common
    fields; a field null or left out takes the server's flag (seed: a fresh one, unless --seed)."""
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(field)
    if max_tokens is None:
        max_tokens = args.max_new_tokens
    check_setting("max_new_tokens", max_tokens, field)
    if max_tokens > args.max_new_tokens:
        raise FieldError(
            f"{field}={max_tokens}: this server writes at most {args.max_new_tokens} tokens per reply "
            "(--max_new_tokens)",
            field,
        )
    values = {}
    for name in ("temperature", "top_k", "top_p", "seed"):
        value = getattr(args, name) if body.get(name) is None else body[name]
        if name == "seed" and value is None:
            value = secrets.randbits(64)  # as OpenAI: without a seed, a reply is drawn afresh
        values[name] = None if value is None else check_setting(name, value)
    n = 1 if body.get("n") is None else body["n"]
    if not (is_integer(n) and 1 <= n <= MOST_CHOICES):
        raise FieldError(f"n={shown(n)}: must be an integer from 1 to {MOST_CHOICES}", "n")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MOST_STOPS and all(isinstance(s, str) for s in stop)):
        raise FieldError(f"stop={shown(body['stop'])}: must be a string or a list of at most {MOST_STOPS}", "stop")
    if any(len(s) > LONGEST_STOP for s in stop):
        raise FieldError(f"a stop string of more than {LONGEST_STOP} characters: shorten it", "stop")
    stream = False if body.get("stream") is None else body["stream"]
    if not isinstance(stream, bool):
        raise FieldError(f"stream={shown(stream)}: must be true or false", "stream")
    options = {} if body.get("stream_options") is None else body["stream_options"]
    if not (isinstance(options, dict) and options.get("include_usage") in (None, True, False)):
        message = f"stream_options={shown(options)}: must be an object whose include_usage is true or false"
        raise FieldError(message, "stream_options")
    return Sampling(max_tokens=max_tokens, **values), n, stop, stream, bool(options.get("include_usage"))


def choices_of(prompts, sampling, n):
    """(prompts, samplings), one per choice: each prompt n times, choice i seeded with seed + i (OpenAI's
    order: the n choices of the first prompt, then the second's)."""
    seeds = [(sampling.seed + i) % 2**64 for i in range(len(prompts) * n)]
    repeated = [prompt for prompt in prompts for _ in range(n)]
    return repeated, [Sampling(**{**vars(sampling), "seed": seed}) for seed in seeds]


def plain_message(message):
    """A message as chat_template reads it, {role, content}: OpenAI's "developer" role is a system
    message, and content given as a list of text parts is their text. Anything else is left to
    check_conversation to refuse."""
    if not isinstance(message, dict):
        return message
    role, content = message.get("role"), message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        if all(isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
    return {"role": "system" if role == "developer" else role, "content": content}


def read_chat(body, args, tokenizer, block_size):
    """The Job of a request to /v1/chat/completions: UserError (FieldError naming its field) for what
    is wrong with it."""
    check_supported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FieldError("`messages` must be the conversation so far, a list ending with the user's turn", "messages")
    if len(messages) > block_size:
        raise FieldError(
            f"a conversation of {len(messages):,} messages: this server takes at most {block_size:,} (each "
            f"message takes 2 or more of the model's {block_size:,} tokens of context): leave out the oldest",
            "messages",
        )
    messages = [plain_message(message) for message in messages]
    if args.system and not (isinstance(messages[0], dict) and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": args.system}] + messages
    # check_conversation wants a conversation the assistant speaks in: the reply about to be written
    problem = check_conversation(messages + [{"role": "assistant", "content": ""}])
    if problem:
        raise FieldError(problem, "messages")
    for message in messages:
        if message["role"] != "assistant" and len(message["content"]) > args.max_message_chars:
            raise FieldError(
                f"a message of {len(message['content']):,} characters: this server takes at most "
                f"{args.max_message_chars:,} (--max_message_chars)",
                "messages",
            )
    sampling, n, stop, stream, include_usage = read_sampling(body, args)
    try:
        messages, dropped = fit_conversation(messages, tokenizer, block_size, sampling.max_tokens)
    except UserError as e:
        raise FieldError(str(e), "messages") from None
    prompt = render_prompt(messages, tokenizer)
    prompts, samplings = choices_of([prompt], sampling, n)
    return Job("chat", prompts, samplings, stop, stream, include_usage, len(prompt), dropped)


def read_completion(body, args, tokenizer, block_size):
    """The Job of a request to /v1/completions: each prompt (a string, or a list of them) continued."""
    check_supported(body)
    texts = body.get("prompt")
    texts = [texts] if isinstance(texts, str) else texts
    if not (isinstance(texts, list) and texts and all(isinstance(text, str) for text in texts)):
        raise FieldError("prompt must be a string or a list of strings (token ids are not taken here)", "prompt")
    sampling, n, stop, stream, include_usage = read_sampling(body, args)
    if len(texts) * n > MOST_CHOICES:
        raise FieldError(f"{len(texts)} prompts x n={n}: this server writes at most {MOST_CHOICES} choices", "prompt")
    prompts = [tokenizer.encode(text) or [tokenizer.eot] for text in texts]  # "": a new document
    prompt_tokens = sum(map(len, prompts))
    for prompt in prompts:
        if len(prompt) + sampling.max_tokens > block_size:
            raise FieldError(
                f"a prompt of {len(prompt):,} tokens and max_tokens={sampling.max_tokens}: the model's context "
                f"holds {block_size:,} tokens: shorten the prompt (or ask for fewer tokens)",
                "prompt",
            )
    prompts, samplings = choices_of(prompts, sampling, n)
    return Job("completion", prompts, samplings, stop, stream, include_usage, prompt_tokens)


# ---- generating: the engine's tokens in, each choice's text out ----


def submit(engine, job, loop):
    """Every choice of job queued in the engine: (requests, events), events an asyncio.Queue that gets
    (choice, event) as the engine emits them. QueueFull if the queue is: nothing is left queued."""
    events = asyncio.Queue()
    requests = []
    try:
        for i, (prompt, sampling) in enumerate(zip(job.prompts, job.sampling)):

            def emit(event, i=i):  # called in the engine's thread
                loop.call_soon_threadsafe(events.put_nowait, (i, event))

            requests.append(engine.submit(prompt, sampling, emit))
    except QueueFull:
        for request in requests:
            request.cancel()
        raise
    return requests, events


class ReplyFailed(Exception):
    """The engine could not write a reply (a bug: its traceback is in the server's log)."""


async def written(job, requests, events, tokenizer):
    """(choice, text, finish_reason, tokens) as the choices are written: text as it comes (never ""),
    with finish_reason None; then once per choice "", its finish_reason and the tokens it took.
    A stop string ends a choice before it, and frees its row; leaving early frees every row."""
    streams = [TextStream(tokenizer, job.stop) for _ in requests]
    tokens = [0] * len(requests)
    open_choices = set(range(len(requests)))
    try:
        while open_choices:
            i, (kind, value) = await events.get()
            if i not in open_choices:  # ended by a stop string: what the engine wrote meanwhile is dropped
                continue
            finish_reason = None
            if kind == "token":
                tokens[i] += 1
                text = streams[i].push(value)
                if streams[i].stopped:
                    requests[i].cancel()
                    finish_reason = "stop"
            elif kind == "end":
                tokens[i] += value == "stop"  # the special token that ended the reply was sampled too
                text, finish_reason = streams[i].finish(), value
            else:
                raise ReplyFailed(value)
            if text:
                yield i, text, None, None
            if finish_reason:
                open_choices.discard(i)
                yield i, "", finish_reason, tokens[i]
    finally:
        for request in requests:
            request.cancel()


# ---- writing the answer: OpenAI's objects ----


def envelope(job, meta, choices, stream):
    names = {"chat": ("chat.completion", "chat.completion.chunk"), "completion": ("text_completion",) * 2}
    body = {"id": meta["id"], "object": names[job.kind][stream], "created": meta["created"], "model": meta["model"]}
    body["choices"] = choices
    return body


def choice(job, index, text, finish_reason, stream):
    if job.kind == "completion":
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    content = {"content": text} if text or not stream else {}
    message = {"delta": content} if stream else {"message": {"role": "assistant", **content}}
    return {"index": index, **message, "logprobs": None, "finish_reason": finish_reason}


def usage(job, completion_tokens):
    total = sum(completion_tokens)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": total, "total_tokens": job.prompt_tokens + total}


def error_body(message, kind="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def server_sent(job, meta, replies):
    """The answer as server-sent events, "data: {json}" and a blank line each, then "data: [DONE]"."""

    def event(body):
        return f"data: {json.dumps(body)}\n\n"

    completion_tokens = [0] * len(job.prompts)
    # closed as soon as the client goes away (Starlette cancels this generator), not at garbage collection:
    # its rows are freed at once
    async with contextlib.aclosing(replies):
        if job.kind == "chat":  # the first chunk of each choice names the role, as OpenAI's do
            for i in range(len(job.prompts)):
                first = {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                yield event(envelope(job, meta, [first], stream=True))
        try:
            async for i, text, finish_reason, tokens in replies:
                body = envelope(job, meta, [choice(job, i, text, finish_reason, stream=True)], stream=True)
                if finish_reason:
                    completion_tokens[i] = tokens
                    if job.kind == "chat":
                        body["dropped_messages"] = job.dropped
                yield event(body)
        except ReplyFailed as e:
            yield event(error_body(str(e), "server_error"))
            return
        if job.include_usage:
            yield event({**envelope(job, meta, [], stream=True), "usage": usage(job, completion_tokens)})
        yield "data: [DONE]\n\n"


async def whole(job, meta, replies):
    """The answer as one object, once every choice is written."""
    texts, finish_reasons, completion_tokens = [[] for _ in job.prompts], {}, [0] * len(job.prompts)
    async with contextlib.aclosing(replies):
        async for i, text, finish_reason, tokens in replies:
            texts[i].append(text)
            if finish_reason:
                finish_reasons[i], completion_tokens[i] = finish_reason, tokens
    choices = [choice(job, i, "".join(texts[i]), finish_reasons[i], stream=False) for i in range(len(texts))]
    body = {**envelope(job, meta, choices, stream=False), "usage": usage(job, completion_tokens)}
    if job.kind == "chat":
        body["dropped_messages"] = job.dropped
    return body


async def unless_gone(request, answer):
    """answer (a coroutine)'s result, or None if the client goes away first: then it is cancelled,
    which frees its rows. A reply that is not streamed would otherwise be written to the end for nobody."""
    task = asyncio.ensure_future(answer)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            return None


# ---- the app ----


async def read_body(request, limit):
    """The bytes of a request's body, or None if there are more than limit: it is read no further."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def read_page(path):
    """The text of the chat page, its {{placeholders}} still in it."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        reason = e.strerror or e
        raise UserError(f"cannot read the chat page {path}: {reason} (it belongs beside serve.py)") from None


def fill_page(page, **values):
    """The page with each {{name}} replaced by its value, HTML-escaped (a checkpoint's name may hold < or &)."""
    for name, value in values.items():
        page = page.replace("{{" + name + "}}", html.escape(str(value)))
    return page


def authorized(request, api_key):
    """Whether the request carries `Authorization: Bearer <api_key>` (always, with no key set)."""
    if api_key is None:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest takes as long whatever the first wrong character: the key cannot be guessed by timing
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def make_app(engine, tokenizer, args, page, name):
    """The FastAPI app. args: serve.py's flags (the replies' defaults, the limits, --api_key)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="serve.py", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())
    is_chat = "<|assistant|>" in tokenizer.special_tokens
    page = fill_page(page, model=name, temperature=args.temperature, max_new_tokens=args.max_new_tokens)

    def error(status, message, **fields):
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {"Retry-After": "1"} if status == 503 else None
        return JSONResponse(error_body(message, **fields), status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # 404, 405: in OpenAI's shape too
        return error(e.status_code, str(e.detail))

    def denied(request):
        if authorized(request, args.api_key):
            return None
        return error(401, "a missing or wrong API key: send `Authorization: Bearer <the key>`", code="invalid_api_key")

    @app.get("/")
    def index():
        return HTMLResponse(page)

    @app.get("/v1/models")
    def models(request: Request):
        model = {"id": name, "object": "model", "created": started, "owned_by": "serve.py"}
        return denied(request) or {"object": "list", "data": [model]}

    async def answer(request, read):
        if refused := denied(request):
            return refused
        data = await read_body(request, args.max_request_bytes)
        if data is None:
            limit = args.max_request_bytes
            message = (
                f"a request of more than {limit:,} bytes: this server reads at most {limit:,} (--max_request_bytes)"
            )
            return error(413, message, code="request_too_large")
        try:
            # parsing, checking, encoding and fitting take CPU time: in a thread, so that the event loop
            # goes on serving the other clients meanwhile
            job = await asyncio.to_thread(lambda: read(read_json(data), args, tokenizer, engine.block_size))
        except UserError as e:
            return error(400, str(e), param=getattr(e, "field", None))
        if len(job.prompts) > engine.waiting.maxsize:  # a 503 would have the client retry forever
            message = (
                f"{len(job.prompts)} replies (prompts x n) in one request, more than this server ever queues "
                f"({engine.waiting.maxsize}, --max_queue): ask for fewer"
            )
            return error(400, message, param="n")
        try:
            requests, events = submit(engine, job, asyncio.get_running_loop())
        except QueueFull:
            message = "the server is busy: every place in its queue is taken (--max_queue): try again shortly"
            return error(503, message, kind="server_error", code="server_overloaded")
        prefix = "chatcmpl" if job.kind == "chat" else "cmpl"
        meta = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        replies = written(job, requests, events, tokenizer)
        if job.stream:
            return StreamingResponse(server_sent(job, meta, replies), media_type="text/event-stream")
        try:
            body = await unless_gone(request, whole(job, meta, replies))
        except ReplyFailed as e:
            return error(500, str(e), kind="server_error")
        return JSONResponse(body)  # None when the client has gone: nobody reads it

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if not is_chat:
            refused = denied(request)
            message = f"the {tokenizer.name} tokenizer has no chat tokens: this model continues text (/v1/completions)"
            return refused or error(400, message, param="messages", code="model_not_chat")
        return await answer(request, read_chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, read_completion)

    return app
