"""Tests for hellaswag.py and the scoring core it runs on (scoring.py): rendering, batched scores
against one-row-at-a-time oracles (our tiny GPT and a Hugging Face GPT2LMHeadModel), DDP sharding,
data loading and its errors."""

import io
import json
import socket
import sys
import urllib.error
import urllib.request
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import data_path

import evals
import hellaswag
import scoring
from checkpoint import model_checkpoint, model_from_checkpoint, save_checkpoint
from device import DistInfo, end_finished_rank, setup_precision, unwrap
from errors import UserError
from hellaswag import HELLASWAG
from hf import from_pretrained
from model import GPT, GPTConfig
from tokenizer import get_tokenizer

# The first validation example, as the original file has it.
FIRST_CTX = "A man is sitting on a roof. he"
FIRST_ENDINGS = [
    "is using wrap to wrap a pair of skis.",
    "is ripping level tiles off.",
    "is holding a rubik's cube.",
    "starts pulling up roofing on a roof.",
]


def rows_of(example):
    return hellaswag.hellaswag_rows(example, get_tokenizer())


def score(model, examples, task=HELLASWAG, dist=None, batch_size=16):
    return scoring.evaluate(task, model, examples, get_tokenizer(), dist, batch_size=batch_size)


def tiny_model(seed=2):
    # seed 2: on the first 12 examples acc and acc_norm differ, so a test can tell them apart
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_name("tiny")).eval()


def row_scores_one_at_a_time(logits_of, rows):
    """The oracle: each row alone, no padding, no batching. logits_of(idx (1, T)) -> (1, T, V).
    Returns per-row summed loss, token count and greedy match over the continuation."""
    scores = []
    for context, continuation in rows:
        idx = torch.tensor([context + continuation])
        with torch.no_grad():
            logits = logits_of(idx)[0, len(context) - 1 : -1].float()  # positions predicting the continuation
        target = torch.tensor(continuation)
        loss = F.cross_entropy(logits, target, reduction="sum").item()
        scores.append((loss, len(continuation), bool((logits.argmax(-1) == target).all())))
    return scores


def hellaswag_oracle(logits_of, examples):
    """acc and acc_norm computed example by example from the one-row-at-a-time scores."""
    correct = correct_norm = 0
    for example in examples:
        rows, label = rows_of(example)
        scores = row_scores_one_at_a_time(logits_of, rows)
        sums = [loss for loss, _, _ in scores]
        means = [loss / n for loss, n, _ in scores]
        correct += sums.index(min(sums)) == label
        correct_norm += means.index(min(means)) == label
    return {"acc": correct / len(examples), "acc_norm": correct_norm / len(examples), "count": len(examples)}


@pytest.fixture
def examples(oracle):
    return oracle[1]


@pytest.fixture(scope="module")
def oracle():
    """The tiny model, 12 examples, and the oracle's acc / acc_norm for them (computed once)."""
    model = tiny_model()
    examples = hellaswag.load_hellaswag(data_path("HELLASWAG_DIR", "hellaswag"), limit=12)
    return model, examples, hellaswag_oracle(lambda idx: model(idx)[0], examples)


# ---- rendering ----------------------------------------------------------------------------------
def test_an_example_is_context_then_space_ending_padded_with_the_mask_on_the_ending(examples, gpt2_tokenizer):
    enc = gpt2_tokenizer
    example = examples[0]
    assert example["ctx"] == FIRST_CTX and example["endings"] == FIRST_ENDINGS and example["label"] == 3
    rows, label = rows_of(example)
    tokens, mask = scoring.pad_rows(rows)
    context = enc.encode(FIRST_CTX)
    endings = [enc.encode(" " + ending) for ending in FIRST_ENDINGS]
    assert len(context) == 9 and [len(e) for e in endings] == [11, 6, 8, 9]
    assert tokens.shape == mask.shape == (4, 9 + 11) and label == 3
    for i, ending in enumerate(endings):
        row = context + ending
        assert tokens[i, : len(row)].tolist() == row
        assert tokens[i, len(row) :].tolist() == [0] * (20 - len(row))  # right padding
        assert mask[i].tolist() == [0] * 9 + [1] * len(ending) + [0] * (11 - len(ending))


