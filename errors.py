"""
The one exception the library raises for problems a person can fix, and how scripts report it.

    raise UserError(f"no train shards in {data_dir}: run `python fineweb.py` first, or pass --data_dir")

Library code (model, data loader, checkpoints, evaluations) raises UserError with a message that
says what is wrong and how to fix it; it never exits the process, so other code (tests, notebooks,
bench.py) can catch it. Each script's main() runs under `exit_on_error`, which turns a UserError
into the one-line `error: ...` exit. Anything else is a bug and keeps its traceback.
"""

import functools


class UserError(Exception):
    """Bad flags, missing or damaged files, data that does not fit: the message says how to fix it."""


def exit_on_error(main):
    """Decorate a script's main(): a UserError becomes `SystemExit("error: <message>")`, exit code 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            raise SystemExit(f"error: {e}") from None

    return wrapper
