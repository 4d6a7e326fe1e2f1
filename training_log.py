"""
The record of a training run: one Python logger whose records go to the console and two files.

    log/log.txt         the reference format, one number per line:  `250 train 5.123456`,
                        `250 val 5.1234`, `250 hella 0.2641`  (what plot.py reads)
    log/metrics.jsonl   one JSON object per record with every field (lr, grad norm, tokens/s, MFU, ...)

    log = setup_logging("log", start_step=0, is_master=True)
    log_record(log, "step 1 | loss 10.9", "1 train 10.900000", step=1, kind="train", loss=10.9)

Only rank 0 writes; the logger of every other rank drops everything. On resume from step s, entries
at step >= s (written after that checkpoint, before the crash) are removed: they are about to be
written again, and a log must not hold two versions of one step. A torn last line (a kill or a full
disk in the middle of a write) is dropped and reported, never glued to the next one.

Also here: how each record reads, the run summary at the start, the per-step line with its timing
(tokens/s, MFU, ETA), and evaluation results.
"""

import json
import logging
import os
import sys
from dataclasses import asdict
from datetime import timedelta

from device import graphs_compiled
from errors import UserError
from files import atomic_write, describe_os_error, lock_folder
from model import MODERN_SWITCHES

LOGGER_NAME = "train_gpt2"
# Below INFO: the files take such records, the console does not (train_gpt2.py --log_interval).
QUIET = logging.INFO - 5


def reference_line(record):
    return getattr(record, "log_line", None)


def json_line(record):
    metrics = getattr(record, "metrics", None)
    return json.dumps(metrics) if metrics else None


def log_record(log, message, log_line=None, **metrics):
    """message to the console, log_line (if any) to log.txt, the metrics to metrics.jsonl."""
    log.info(message, extra={"metrics": {**metrics, "graphs": graphs_compiled()}, "log_line": log_line})


def format_results(name, results):
    """One line: `hellaswag acc 0.2859 acc_norm 0.2955 count 10042`."""
    return " ".join([name] + [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()])


def log_run_summary(run, loader, model, compiled, grad_accum_steps, start_step):
    """The setup and the values derived from it, once at the start; and where every value that differs
    from its default came from (cfg.sources: a preset, the model table, the recipe, or a flag)."""
    cfg, precision, world_size = run.cfg, run.precision, run.dist.world_size
    B, T = cfg.batch_size, cfg.seq_len
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # fewer with LoRA
    dtype = str(precision.dtype).removeprefix("torch.")
    if precision.scaler.is_enabled():
        dtype += " with loss scaling"
    switches = [f"{name}={getattr(model.config, name)}" for name in MODERN_SWITCHES if getattr(model.config, name)]
    optimizer = f"Muon (lr {cfg.muon_lr:g}) for the blocks' matrices + AdamW" if cfg.optimizer == "muon" else "AdamW"
    decay = f"a plateau, a linear decay over the last {cfg.decay_frac:.0%}" if cfg.lr_schedule == "wsd" else "a decay"
    changed = ", ".join(f"{name} {getattr(cfg, name)} ({source})" for name, source in cfg.sources.items())
    log_record(
        run.log,
        f"{world_size} process(es) on {run.dist.device}, {dtype}, {'compiled' if compiled else 'eager'}\n"
        f"recipe: {', '.join(switches) or 'GPT-2'}; {optimizer}\n"
        f"model: {model.num_params() / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trained), "
        f"{model.flops_per_token(T) / 1e9:.3f} GFLOP per token (training)\n"
        f"batch: {token_slots(cfg, loader):,} {'token slots' if loader.pads_rows else 'tokens'} per step = batch_size "
        f"{B} x seq_len {T} x {world_size} process(es) x grad_accum_steps {grad_accum_steps}"
        + (f" x {loader.rows_per_example} rows per example" if loader.rows_per_example > 1 else "")
        + (" (rows are padded: each step line counts its real tokens)" if loader.pads_rows else "")
        + "\n"
        f"schedule: {cfg.max_steps} steps = {cfg.max_steps * cfg.total_batch_size / 1e9:.3g}B tokens; "
        f"warmup {cfg.warmup_steps} steps to lr {cfg.max_lr:g}, then {decay} to {cfg.max_lr * cfg.min_lr_ratio:g}\n"
        f"not the defaults: {changed or 'none'}",
        step=start_step,
        kind="config",
        **asdict(cfg),
        grad_accum_steps=grad_accum_steps,
        world_size=world_size,
        num_params=model.num_params(),
    )


