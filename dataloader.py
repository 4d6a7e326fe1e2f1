"""
DataLoaderLite: (x, y) batches of GPT-2 tokens, read straight from the shards on disk.

    from dataloader import DataLoaderLite
    loader = DataLoaderLite(B=64, T=1024, process_rank=rank, num_processes=world_size, split="train",
                            data_dir="edu_fineweb10B", shuffle=True, seed=1337, device="cuda")
    x, y = loader.next_batch()          # (B, T) int64 each; y[b, t] is the token after x[b, t]

To see what a loader would read from a folder of shards (counts, tokens per epoch, steps per epoch):

    python dataloader.py --data_dir edu_fineweb10B --split train --B 64 --T 1024 --num_processes 8

Shards are what `fineweb.py` writes, or llm.c's `.bin` files: shards.py holds that file contract.

How windows are cut from the shards and dealt out to the ranks, and why a resume on any number of
GPUs reads exactly the tokens it would have read: docs/data.md.
"""

import argparse
import bisect
import os

import numpy as np
import torch

from errors import UserError, exit_on_error
from shards import DEFAULT_DATA_DIR, check_token_ids, find_shards, read_tokens, shard_layout


def permutation(n, seed, epoch, stream):
    """A permutation of range(n) that depends only on (seed, epoch, stream), so every rank draws the
    same one without talking to the others, and resuming needs no saved RNG state. Stream 0 orders
    the shards, stream k+1 the windows of shard k. (All keys have three words: numpy's SeedSequence
    treats [a, b] and [a, b, 0] as the same seed.)"""
    return np.random.default_rng([seed, epoch, stream]).permutation(n)


