"""
The record of a training run: one Python logger whose records go to the console and two files.

    log/log.txt         the reference format, one number per line:  `250 train 5.123456`,
                        `250 val 5.1234`, `250 hella 0.2641`  (what plot.py reads)
    log/metrics.jsonl   one JSON object per record with every field (lr, grad norm, tokens/s, MFU, ...)

    log = setup_logging("log", start_step=0, is_master=True)
    log_record(log, "step 1 | loss 10.9", "1 train 10.900000", step=1, kind="train", loss=10.9)

Only rank 0 writes; the logger of every other rank drops everything. On resume from step s, entries
at step >= s (written after that checkpoint, before the crash) are removed: they are about to be
written again, and a log must not hold two versions of one step.
"""

import json
import logging
import os
import sys

LOGGER_NAME = "train_gpt2"


def reference_line(record):
    return getattr(record, "log_line", None)


def json_line(record):
    metrics = getattr(record, "metrics", None)
    return json.dumps(metrics) if metrics else None


def log_record(log, message, log_line=None, **metrics):
    """message to the console, log_line (if any) to log.txt, the metrics to metrics.jsonl."""
    log.info(message, extra={"metrics": metrics, "log_line": log_line})


def read_log(path):
    """{name: ([steps], [values])} from a log.txt, e.g. {"train": ([0, 1, ...], [10.98, 10.5, ...])}."""
    series = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 3:
                continue
            steps, values = series.setdefault(parts[1], ([], []))
            steps.append(int(parts[0]))
            values.append(float(parts[2]))
    return series


def read_metrics(path):
    """Every record of a metrics.jsonl, as dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class LineFileHandler(logging.Handler):
    """Appends format_line(record) to a file, for the records that have one, flushed at once so
    that `tail -f` and a crash both see every finished line."""

    def __init__(self, path, format_line):
        super().__init__()
        self.file = open(path, "a")
        self.format_line = format_line

    def emit(self, record):
        line = self.format_line(record)
        if line:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self):
        self.file.close()
        super().close()


class ConsoleFormatter(logging.Formatter):
    def format(self, record):
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def keep_steps_before(path, start_step, step_of):
    """Rewrite path keeping only lines whose step (step_of(line)) is below start_step."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and step_of(line) < start_step]
    with open(path, "w") as f:
        f.writelines(lines)


def close_logging():
    """Detach and close the run's handlers (and so its files)."""
    log = logging.getLogger(LOGGER_NAME)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def setup_logging(log_dir, start_step, is_master):
    """The run's logger. Calling it again (a second run in one process, as the tests do) starts afresh."""
    close_logging()
    log = logging.getLogger(LOGGER_NAME)
    log.setLevel(logging.INFO)
    log.propagate = False
    if not is_master:
        log.addHandler(logging.NullHandler())
        return log
    os.makedirs(log_dir, exist_ok=True)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(ConsoleFormatter())
    log.addHandler(console)
    files = [
        ("log.txt", reference_line, lambda line: int(line.split()[0])),
        ("metrics.jsonl", json_line, lambda line: json.loads(line)["step"]),
    ]
    for name, format_line, step_of in files:
        path = os.path.join(log_dir, name)
        keep_steps_before(path, start_step, step_of)
        log.addHandler(LineFileHandler(path, format_line))
    return log