def log_run_end(run, steps, seconds, results):
    """The last lines of a run: how long it took, its final numbers, where its files are."""
    numbers = "; ".join(format_results(name, figures) for name, figures in results.items()) or "no evaluation"
    log_record(
        run.log,
        f"done: {steps} step(s) in {timedelta(seconds=round(seconds))}; {numbers}\n"
        f"checkpoints, log.txt and metrics.jsonl are in {run.cfg.log_dir} (plot: python plot.py {run.cfg.log_dir})",
        step=run.cfg.max_steps,
        kind="end",
        seconds=seconds,
    )


def token_slots(cfg, loader):
    """Token positions a step computes at most: --total_batch_size, times the rows each example takes
    (DPO: a chosen and a rejected reply)."""
    return cfg.total_batch_size * loader.rows_per_example


class StepTimer:
    """Speed of the training steps: tokens/s and MFU (model FLOPs utilisation: useful FLOPs per second
    over the hardware's peak), both from the real tokens of the step (fine-tuning's padding is not
    work), and the time left, from a moving average of the step time."""

    def __init__(self, token_slots_per_step, flops_per_token, peak_flops, max_steps, start_step):
        self.token_slots, self.flops_per_token, self.peak_flops = token_slots_per_step, flops_per_token, peak_flops
        self.max_steps, self.start_step = max_steps, start_step
        self.ema = None

    def measure(self, step, seconds, tokens):
        """The figures of the step that took `seconds` and trained on `tokens` real tokens, for the log."""
        tokens_per_sec = tokens / seconds
        mfu = self.flops_per_token * tokens_per_sec / self.peak_flops if self.peak_flops else None
        padding = 1 - tokens / self.token_slots
        figures = {"dt_ms": seconds * 1000, "tokens": tokens, "padding": padding, "tokens_per_sec": tokens_per_sec}
        figures.update(mfu=mfu, eta_s=None)
        # The first step of a process compiles and warms up: no estimate from it, and the average
        # starts afresh at the second.
        if step > self.start_step:
            self.ema = seconds if step == self.start_step + 1 else 0.9 * self.ema + 0.1 * seconds
            figures["eta_s"] = round(self.ema * (self.max_steps - step - 1))
        return figures


def log_train_step(run, step, figures, shown=()):
    """One training step: the full record to metrics.jsonl and log.txt, and every --log_interval-th
    one (and the last) to the console. figures: loss, lr, grad_norm, StepTimer's, and the rest, of
    which those named in `shown` (the job's own: DPO's rewards, ...) go on the console line too."""
    max_steps = run.cfg.max_steps
    mfu = f"{figures['mfu']:.1%}" if figures["mfu"] else "n/a"
    padding = f" ({figures['padding']:.0%} padding)" if figures["padding"] > 0 else ""
    eta = timedelta(seconds=figures["eta_s"]) if figures["eta_s"] is not None else "n/a (first step)"
    message = (
        f"step {step:5d}/{max_steps} | loss {figures['loss']:.6f} | lr {figures['lr']:.4e} | "
        + "".join(f"{name} {figures[name]:.4f} | " for name in shown)
        + f"norm {figures['grad_norm']:.4f} | {figures['dt_ms']:.1f} ms | {figures['tokens_per_sec']:,.0f} tok/s"
        f"{padding} | mfu {mfu} | eta {eta}"
    )
    metrics = dict(step=step, kind="train", **figures, graphs=graphs_compiled())
    extra = {"metrics": metrics, "log_line": f"{step} train {figures['loss']:.6f}"}
    show = step % run.cfg.log_interval == 0 or step + 1 == max_steps
    run.log.log(logging.INFO if show else QUIET, message, extra=extra)


def say_complete(cfg, path, is_master):
    """A run started again after it finished: say so and where its results are, and touch no file (the
    log's records of the last step must stay)."""
    if is_master:
        print(
            f"the run in {cfg.log_dir} is complete: {path} is step {cfg.max_steps} of --max_steps {cfg.max_steps}, "
            f"and its final evaluation is in log.txt and metrics.jsonl. Nothing to do: raise --max_steps to train "
            f"on, or pass a new --log_dir to start another run"
        )


def read_log(path):
    """({name: ([steps], [values])}, number of lines skipped) from a log.txt, e.g.
    {"train": ([0, 1, ...], [10.98, 10.5, ...])}. Lines that are not `step kind value` (a torn last
    line, something appended by hand) are skipped and counted."""
    series, skipped = {}, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                step = reference_step(line)
                kind, value = line.split()[1], float(line.split()[2])
            except ValueError:
                skipped += 1
                continue
            steps, values = series.setdefault(kind, ([], []))
            steps.append(step)
            values.append(value)
    return series, skipped


