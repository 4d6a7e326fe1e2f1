"""
Serve any checkpoint over HTTP through the OpenAI API, to many clients at once, and the chat page.

    python serve.py --checkpoint log/sft/model_00500.pt                  # http://127.0.0.1:8000/: the page, and /v1/...
    python serve.py --model gpt2                                           # OpenAI's GPT-2: /v1/completions
    python serve.py --checkpoint log/sft/model_00500.pt --max_batch 8 --max_queue 64
    SERVE_API_KEY=secret python serve.py --checkpoint log/sft/model_00500.pt --host 0.0.0.0   # every network: a key

    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
        -d '{"model": "any", "messages": [{"role": "user", "content": "Capital of France?"}]}'

POST /v1/chat/completions (a model fine-tuned to chat by finetune.py), POST /v1/completions (any model:
text continued) and GET /v1/models are OpenAI's (openai_api.py); GET / is the chat page (chat.html),
which talks to /v1/chat/completions too. Requests that arrive while others are being written join
them at the next step: one forward pass serves every reply under way (engine.py). Leaving 127.0.0.1
takes an API key (--api_key, or $SERVE_API_KEY: then every /v1 request needs `Authorization: Bearer
KEY`) or --open, which says you mean a server anyone who reaches it can use. How it works: docs/chat.md.
"""

import argparse
import ipaddress
import os
import socket
from pathlib import Path

from checkpoint import add_model_args
from config import bounded
from device import add_device_args, pick_device, setup_precision
from engine import Engine
from errors import UserError, exit_on_error
from openai_api import PAGE_FILE, make_app, read_page
from reply_settings import add_reply_args, check_flags, reply_length
from sample import load_sampling_model


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


def check_exposure(sock, api_key, open_server):
    """UserError for a server bound beyond loopback (0.0.0.0, a LAN address) with neither an API key nor
    --open: anyone on the network could use the machine's CPU or GPU, unasked."""
    address = sock.getsockname()[0]
    if ipaddress.ip_address(address.split("%")[0]).is_loopback or api_key or open_server:
        return
    sock.close()
    raise UserError(
        f"--host {address} serves every machine that can reach this one: set an API key (--api_key, or "
        "$SERVE_API_KEY) that clients send as `Authorization: Bearer KEY`, or pass --open if you mean an open server"
    )


def serve(app, sock):
    import uvicorn

    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    print(f"serve.py: serving {url} (the chat page; the OpenAI API under {url}v1) (Ctrl-C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_reply_args(
        parser, seed_default=None, seed_help="the seed of requests that set none (default: a fresh one each)"
    )
    add_device_args(parser)
    server = parser.add_argument_group("the server")
    server.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every network, take care)")
    server.add_argument("--port", type=bounded(int, 0, 65535), default=8000, help="port to serve on (0: any free one)")
    server.add_argument(
        "--api_key",
        default=os.environ.get("SERVE_API_KEY"),
        help="the key every /v1 request must send as `Authorization: Bearer KEY` (default: $SERVE_API_KEY, "
        "which keeps it out of the process list)",
    )
    server.add_argument("--open", action="store_true", help="serve beyond 127.0.0.1 without an API key, on purpose")
    server.add_argument(
        "--max_batch",
        type=bounded(int, 1, None),
        default=8,
        help="replies generated together, at most (1: one at a time)",
    )
    server.add_argument(
        "--max_queue",
        type=bounded(int, 1, None),
        default=64,
        help="requests waiting for a row, at most; more get HTTP 503 (try again)",
    )
    server.add_argument(
        "--max_message_chars",
        type=bounded(int, 1, None),
        default=4000,
        help="longest user or system message taken, in characters",
    )
    # GPT-2's context of 1,024 tokens holds some 4 KB of English: 256 KiB is room for 60 such conversations
    server.add_argument(
        "--max_request_bytes",
        type=bounded(int, 1, None),
        default=2**18,
        help="largest request body read, in bytes (more: HTTP 413)",
    )
    return parser.parse_args(argv)


@exit_on_error
def main(argv=None):
    args = parse_args(argv)
    check_flags(args)
    page = read_page(PAGE_FILE)  # a missing page fails now, not after loading
    sock = listen(args.host, args.port)  # a port in use fails now, not after loading
    check_exposure(sock, args.api_key, args.open)
    device = pick_device(args.device, local_rank=0)
    precision = setup_precision(args.dtype, device.split(":")[0])
    model, tokenizer = load_sampling_model(args, device)
    args.max_new_tokens = reply_length(args, model.config.block_size)
    engine = Engine(model, tokenizer.special_tokens.values(), precision, args.max_batch, args.max_queue).start()
    name = args.model or "/".join(Path(args.checkpoint).parts[-2:])  # log/sft/model_00500.pt -> sft/model_00500.pt
    serve(make_app(engine, tokenizer, args, page, name), sock)


if __name__ == "__main__":
    main()
