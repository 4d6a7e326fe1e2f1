"""
Plot a training run from its log.txt: train/val loss, val bits per byte, and HellaSwag accuracy next
to GPT-2 and GPT-3.

    python plot.py log                      # reads log/log.txt, writes log/plot.png
    python plot.py log/demo --out demo.png
"""

import argparse
import os

from errors import UserError, exit_on_error
from files import describe_os_error
from training_log import read_log

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))

# Reference numbers (HellaSwag: val split, 10,042 examples, completion-style acc_norm).
GPT2_124M_VAL_LOSS = 3.2924  # OpenAI's GPT-2 124M checkpoint on a FineWeb-Edu val shard
GPT2_124M_HELLASWAG = 0.2955  # OpenAI's GPT-2 124M checkpoint
GPT3_125M_HELLASWAG = 0.337  # GPT-3 Small (125M), zero-shot: GPT-3 paper, appendix H
HELLASWAG_CHANCE = 0.25  # four endings


def plot_run(series, out_path, title):
    """Three panels: the losses, val bits per byte (which compares runs with different tokenizers),
    and HellaSwag accuracy (a note where the run has none)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bpb, ax_hella) = plt.subplots(1, 3, figsize=(20, 5))
    if "train" in series:
        ax_loss.plot(*series["train"], lw=0.8, alpha=0.6, label="train loss")
    if "val" in series:
        ax_loss.plot(*series["val"], marker="o", ms=3, label="val loss")
    label = f"OpenAI GPT-2 124M val loss ({GPT2_124M_VAL_LOSS})"
    ax_loss.axhline(GPT2_124M_VAL_LOSS, color="r", ls="--", lw=1, label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats per token)")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)

    if "val_bpb" in series:
        ax_bpb.plot(*series["val_bpb"], marker="o", ms=3, color="tab:purple", label="val bits per byte")
        ax_bpb.legend()
    else:
        ax_bpb.text(0.5, 0.5, "no val bits per byte in this log", ha="center", transform=ax_bpb.transAxes)
    ax_bpb.set_xlabel("step")
    ax_bpb.set_ylabel("bits per UTF-8 byte")
    ax_bpb.set_title("val bits per byte")
    ax_bpb.grid(alpha=0.3)

    bottom, top = 0.2, 0.4
    if "hella" in series:
        ax_hella.plot(*series["hella"], marker="o", ms=3, label="this run (acc_norm)")
        bottom, top = min(bottom, min(series["hella"][1]) - 0.02), max(top, max(series["hella"][1]) + 0.02)
    else:
        ax_hella.text(0.5, 0.5, "no HellaSwag evaluations in this log", ha="center", transform=ax_hella.transAxes)
    ax_hella.axhline(GPT2_124M_HELLASWAG, color="r", ls="--", lw=1, label=f"OpenAI GPT-2 124M ({GPT2_124M_HELLASWAG})")
    ax_hella.axhline(GPT3_125M_HELLASWAG, color="g", ls="--", lw=1, label=f"GPT-3 Small 125M ({GPT3_125M_HELLASWAG})")
    ax_hella.axhline(HELLASWAG_CHANCE, color="gray", ls=":", lw=1, label=f"chance ({HELLASWAG_CHANCE})")
    ax_hella.set_ylim(bottom, top)
    ax_hella.set_xlabel("step")
    ax_hella.set_ylabel("accuracy")
    ax_hella.set_title("HellaSwag")
    ax_hella.legend()
    ax_hella.grid(alpha=0.3)

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


@exit_on_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir", nargs="?", default=os.path.join(SCRIPT_DIR, "log"), help="folder holding log.txt")
    parser.add_argument("--out", default=None, help="PNG to write (default: <log_dir>/plot.png)")
    args = parser.parse_args(argv)
    log_path = os.path.join(args.log_dir, "log.txt")
    if not os.path.isfile(log_path):
        raise UserError(
            f"no {log_path}: train first (python train_gpt2.py --log_dir {args.log_dir}), or name the folder holding it"
        )
    series, skipped = read_log(log_path)
    if skipped:
        print(f"{log_path}: skipped {skipped} line(s) that are not `step kind value`")
    if not series:
        raise UserError(f"{log_path} holds no `step kind value` lines yet: let training run a step first")
    out_path = args.out or os.path.join(args.log_dir, "plot.png")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise UserError(f"--out {out_path}: the folder {out_dir} does not exist")
    try:
        plot_run(series, out_path, title=os.path.abspath(args.log_dir))
    except OSError as e:
        raise UserError(f"could not write {out_path}: {describe_os_error(e)}")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