def read_metrics(path):
    """Every record of a metrics.jsonl, as dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class LineFileHandler(logging.Handler):
    """Appends format_line(record) to a file, for the records that have one, flushed at once so
    that `tail -f` and a crash both see every finished line."""

    def __init__(self, path, format_line):
        super().__init__()
        self.path = path
        self.file = open(path, "a", encoding="utf-8")
        self.format_line = format_line

    def emit(self, record):
        line = self.format_line(record)
        if line:
            try:
                self.file.write(line + "\n")
                self.file.flush()
            except OSError as e:  # a full disk: stop with a message rather than logging's traceback per line
                raise UserError(f"could not write {self.path}: {describe_os_error(e)}") from e

    def close(self):
        self.file.close()
        super().close()


class FolderLock(logging.Handler):
    """Holds files.lock_folder(log_dir) for as long as the run's logger lives: close_logging, which
    every run calls on the way out (see train_gpt2.main), releases it. It logs nothing."""

    def __init__(self, folder):
        super().__init__()
        self.lock_file = lock_folder(folder)  # not `self.lock`: logging.Handler has one of its own

    def emit(self, record):
        pass

    def close(self):
        if self.lock_file:
            self.lock_file.close()
        super().close()


class ConsoleFormatter(logging.Formatter):
    def format(self, record):
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def keep_steps_before(path, start_step, step_of, log):
    """Rewrite path, atomically, keeping only the lines whose step (step_of(line)) is below
    start_step. A line that does not parse or lacks its newline was torn by a crash: dropped, and
    said so. Without the atomic rewrite a kill in the middle of it would lose the whole history."""
    if not os.path.exists(path):
        return
    kept, torn = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                if not line.endswith("\n"):
                    raise ValueError("no newline")
                step = step_of(line)
            except (ValueError, KeyError, IndexError, TypeError):
                torn.append(line)
                continue
            if step < start_step:
                kept.append(line)
    for line in torn:
        log.warning(f"{path}: dropped a damaged line (torn by a crash?): {line.strip()[:80]!r}")
    atomic_write(path, lambda f: f.write("".join(kept).encode()))


class WandbHandler(logging.Handler):
    """The records of metrics.jsonl, the same dicts, to a Weights & Biases run as well (--wandb_project).
    wandb is not a requirement: it is imported here, when asked for. WANDB_MODE=offline keeps the run on
    disk (`wandb sync` later)."""

    def __init__(self, project, name, config):
        super().__init__()
        import wandb  # train_gpt2.check_config made sure it is there

        self.run = wandb.init(project=project, name=name, config=config)

    def emit(self, record):
        metrics = getattr(record, "metrics", None)
        if metrics:
            self.run.log(metrics)

    def close(self):
        self.run.finish()
        super().close()


def close_logging():
    """Detach and close the run's handlers (and so its files)."""
    log = logging.getLogger(LOGGER_NAME)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def setup_logging(log_dir, start_step, is_master, wandb_project=""):
    """The run's logger. Calling it again (a second run in one process, as the tests do) starts afresh."""
    close_logging()
    log = logging.getLogger(LOGGER_NAME)
    log.setLevel(QUIET)
    log.propagate = False
    if not is_master:
        log.addHandler(logging.NullHandler())
        return log
    try:
        os.makedirs(log_dir, exist_ok=True)
    except OSError as e:  # a file of that name, a read-only file system
        raise UserError(f"--log_dir {log_dir}: cannot create the folder ({describe_os_error(e)})") from e
    if not os.access(log_dir, os.W_OK):
        raise UserError(f"--log_dir {log_dir}: cannot write there (permission denied or read-only)")
    # First the folder's lock, then any file in it: a second run on this folder must touch nothing.
    log.addHandler(FolderLock(log_dir))
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO)
    console.setFormatter(ConsoleFormatter())
    log.addHandler(console)
    files = [
        ("log.txt", reference_line, reference_step),
        ("metrics.jsonl", json_line, lambda line: int(json.loads(line)["step"])),
    ]
    for name, format_line, step_of in files:
        path = os.path.join(log_dir, name)
        keep_steps_before(path, start_step, step_of, log)
        log.addHandler(LineFileHandler(path, format_line))
    if wandb_project:
        log.addHandler(WandbHandler(wandb_project, os.path.basename(os.path.abspath(log_dir)), {"log_dir": log_dir}))
    return log


def reference_step(line):
    """The step of a `step kind value` line of log.txt; ValueError for anything else."""
    step, _, value = line.split()
    float(value)
    return int(step)
