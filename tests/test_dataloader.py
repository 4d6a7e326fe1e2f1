"""Tests for dataloader.py: what each rank reads, resuming, shuffling, memory, and the errors.

Shards are generated here with np.save. Token values encode their place: shard k holds
k*10000, k*10000+1, ..., so every batch can be checked against plain numpy slicing, and y == x + 1
proves a window never runs across two shards.
"""

import os
import re
import sys

import numpy as np
import pytest
import torch

from dataloader import DataLoaderLite, main
from errors import UserError
from shards import LLMC_MAGIC

B, T = 2, 4  # a window is B*T+1 = 9 tokens
BT = B * T
# 5, 3 and 3 windows: 11 per epoch, a multiple of neither 2 nor 3, so some steps run across a shard
# end and one across the end of an epoch. The last shard keeps a tail of a full B*T tokens.
SIZES = [5 * BT + 1, 3 * BT + 5, 3 * BT + 8]
WINDOWS_PER_EPOCH = 11


def write_shards(folder, sizes, split="train"):
    """np.save one shard per size, as fineweb.py names them; returns the token arrays."""
    shards = []
    for k, size in enumerate(sizes):
        tokens = (k * 10000 + np.arange(size)).astype(np.uint16)
        np.save(folder / f"test_{split}_{k:06d}.npy", tokens)
        shards.append(tokens)
    return shards