class DataLoaderLite:
    """next_batch() -> (x, y), each (B, T) int64 on `device`. Attributes worth printing: `shards`
    (paths, sorted by name), `epoch`, `windows_per_epoch` (so one epoch is windows_per_epoch /
    num_processes steps of each rank). With vocab_size, each shard's ids are checked against it the
    first time the shard is read: an id the model has no embedding row for is a clear error, not a
    crash deep in the embedding (or a CUDA device-side assert)."""

    pads_rows = False  # every token of a batch is real: last_batch_tokens is always B * T
    rows_per_example = 1

    def __init__(
        self,
        B,
        T,
        process_rank=0,
        num_processes=1,
        split="train",
        data_dir=DEFAULT_DATA_DIR,
        shuffle=False,
        seed=0,
        device="cpu",
        vocab_size=None,
    ):
        if B < 1 or T < 1:
            raise UserError(f"batch size B={B} and sequence length T={T} must both be at least 1")
        if not 0 <= process_rank < num_processes:
            raise UserError(f"process_rank={process_rank} is not a rank of num_processes={num_processes}")
        if seed < 0:
            raise UserError(f"seed={seed} must be a non-negative integer")
        # Plain Python types, so that state_dict() holds nothing a weights_only load would refuse.
        self.B, self.T = int(B), int(T)
        self.process_rank, self.num_processes = int(process_rank), int(num_processes)
        self.split, self.data_dir = str(split), data_dir
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.device = torch.device(device)
        # Page-locked memory lets the copy to the GPU run asynchronously (non_blocking=True).
        self.pin_memory = self.device.type == "cuda"

        self.shards = find_shards(data_dir, split)
        # Only the headers are read here; the tokens stay on disk until a window is needed.
        layouts = [shard_layout(path) for path in self.shards]
        self.shard_offsets = [offset for offset, _ in layouts]
        self.shard_tokens = [n_tokens for _, n_tokens in layouts]
        self.shard_windows = [(n - 1) // (B * T) for n in self.shard_tokens]
        for path, n_tokens, n_windows in zip(self.shards, self.shard_tokens, self.shard_windows):
            if n_windows == 0:
                raise UserError(
                    f"shard {path} holds {n_tokens:,} tokens, fewer than one window of B*T+1 = {B * T + 1:,}: "
                    f"lower B or T, or write larger shards"
                )
        self.windows_per_epoch = sum(self.shard_windows)
        if self.windows_per_epoch < num_processes:
            raise UserError(
                f"the {split} shards in {data_dir} hold {self.windows_per_epoch} windows of B*T+1 = "
                f"{B * T + 1:,} tokens, fewer than num_processes={num_processes}: lower B or T"
            )
        self.vocab_size = vocab_size
        self._checked = set()  # shards whose ids were checked against vocab_size
        self._plan_epoch = self._plan = None  # caches: shard order of one epoch ...
        self._order_key = self._order = None  # ... and window order of one shard in one epoch
        self.reset()

    def reset(self):
        """Back to the first batch (the validation loop calls this before each pass)."""
        self.position = 0  # stream index of the first window of the next step, the same on every rank

    @property
    def epoch(self):
        """Full passes over the split that all ranks together have completed (0 during the first)."""
        return self.position // self.windows_per_epoch

    @property
    def last_batch_tokens(self):
        return self.B * self.T

    def next_batch(self):
        window = self.position + self.process_rank
        self.position += self.num_processes
        buf = self._read_window(*self._locate(window))  # (B*T+1,)
        if self.device.type != "cpu":
            buf = buf.to(self.device, non_blocking=self.pin_memory)  # one transfer; x and y are views
        x = buf[:-1].view(self.B, self.T)  # (B, T) inputs
        y = buf[1:].view(self.B, self.T)  # (B, T) targets: each input's next token
        return x, y

    def _locate(self, window):
        """(shard index, first token) of window number `window` of the endless stream."""
        epoch, index = divmod(window, self.windows_per_epoch)
        shard_order, starts = self._epoch_plan(epoch)
        k = bisect.bisect_right(starts, index) - 1
        shard, within = shard_order[k], index - starts[k]
        if self.shuffle:
            within = self._window_order(epoch, shard)[within]
        return shard, within * self.B * self.T

    def _epoch_plan(self, epoch):
        """The shards in the order this epoch reads them, and the stream index (within the epoch)
        where each one starts."""
        if self._plan_epoch != epoch:
            n = len(self.shards)
            shard_order = permutation(n, self.seed, epoch, 0).tolist() if self.shuffle else list(range(n))
            starts = np.cumsum([0] + [self.shard_windows[i] for i in shard_order[:-1]]).tolist()
            self._plan_epoch, self._plan = epoch, (shard_order, starts)
        return self._plan

    def _window_order(self, epoch, shard):
        if self._order_key != (epoch, shard):
            self._order_key = (epoch, shard)
            self._order = permutation(self.shard_windows[shard], self.seed, epoch, shard + 1)
        return self._order

    def _read_window(self, shard, start):
        """Tokens start .. start+B*T of a shard as int64, in pinned memory when bound for a GPU."""
        n = self.B * self.T + 1
        path, offset = self.shards[shard], self.shard_offsets[shard]
        if self.vocab_size is not None and shard not in self._checked:
            check_token_ids(path, offset, self.shard_tokens[shard], self.vocab_size)
            self._checked.add(shard)
        # Map only this window's bytes, never the whole shard: once the copy below is done the map is
        # dropped, and with it the page-cache pages it added to our RSS. A map of the whole shard kept
        # open would grow RSS up to the shard's size as reading advances (the reference recipe instead
        # holds an int64 copy of the shard: 800 MB per rank for 100M tokens).
        tokens = read_tokens(path, offset, start, n)
        buf = torch.empty(n, dtype=torch.long, pin_memory=self.pin_memory)
        buf.numpy()[:] = tokens  # uint16 -> int64 in one pass, straight into the (pinned) buffer
        return buf

    def state_dict(self):
        """Plain ints, strings and lists (it goes into a checkpoint read with weights_only=True); the
        same on every rank, so saving rank 0's is enough."""
        return {
            "position": self.position,
            "B": self.B,
            "T": self.T,
            "num_processes": self.num_processes,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "split": self.split,
            "shards": [os.path.basename(path) for path in self.shards],  # the folder may move
            "shard_tokens": self.shard_tokens,
        }

    def load_state_dict(self, state):
        """Continue exactly where the saved loader was. The saved setup must read the same stream of
        windows (same B, T, shuffle, seed, shards); num_processes may differ (see the docstring)."""
        mine = self.state_dict()
        keys = ["B", "T", "shuffle", "split", "shards", "shard_tokens"] + (["seed"] if self.shuffle else [])
        for key in keys:
            if state.get(key) != mine[key]:  # .get: a fine-tuning checkpoint's loader has other keys
                raise UserError(
                    f"cannot resume the {self.split} data loader: the checkpoint was taken with "
                    f"{key}={describe(state.get(key))}, this run has {key}={describe(mine[key])} "
                    f"(data in {self.data_dir}); resume with the same setting"
                )
        self.position = state["position"]


def describe(value):
    """A short text for a setting that may be a long list (the shard names)."""
    if isinstance(value, list) and len(value) > 4:
        return f"[{len(value)} items: {value[0]!r}, {value[1]!r}, ..., {value[-1]!r}]"
    return repr(value)


@exit_on_error
def main():
    parser = argparse.ArgumentParser(description="Print what a DataLoaderLite reads from a folder of shards.")
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="folder of token shards")
    parser.add_argument("--split", default="train")
    parser.add_argument("--B", type=int, default=64, help="sequences per micro-batch")
    parser.add_argument("--T", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--num_processes", type=int, default=1, help="number of ranks (GPUs)")
    args = parser.parse_args()
    loader = DataLoaderLite(args.B, args.T, num_processes=args.num_processes, split=args.split, data_dir=args.data_dir)
    tokens_per_epoch = loader.windows_per_epoch * args.B * args.T
    print(
        f"{len(loader.shards)} {args.split} shards in {args.data_dir}: "
        f"{os.path.basename(loader.shards[0])} ... {os.path.basename(loader.shards[-1])}"
    )
    print(
        f"{sum(loader.shard_tokens):,} tokens; {loader.windows_per_epoch:,} windows of B*T = "
        f"{args.B * args.T:,} tokens per epoch ({tokens_per_epoch:,} tokens, shard tails left out)"
    )
    print(
        f"{loader.windows_per_epoch / args.num_processes:,.1f} micro-steps per epoch on each of "
        f"{args.num_processes} ranks"
    )
    x, y = loader.next_batch()
    print(f"first batch: x {tuple(x.shape)} {x.dtype}, first tokens {x[0, :8].tolist()}")


if __name__ == "__main__":
    main()