def test_rows_longer_than_block_size_keep_their_end():
    tokens, mask = scoring.pad_rows([([1, 2, 3, 4, 5], [6, 7]), ([8], [9])], max_len=4)
    assert tokens.tolist() == [[4, 5, 6, 7], [8, 9, 0, 0]]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    with pytest.raises(UserError, match="4-token continuation .* block_size=4"):
        scoring.pad_rows([([1, 2], [3, 4, 5, 6])], max_len=4)


# ---- the scoring core against oracles -----------------------------------------------------------
def test_batched_scores_equal_one_row_at_a_time(examples):
    model = tiny_model()
    rows = [row for example in examples for row in rows_of(example)[0]]
    tokens, mask = scoring.pad_rows(rows, model.config.block_size)
    assert tokens.shape == (48, max(len(c) + len(e) for c, e in rows)) == (48, 58)  # padded to the longest row
    sum_loss, n_tokens, greedy = scoring.score_batch(model, tokens, mask)
    expected = row_scores_one_at_a_time(lambda idx: model(idx)[0], rows)
    torch.testing.assert_close(sum_loss, torch.tensor([s[0] for s in expected]), rtol=1e-5, atol=1e-4)
    assert n_tokens.tolist() == [s[1] for s in expected]
    assert greedy.tolist() == [s[2] for s in expected]


def test_evaluate_hellaswag_equals_one_example_at_a_time(oracle):
    model, examples, expected = oracle
    assert expected == {"acc": 3 / 12, "acc_norm": 7 / 12, "count": 12}
    for batch_size in (1, 5, 12):  # one at a time, a ragged last batch, everything in one pass
        assert score(model, examples, batch_size=batch_size) == expected


def test_pretrained_hugging_face_model_scores_equal_its_own_logits(examples, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=256, n_embd=32, n_layer=2, n_head=2)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    hf_model.save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path)).eval()
    rows = [row for example in examples[:6] for row in rows_of(example)[0]]
    sum_loss, n_tokens, greedy = scoring.score_batch(model, *scoring.pad_rows(rows, model.config.block_size))
    expected = row_scores_one_at_a_time(lambda idx: hf_model(idx).logits, rows)
    torch.testing.assert_close(sum_loss, torch.tensor([s[0] for s in expected]), rtol=1e-5, atol=1e-4)
    assert n_tokens.tolist() == [s[1] for s in expected]
    assert greedy.tolist() == [s[2] for s in expected]
    oracle = hellaswag_oracle(lambda idx: hf_model(idx).logits, examples)
    assert score(model, examples, batch_size=4) == oracle


def test_evaluation_unwraps_compiled_model_and_restores_training_mode(examples):
    model = tiny_model().train()
    expected = score(model, examples[:4])
    compiled = torch.compile(model)  # compiles lazily, on the first call: evaluation never calls it
    assert unwrap(compiled) is model
    assert score(compiled, examples[:4]) == expected
    assert model.training


@pytest.mark.parametrize(
    "device_type", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU"))]
)
def test_scores_run_in_the_precision_training_uses(examples, device_type):
    model = tiny_model().to(device_type)
    rows = [row for example in examples for row in rows_of(example)[0]]
    tokens, mask = (t.to(device_type) for t in scoring.pad_rows(rows, model.config.block_size))
    full = scoring.score_batch(model, tokens, mask)[0]
    if device_type == "cpu":  # "auto" is float32 on CPU: no autocast at all
        auto = scoring.score_batch(model, tokens, mask, setup_precision("auto", device_type))[0]
        assert torch.equal(auto, full)
    half = scoring.score_batch(model, tokens, mask, setup_precision("bfloat16", device_type))[0]
    assert not torch.equal(half, full)  # bf16 really ran
    torch.testing.assert_close(half, full, rtol=2e-2, atol=0.5)


