"""
The one exception the library raises for problems a person can fix, and how scripts report it.

    raise UserError(f"no train shards in {data_dir}: run `python fineweb.py` first, or pass --data_dir")

Library code (model, data loader, checkpoints, evaluations) raises UserError with a message that
says what is wrong and how to fix it; it never exits the process, so other code (tests, notebooks,
bench.py) can catch it. Each script's main() runs under `exit_on_error`, which turns a UserError
into the one-line `error: ...` exit, and Ctrl-C into the one line `interrupted` (exit code 130, as
a shell reports a program SIGINT ended); output cut short by its reader (`| head`) ends quietly.
Anything else is a bug and keeps its traceback.
"""

import functools
import os
import sys


class UserError(Exception):
    """Bad flags, missing or damaged files, data that does not fit: the message says how to fix it."""


def exit_on_error(main):
    """Decorate a script's main(): a UserError becomes `SystemExit("error: <message>")`, exit code 1;
    a KeyboardInterrupt (Ctrl-C) that main did not handle itself becomes `interrupted` on stderr, exit
    code 130 (128 + SIGINT), instead of a traceback of wherever the program happened to be."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            raise SystemExit(f"error: {e}") from None
        except KeyboardInterrupt:
            sys.stdout.flush()  # the text printed so far, then the reason it stops
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except BrokenPipeError:
            # stdout's reader has gone (`python sample.py | head`): stop quietly, as Unix tools do. Point
            # stdout at /dev/null first, or Python's own flush at exit would fail again and print that.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(141) from None  # 128 + SIGPIPE

    return wrapper