def write_bin(path, tokens, magic=LLMC_MAGIC, version=1, n_tokens=None):
    """An llm.c token file: 256 int32 header words, then the uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if n_tokens is None else n_tokens
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def make_loaders(folder, num_processes, **kwargs):
    return [DataLoaderLite(B, T, rank, num_processes, data_dir=folder, **kwargs) for rank in range(num_processes)]


def read_stream(loaders, steps):
    """`steps` batches from every rank, in stream order: step 0 of ranks 0..W-1, then step 1, ..."""
    return [loader.next_batch() for _ in range(steps) for loader in loaders]


def assert_same_batches(batches, expected):
    assert len(batches) == len(expected)
    for (x, y), (x_expected, y_expected) in zip(batches, expected):
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)


def as_long(tokens):
    return torch.from_numpy(tokens.astype(np.int64))


def test_rank_reads_offset_r_BT_inside_each_stride(tmp_path):
    (tokens,) = write_shards(tmp_path, [6 * BT + 1])
    for rank in range(3):
        loader = DataLoaderLite(B, T, rank, 3, data_dir=tmp_path)
        for stride in range(2):
            x, y = loader.next_batch()
            start = stride * 3 * BT + rank * BT
            assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
            assert torch.equal(x.flatten(), as_long(tokens[start : start + BT]))
            assert torch.equal(y.flatten(), as_long(tokens[start + 1 : start + BT + 1]))


def test_shard_end_neither_wastes_a_window_nor_reads_past_it(tmp_path):
    shards = write_shards(tmp_path, [3 * BT + 1, 3 * BT])
    loader = DataLoaderLite(B, T, data_dir=tmp_path)
    # 3*B*T+1 tokens hold exactly 3 windows (the last y ends on the last token); 3*B*T tokens hold 2,
    # since a third window would need one token past the end.
    assert loader.shard_windows == [3, 2]
    batches = [loader.next_batch() for _ in range(6)]
    assert batches[2][1][-1, -1] == int(shards[0][-1])
    assert batches[4][1][-1, -1] == int(shards[1][2 * BT])
    assert torch.equal(batches[5][0], batches[0][0]) and loader.epoch == 1


def test_shards_shorter_than_W_windows_still_serve_W_ranks(tmp_path):
    write_shards(tmp_path, [BT + 1, 2 * BT + 1])  # 1 + 2 windows: the reference recipe needs 3*B*T+1 per shard
    firsts = [loader.next_batch()[0][0, 0].item() for loader in make_loaders(tmp_path, 3)]
    assert firsts == [0, 10000, 10000 + BT]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_every_token_is_read_once_per_epoch(tmp_path, num_processes, shuffle):
    shards = write_shards(tmp_path, SIZES)
    loaders = make_loaders(tmp_path, num_processes, shuffle=shuffle, seed=7)
    steps_per_epoch = -(-WINDOWS_PER_EPOCH // num_processes)  # the last step may reach into the next epoch
    batches = read_stream(loaders, steps_per_epoch)
    assert [loader.epoch for loader in loaders] == [1] * num_processes
    batches += read_stream(loaders, steps_per_epoch)
    # every token of each shard but its tail (shorter than one window), once per epoch
    expected = np.sort(np.concatenate([t[: (len(t) - 1) // BT * BT] for t in shards]))
    for epoch in range(2):
        epoch_batches = batches[epoch * WINDOWS_PER_EPOCH : (epoch + 1) * WINDOWS_PER_EPOCH]
        read = torch.cat([x.flatten() for x, _ in epoch_batches])
        assert torch.equal(read.sort().values, as_long(expected))
    for x, y in batches:
        assert torch.equal(y, x + 1)  # x and y come from one run of consecutive tokens of one shard


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("num_processes, accumulation", [(2, 3), (3, 2)])
def test_W_ranks_times_A_micro_steps_read_what_one_rank_reads_in_W_times_A(
    tmp_path, num_processes, accumulation, shuffle
):
    write_shards(tmp_path, SIZES)
    ranks = make_loaders(tmp_path, num_processes, shuffle=shuffle, seed=3)
    (single,) = make_loaders(tmp_path, 1, shuffle=shuffle, seed=3)
    micro_steps = num_processes * accumulation
    for _ in range(8):  # 8 optimizer steps of 6 windows: across shard ends and four epochs
        one_rank = [single.next_batch() for _ in range(micro_steps)]
        many_ranks = [[loader.next_batch() for _ in range(accumulation)] for loader in ranks]
        # rank r's micro-step a holds the window the single rank reads at micro-step a*W + r
        in_one_rank_order = [many_ranks[r][a] for a in range(accumulation) for r in range(num_processes)]
        assert_same_batches(in_one_rank_order, one_rank)
    assert single.epoch == 8 * micro_steps // WINDOWS_PER_EPOCH == 4


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("steps_before", [1, 2, 6], ids=["mid_shard", "across_shard_end", "next_epoch"])
def test_state_round_trip_continues_with_the_same_batches(tmp_path, steps_before, shuffle):
    data = tmp_path / "data"
    data.mkdir()
    write_shards(data, SIZES)
    loaders = make_loaders(data, 2, shuffle=shuffle, seed=5)
    read_stream(loaders, steps_before)
    state = loaders[0].state_dict()
    assert loaders[1].state_dict() == state  # the same on every rank: saving rank 0's is enough
    torch.save({"dataloader": state}, tmp_path / "checkpoint.pt")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["dataloader"]  # plain types only

    resumed = make_loaders(data, 2, shuffle=shuffle, seed=5)
    for loader in resumed:
        loader.load_state_dict(state)
    assert [loader.epoch for loader in resumed] == [loader.epoch for loader in loaders]
    assert_same_batches(read_stream(resumed, 8), read_stream(loaders, 8))


@pytest.mark.parametrize("num_processes", [1, 3])
def test_state_from_two_ranks_continues_the_same_stream_on_another_world_size(tmp_path, num_processes):
    write_shards(tmp_path, SIZES)
    old = make_loaders(tmp_path, 2, shuffle=True, seed=5)
    read_stream(old, 3)
    state = old[0].state_dict()
    expected = read_stream(old, 6)  # the next 12 windows of the stream
    new = make_loaders(tmp_path, num_processes, shuffle=True, seed=5)
    for loader in new:
        loader.load_state_dict(state)
    assert_same_batches(read_stream(new, 12 // num_processes), expected)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"B": 1}, "B=2"),
        ({"T": 8}, "T=4"),
        ({"seed": 6}, "seed=5"),
        ({"shuffle": False}, "shuffle=True"),
    ],
)
def test_load_state_refuses_a_different_setup(tmp_path, change, message):
    write_shards(tmp_path, SIZES)
    setup = {"B": B, "T": T, "shuffle": True, "seed": 5}
    state = DataLoaderLite(data_dir=tmp_path, **setup).state_dict()
    loader = DataLoaderLite(data_dir=tmp_path, **{**setup, **change})
    with pytest.raises(UserError, match=f"checkpoint was taken with {message}"):
        loader.load_state_dict(state)


def test_load_state_refuses_other_shards_but_ignores_the_seed_without_shuffling(tmp_path):
    write_shards(tmp_path, SIZES)
    state = DataLoaderLite(B, T, data_dir=tmp_path, seed=5).state_dict()
    loader = DataLoaderLite(B, T, data_dir=tmp_path, seed=6)  # same windows in the same order
    loader.load_state_dict({**state, "position": 4})
    assert loader.position == 4
    write_shards(tmp_path, SIZES + [BT + 1])
    with pytest.raises(UserError, match=r"checkpoint was taken with shards=\['test_train_000000.npy', "):
        DataLoaderLite(B, T, data_dir=tmp_path).load_state_dict(state)


def test_shuffle_is_a_new_permutation_each_epoch_reproducible_from_the_seed(tmp_path):
    write_shards(tmp_path, SIZES)

    def first_tokens(shuffle, seed, epochs):
        """The first token of each window read: it names the window (shard k's tokens start at k*10000)."""
        loader = DataLoaderLite(B, T, data_dir=tmp_path, shuffle=shuffle, seed=seed)
        windows = [loader.next_batch()[0][0, 0].item() for _ in range(epochs * WINDOWS_PER_EPOCH)]
        return [windows[e * WINDOWS_PER_EPOCH : (e + 1) * WINDOWS_PER_EPOCH] for e in range(epochs)]

    (in_order,) = first_tokens(False, 0, 1)
    assert in_order == [0, 8, 16, 24, 32, 10000, 10008, 10016, 20000, 20008, 20016]
    epochs = first_tokens(True, 5, 6)
    assert all(sorted(epoch) == in_order for epoch in epochs)  # each epoch: a permutation of the windows
    assert len({tuple(epoch) for epoch in epochs}) == 6  # a new one every epoch
    for epoch in epochs:  # one shard at a time: each shard's windows are read together
        shard_runs = [k for i, k in enumerate(w // 10000 for w in epoch) if i == 0 or epoch[i - 1] // 10000 != k]
        assert sorted(shard_runs) == [0, 1, 2]
    assert len({tuple(w // 10000 for w in epoch) for epoch in epochs}) > 1  # shard order changes too
    assert first_tokens(True, 5, 6) == epochs  # reproducible from the seed
    assert first_tokens(True, 6, 6) != epochs


def test_reset_restarts_from_the_first_batch(tmp_path):
    write_shards(tmp_path, [BT + 1], split="val")
    write_shards(tmp_path, SIZES)  # train shards in the same folder are not read
    loader = DataLoaderLite(B, T, split="val", data_dir=tmp_path)
    assert [os.path.basename(p) for p in loader.shards] == ["test_val_000000.npy"]
    first = [loader.next_batch() for _ in range(3)]
    loader.reset()
    assert_same_batches([loader.next_batch() for _ in range(3)], first)
    assert loader.epoch == 3


def test_llmc_bin_shards_read_like_npy_shards(tmp_path):
    npy, bin_ = tmp_path / "npy", tmp_path / "bin"
    npy.mkdir()
    bin_.mkdir()
    for k, tokens in enumerate(write_shards(npy, SIZES)):
        write_bin(bin_ / f"fineweb_train_{k:06d}.bin", tokens)
    (from_npy,), (from_bin,) = make_loaders(npy, 1, shuffle=True), make_loaders(bin_, 1, shuffle=True)
    assert from_bin.shard_tokens == SIZES
    assert_same_batches(read_stream([from_bin], 15), read_stream([from_npy], 15))


def rss_mb():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


LARGE_SHARD_TOKENS = 100 * 2**20  # 200 MiB of uint16


@pytest.fixture
def large_shard(tmp_path):
    """A 200 MiB shard whose token i is i % 50257, removed afterwards (pytest keeps old tmp folders)."""
    path = tmp_path / "big_train_000000.npy"
    tokens = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(LARGE_SHARD_TOKENS,))
    for start in range(0, LARGE_SHARD_TOKENS, 2**22):
        tokens[start : start + 2**22] = np.arange(start, start + 2**22) % 50257
    tokens.flush()
    del tokens
    yield path
    path.unlink()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc (Linux)")
def test_rss_stays_flat_reading_a_large_shard(tmp_path, large_shard):
    loader = DataLoaderLite(64, 1024, data_dir=tmp_path)  # the recipe's micro-batch: 1,599 windows
    baseline = peak = rss_mb()
    for _ in range(loader.windows_per_epoch):
        x, y = loader.next_batch()
        peak = max(peak, rss_mb())
    last = loader.windows_per_epoch - 1  # the window the last batch read
    assert x[0, 0] == last * 2**16 % 50257 and y[-1, -1] == (last + 1) * 2**16 % 50257
    assert peak - baseline < 50, f"RSS grew from {baseline:.0f} MB to {peak:.0f} MB"
    # The measurement can see a leak: one memory map of the whole shard, kept open while reading it
    # (trap 11), grows RSS by about the shard's 200 MiB.
    whole_shard = np.load(large_shard, mmap_mode="r")
    for start in range(0, LARGE_SHARD_TOKENS, 2**22):
        whole_shard[start : start + 2**22].max()  # touches every page
    assert rss_mb() - baseline > 150


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_match_cpu_batches(tmp_path):
    write_shards(tmp_path, SIZES)
    (cpu,), (cuda,) = make_loaders(tmp_path, 1), make_loaders(tmp_path, 1, device="cuda")
    for (x, y), (x_cuda, y_cuda) in zip(read_stream([cpu], 12), read_stream([cuda], 12)):
        assert x_cuda.device.type == y_cuda.device.type == "cuda"
        assert torch.equal(x_cuda.cpu(), x) and torch.equal(y_cuda.cpu(), y)


def truncated_npy(path):
    np.save(path, np.arange(100, dtype=np.uint16))
    os.truncate(path, os.path.getsize(path) - 10)


ERRORS = [  # how to write a bad shard (into a file of this name), and the error expected
    pytest.param(
        "x_train_000000.npy",
        lambda p: np.save(p, np.arange(BT, dtype=np.uint16)),
        "fewer than one window of B\\*T\\+1 = 9",
        id="too_short",
    ),
    pytest.param(
        "x_train_000000.npy",
        lambda p: np.save(p, np.arange(100, dtype=np.int32)),
        "holds int32 values; expected uint16",
        id="wrong_dtype",
    ),
    pytest.param(
        "x_train_000000.npy", lambda p: np.save(p, np.zeros((10, 10), dtype=np.uint16)), "must be 1-D", id="not_1d"
    ),
    pytest.param(
        "x_train_000000.npy",
        truncated_npy,
        "is 318 bytes, but its header announces 100 tokens .* truncated",
        id="truncated_npy",
    ),
    pytest.param(
        "x_train_000000.npy", lambda p: p.write_bytes(b"not numpy at all"), "is not a .npy file", id="not_npy"
    ),
    pytest.param(
        "x_train_000000.bin",
        lambda p: write_bin(p, range(100), magic=20240801),
        "magic number 20240801, expected 20240520",
        id="bin_magic",
    ),
    pytest.param(
        "x_train_000000.bin",
        lambda p: write_bin(p, range(100), version=2),
        "version 2; only version 1",
        id="bin_version",
    ),
    pytest.param(
        "x_train_000000.bin",
        lambda p: write_bin(p, range(100), n_tokens=200),
        "is 1,224 bytes, but .* 200 tokens",
        id="truncated_bin",
    ),
    pytest.param(
        "x_train_000000.bin", lambda p: p.write_bytes(b"\0" * 100), "shorter than llm.c's header", id="bin_header"
    ),
]


@pytest.mark.parametrize("name, write, message", ERRORS)
def test_a_bad_shard_is_a_clear_error_naming_the_file(tmp_path, name, write, message):
    write(tmp_path / name)
    with pytest.raises(UserError, match=f"shard {re.escape(str(tmp_path / name))} .*{message}"):
        DataLoaderLite(B, T, data_dir=tmp_path)


def test_missing_folder_or_shards_are_clear_errors(tmp_path):
    with pytest.raises(
        UserError,
        match=f"data folder {re.escape(str(tmp_path / 'nope'))} not found: "
        "run `python fineweb.py`.* or pass --data_dir",
    ):
        DataLoaderLite(B, T, data_dir=tmp_path / "nope")
    write_shards(tmp_path, [100], split="val")
    with pytest.raises(UserError, match=r"no train shards \(\*_train_\*.npy or \*_train_\*.bin\) in .*fineweb.py"):
        DataLoaderLite(B, T, data_dir=tmp_path)


def test_fewer_windows_than_ranks_is_a_clear_error(tmp_path):
    write_shards(tmp_path, [2 * BT + 1])
    with pytest.raises(UserError, match="hold 2 windows of B\\*T\\+1 = 9 tokens, fewer than num_processes=3"):
        DataLoaderLite(B, T, 0, 3, data_dir=tmp_path)


def test_command_line_prints_what_a_loader_reads(tmp_path, monkeypatch, capsys):
    write_shards(tmp_path, SIZES)
    monkeypatch.setattr(
        sys, "argv", ["dataloader.py", "--data_dir", str(tmp_path), "--B", "2", "--T", "4", "--num_processes", "2"]
    )
    main()
    assert capsys.readouterr().out.splitlines() == [
        f"3 train shards in {tmp_path}: test_train_000000.npy ... test_train_000002.npy",
        "102 tokens; 11 windows of B*T = 8 tokens per epoch (88 tokens, shard tails left out)",
        "5.5 micro-steps per epoch on each of 2 ranks",
        "first batch: x (2, 4) torch.int64, first tokens [0, 1, 2, 3]",
    ]