# ---- distributed: gloo, two ranks ---------------------------------------------------------------
def distributed_worker(rank, world_size, port, checkpoint_path, hellaswag_dir, lambada_dir, out_dir):
    torch.set_num_threads(1)
    # a short timeout: an all-reduce that the other rank never joins fails the test instead of hanging it
    init = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    model = model_from_checkpoint(checkpoint_path)
    hella = hellaswag.load_hellaswag(hellaswag_dir, limit=11)  # 6 + 5: unequal shards
    lambada = evals.TASKS["lambada"].load(lambada_dir, 5)
    ranks = DistInfo(rank=rank, local_rank=rank, world_size=world_size, device="cpu")
    results = {
        "hellaswag": score(model, hella, dist=ranks, batch_size=2),
        "lambada": score(model, lambada, evals.TASKS["lambada"], dist=ranks, batch_size=2),
        # one example: rank 1 has nothing to score, yet must join the all-reduce
        "one": score(model, hella[:1], dist=ranks),
        # rank 0 alone (world_size=1) inside the DDP job: no all-reduce, which rank 1 would never join
        "alone": score(model, hella[:3]) if rank == 0 else None,
    }
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    end_finished_rank()  # not destroy_process_group: gloo can abort there


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_single_process(hellaswag_dir, lambada_dir, tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "tiny.pt", model_checkpoint(model))
    hella = hellaswag.load_hellaswag(hellaswag_dir, limit=11)
    lambada = evals.TASKS["lambada"].load(lambada_dir, 5)
    single = {
        "hellaswag": score(model, hella),
        "lambada": score(model, lambada, evals.TASKS["lambada"]),
        "one": score(model, hella[:1]),
        "alone": score(model, hella[:3]),
    }
    args = (2, free_port(), str(tmp_path / "tiny.pt"), str(hellaswag_dir), str(lambada_dir), str(tmp_path))
    mp.spawn(distributed_worker, args=args, nprocs=2, join=True)
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            ranked = json.load(f)
        assert ranked["hellaswag"] == single["hellaswag"]
        assert ranked["one"] == single["one"]
        assert ranked["alone"] == (single["alone"] if rank == 0 else None)
        assert ranked["lambada"]["acc"] == single["lambada"]["acc"]
        assert ranked["lambada"]["count"] == single["lambada"]["count"] == 5
        assert ranked["lambada"]["ppl"] == pytest.approx(single["lambada"]["ppl"], rel=1e-5)


# ---- data files ---------------------------------------------------------------------------------
def test_real_validation_file_loads_by_folder_file_or_variable(hellaswag_dir, monkeypatch):
    examples = hellaswag.load_hellaswag(hellaswag_dir)
    assert len(examples) == 10042
    assert sum(example["label"] == 0 for example in examples) == 2515
    assert hellaswag.load_hellaswag(hellaswag_dir / "hellaswag_val.jsonl", limit=3) == examples[:3]
    monkeypatch.setenv("HELLASWAG_DIR", str(hellaswag_dir))
    assert hellaswag.load_hellaswag(limit=5) == examples[:5]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def good_line(**changes):
    return json.dumps({"ctx": FIRST_CTX, "endings": FIRST_ENDINGS, "label": 3, **changes})


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"ctx": "A man is', r"line 3: not valid JSON"),
        (good_line(endings=FIRST_ENDINGS[:3]), r"line 3: `endings` must be a list of 4 texts"),
        (good_line(label=4), r"line 3: `label` must be an integer 0..3, not 4"),
        (good_line(label="3"), r"line 3: `label` must be an integer 0..3, not '3'"),
        (json.dumps({"text": "lambada?"}), r"line 3: no `ctx` text"),
    ],
)
def test_malformed_line_is_reported_with_its_number(tmp_path, bad_line, message):
    write_lines(tmp_path / "hellaswag_val.jsonl", [good_line(), good_line(), bad_line, good_line()])
    with pytest.raises(UserError, match=message):
        hellaswag.load_hellaswag(tmp_path)


def test_truncated_file_is_rejected_by_row_count(tmp_path):
    write_lines(tmp_path / "hellaswag_val.jsonl", [good_line()] * 100)
    with pytest.raises(UserError, match="holds 100 examples, expected 10,042"):
        hellaswag.load_hellaswag(tmp_path)


def test_folder_without_the_file_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"--data_file=.*no .*hellaswag_val.jsonl"):
        hellaswag.load_hellaswag(tmp_path)
    monkeypatch.setenv("HELLASWAG_DIR", str(tmp_path))
    with pytest.raises(UserError, match=r"HELLASWAG_DIR=.*no .*hellaswag_val.jsonl"):
        hellaswag.load_hellaswag()


def offline_cache(monkeypatch, tmp_path, response=None):
    """No HELLASWAG_DIR, an empty cache folder, and urlopen answering `response` (bytes) or failing."""
    monkeypatch.delenv("HELLASWAG_DIR", raising=False)
    monkeypatch.setenv("EVALS_CACHE_DIR", str(tmp_path / "cache"))

    def urlopen(url, timeout=None):
        if response is None:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return io.BytesIO(response)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def test_download_failure_names_the_offline_options(tmp_path, monkeypatch):
    offline_cache(monkeypatch, tmp_path)
    with pytest.raises(
        UserError, match=r"could not download .*HELLASWAG_DIR=FOLDER, a folder holding hellaswag_val.jsonl.*--data_file"
    ):
        hellaswag.load_hellaswag()
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written left behind


