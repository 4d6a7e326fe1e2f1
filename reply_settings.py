"""
A reply's settings (its length, temperature, top-k, top-p, seed), checked in one place: the flags of
chat.py and serve.py, and each field of a request to the server (openai_api.py), go through the same
checks, so a value the terminal refuses the API refuses too, with the same message. sample.py takes
its sampling flags from here too (add_sampling_args), with its own defaults.
"""

import json
import math

from errors import UserError

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


class FieldError(UserError):
    """A value that cannot be used; field names it (a setting, or a request's field)."""

    def __init__(self, message, field):
        super().__init__(message)
        self.field = field


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


def check_setting(setting, value, field=None):
    """value, checked as the setting (a name in SETTINGS; temperature and top_p made floats: a temperature
    of 10**300 as an int would overflow torch's int64); FieldError, naming field (default: the setting),
    for a value that cannot generate, of the wrong kind (a bool is not a number), not finite or out of range."""
    field = field or setting
    kind, in_range, limits = SETTINGS[setting]
    if not (is_integer(value) if kind == "an integer" else is_number(value)):
        raise FieldError(f"{field}={shown(value)}: must be {kind}", field)
    if not in_range(value):
        raise FieldError(f"{field}={shown(value)}: must be {limits}", field)
    return float(value) if kind == "a number" else value


def check_flags(args):
    """The sampling flags of add_reply_args, checked before the model loads (None: unset)."""
    for setting in SETTINGS:
        value = getattr(args, setting)
        if value is not None:
            check_setting(setting, value)


def add_reply_args(parser, seed_default, seed_help):
    """The flags that set a reply's defaults, chat.py's and serve.py's alike."""
    parser.add_argument("--system", default=None, help="a system message that opens every conversation")
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        default=None,
        help="tokens per reply, at most (default: 256, or half the context of a model with less)",
    )
    # nanochat's chat defaults: a little below 1 and the 50 most likely tokens keep a small model on topic
    add_sampling_args(parser, 0.6, 50, seed_default, seed_help)


def add_sampling_args(parser, temperature, top_k, seed_default, seed_help):
    """--temperature, --top_k, --top_p and --seed: how each token is drawn. sample.py's defaults (the
    model's own distribution) differ from a chat's."""
    parser.add_argument(
        "--temperature",
        type=float,
        default=temperature,
        help=f"0: always the most likely token (greedy); below 1 safer, above 1 wilder (default: {temperature})",
    )
    parser.add_argument(
        "--top_k", type=int, default=top_k, help=f"sample only among the k most likely tokens (default: {top_k})"
    )
    parser.add_argument(
        "--top_p",
        type=float,
        default=None,
        help="sample only among the most likely tokens that together hold this probability",
    )
    parser.add_argument("--seed", type=int, default=seed_default, help=seed_help)


def reply_length(args, block_size):
    """--max_new_tokens, its default filled in for a model's context of block_size; UserError if it
    leaves the conversation less than half of the context."""
    if args.max_new_tokens is None:
        return min(256, block_size // 2)
    if args.max_new_tokens > block_size // 2:
        raise UserError(
            f"--max_new_tokens {args.max_new_tokens} leaves the conversation less than half of the "
            f"model's context of {block_size} tokens: ask for at most {block_size // 2}"
        )
    return args.max_new_tokens