def test_download_is_validated_before_it_lands_in_the_cache(hellaswag_dir, tmp_path, monkeypatch):
    content = (hellaswag_dir / "hellaswag_val.jsonl").read_bytes()
    offline_cache(monkeypatch, tmp_path, response=content[: len(content) // 2])  # a cut-off download
    with pytest.raises(UserError, match="content is wrong"):
        hellaswag.load_hellaswag()
    assert list((tmp_path / "cache").iterdir()) == []
    offline_cache(monkeypatch, tmp_path, response=content)
    assert len(hellaswag.load_hellaswag()) == 10042
    assert (tmp_path / "cache" / "hellaswag_val.jsonl").read_bytes() == content
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["hellaswag_val.jsonl"]


# ---- command line -------------------------------------------------------------------------------
def test_cli_prints_acc_acc_norm_and_count(oracle, hellaswag_dir, tmp_path, monkeypatch, capsys):
    model, _, expected = oracle
    save_checkpoint(tmp_path / "tiny.pt", model_checkpoint(model))
    argv = ["hellaswag.py", "--checkpoint", str(tmp_path / "tiny.pt"), "--limit", "12", "--batch_size", "5"]
    monkeypatch.setattr(sys, "argv", argv + ["--device", "cpu", "--data_file", str(hellaswag_dir)])
    hellaswag.main()
    line = f"hellaswag acc {expected['acc']:.4f} acc_norm {expected['acc_norm']:.4f} count 12"
    assert capsys.readouterr().out.strip() == line == "hellaswag acc 0.2500 acc_norm 0.5833 count 12"


def forward_widths(monkeypatch):
    """The rows of every forward pass scoring.score_batch makes from now on."""
    widths, score_batch = [], scoring.score_batch

    def recording(model, tokens, *args):
        widths.append(len(tokens))
        return score_batch(model, tokens, *args)

    monkeypatch.setattr(scoring, "score_batch", recording)
    return widths


@pytest.mark.parametrize("flags, widths", [([], [4, 4, 4]), (["--batch_size", "2"], [8, 4])])
def test_cli_scores_one_example_per_forward_on_a_cpu_unless_told(
    oracle, hellaswag_dir, tmp_path, monkeypatch, capsys, flags, widths
):
    """4 rows per example: batch 1 by default on the CPU (16 would be slower there); --batch_size wins."""
    save_checkpoint(tmp_path / "tiny.pt", model_checkpoint(oracle[0]))
    seen = forward_widths(monkeypatch)
    hellaswag.main(
        ["--checkpoint", str(tmp_path / "tiny.pt"), "--limit", "3", "--data_file", str(hellaswag_dir), *flags]
    )
    assert seen == widths and capsys.readouterr().out.endswith("count 3\n")
    assert [scoring.default_batch_size(device) for device in ("cpu", "cuda", "mps")] == [1, 16, 16]


def test_evaluate_without_a_batch_size_takes_the_device_s_as_training_s_evaluation_does(oracle, monkeypatch):
    model, examples, _ = oracle
    seen = forward_widths(monkeypatch)
    scoring.evaluate(HELLASWAG, model, examples[:2], get_tokenizer())  # train_gpt2.py passes no batch_size
    assert seen == [4, 4]


def test_cli_help_says_the_batch_size_depends_on_the_device(capsys):
    with pytest.raises(SystemExit):
        hellaswag.main(["--help"])
    assert "(default: 1 on a CPU, where batching is slower, 16 on a GPU)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "flags, message",
    [
        pytest.param(
            ["--device", "cuda"],
            r"--device cuda: PyTorch sees no CUDA GPU.*--device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without CUDA"),
        ),
        (["--device", "tpu"], r"--device tpu: choose auto, cpu, cuda"),
        (["--dtype", "float8"], r"--dtype float8: choose auto, bfloat16, float16, float32"),
    ],
)
def test_cli_rejects_a_missing_device_or_unknown_dtype_before_loading_anything(flags, message, monkeypatch):
    # --model gpt2 is never loaded (the hub may be unreachable): the check comes first
    monkeypatch.setattr(sys, "argv", ["hellaswag.py", "--model", "gpt2"] + flags)
    with pytest.raises(SystemExit, match=message):
        hellaswag.main()
