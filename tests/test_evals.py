"""Tests for evals.py: LAMBADA's target split, accuracy and perplexity against models whose scores
are known exactly, StoryCloze from a tiny CSV against a one-row-at-a-time oracle, the task registry,
data errors and the command line."""

import csv
import math
import sys
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import torch
from test_hellaswag import forward_widths, row_scores_one_at_a_time, score, tiny_model

import evals
from checkpoint import model_checkpoint, save_checkpoint
from errors import UserError
from scoring import log_line
from tokenizer import get_tokenizer

VOCAB = 50257


class PeekingModel(torch.nn.Module):
    """Reads the next token from its own input and gives it logit 1, every other token 0: greedy
    decoding is always right, and every scored token costs exactly log(e + V - 1) - 1."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(block_size=1024, vocab_size=VOCAB)

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, VOCAB)  # (B, T, V)
        logits[:, :-1].scatter_(2, idx[:, 1:, None], 1.0)
        return logits, None


class UniformModel(PeekingModel):
    """All logits 0: every token costs log(V), and greedy decoding picks token 0 ("!")."""

    def forward(self, idx):
        return torch.zeros(*idx.shape, VOCAB), None


@pytest.fixture
def passages(lambada_dir):
    return evals.TASKS["lambada"].load(lambada_dir, 6)


# ---- LAMBADA ------------------------------------------------------------------------------------
def test_lambada_target_is_the_last_word_with_its_whitespace(passages, gpt2_tokenizer):
    enc = gpt2_tokenizer
    text = passages[0]["text"]
    assert text.endswith("I don't care about signs")
    [(context, target)], label = evals.lambada_rows(passages[0], get_tokenizer())
    assert target == enc.encode(" signs") and label == 0
    assert context == enc.encode(text[: -len(" signs")])
    # a word after a line break keeps the line break, as it reads in the passage
    [(context, target)], _ = evals.lambada_rows({"text": 'the other\n\n"Ridley'}, get_tokenizer())
    assert (enc.decode(context), enc.decode(target)) == ("the other\n", '\n"Ridley')


def test_lambada_accuracy_and_perplexity_from_models_with_known_scores(passages, gpt2_tokenizer):
    target_tokens = [len(evals.lambada_rows(p, get_tokenizer())[0][0][1]) for p in passages]
    assert target_tokens == [1, 1, 1, 1, 1, 2]  # " Hastin" is two tokens
    mean_tokens = sum(target_tokens) / len(passages)
    peeking = score(PeekingModel(), passages, evals.TASKS["lambada"], batch_size=4)
    assert peeking["acc"] == 1.0 and peeking["count"] == 6
    # ppl is per word: exp of the target's summed loss, averaged over passages
    assert peeking["ppl"] == pytest.approx(math.exp((math.log(math.e + VOCAB - 1) - 1) * mean_tokens), rel=1e-5)
    uniform = score(UniformModel(), passages, evals.TASKS["lambada"], batch_size=4)
    assert uniform["acc"] == 0.0
    assert uniform["ppl"] == pytest.approx(VOCAB**mean_tokens, rel=1e-5)


def test_lambada_real_file_loads_and_bad_rows_are_named(lambada_dir, tmp_path):
    assert len(evals.TASKS["lambada"].load(lambada_dir, None)) == 5153
    (tmp_path / "lambada_test.jsonl").write_text('{"text": "two words"}\n{"text": "one"}\n')
    with pytest.raises(UserError, match="line 2: the passage needs at least two words"):
        evals.TASKS["lambada"].load(tmp_path, None)
    (tmp_path / "lambada_test.jsonl").write_text('{"text": "two words"}\n' * 3)
    with pytest.raises(UserError, match="holds 3 examples, expected 5,153"):
        evals.TASKS["lambada"].load(tmp_path, None)


def test_lambada_download_failure_names_the_offline_options(tmp_path, monkeypatch):
    monkeypatch.delenv("LAMBADA_DIR", raising=False)
    monkeypatch.setenv("EVALS_CACHE_DIR", str(tmp_path))

    def urlopen(url, timeout=None):
        raise urllib.error.URLError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(UserError, match=r"openaipublic.*lambada_test.jsonl[\s\S]*LAMBADA_DIR=FOLDER[\s\S]*--data_file"):
        evals.TASKS["lambada"].load(None, None)
    assert list(tmp_path.iterdir()) == []


# ---- StoryCloze ---------------------------------------------------------------------------------
STORIES = [
    (
        "Tom was hungry.",
        "He opened the fridge.",
        "It was empty.",
        "He sighed.",
        "He ordered a pizza.",
        "He flew to the moon on a bright green bicycle.",
        1,
    ),
    (
        "Ann had a test.",
        "She studied all night.",
        "She was tired.",
        "She took the test.",
        "She failed it completely and then won a horse.",
        "She passed.",
        2,
    ),
    (
        "The dog barked.",
        "It saw a cat.",
        "The cat ran.",
        "The dog chased it.",
        "The dog caught nothing.",
        "The cat sang an opera about the ocean.",
        1,
    ),
    (
        "It rained all day.",
        "Sam stayed in.",
        "He read a book.",
        "It was good.",
        "He loved it.",
        "The book was made of very small elephants.",
        1,
    ),
]


def write_storycloze(path, stories, header=evals.STORYCLOZE_COLUMNS):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("InputStoryid",) + tuple(header))
        for i, story in enumerate(stories):
            writer.writerow((f"story-{i}",) + tuple(story))
    return path


def test_storycloze_picks_lowest_mean_loss_like_one_row_at_a_time(tmp_path, gpt2_tokenizer):
    enc = gpt2_tokenizer
    model = tiny_model()
    examples = evals.TASKS["storycloze"].load(write_storycloze(tmp_path / "cloze.csv", STORIES), None)
    assert examples[0] == {
        "ctx": "Tom was hungry. He opened the fridge. It was empty. He sighed.",
        "endings": ["He ordered a pizza.", "He flew to the moon on a bright green bicycle."],
        "label": 0,
    }
    by_mean, by_sum = [], []
    for *sentences, ending1, ending2, right in STORIES:
        context = enc.encode(" ".join(sentences))
        scores = row_scores_one_at_a_time(
            lambda idx: model(idx)[0], [(context, enc.encode(" " + ending1)), (context, enc.encode(" " + ending2))]
        )
        means = [loss / n for loss, n, _ in scores]
        by_mean.append(means.index(min(means)) == right - 1)
        sums = [loss for loss, _, _ in scores]
        by_sum.append(sums.index(min(sums)) == right - 1)
    assert by_mean != by_sum  # the two rules disagree here, so the test tells which one is used
    results = score(model, examples, evals.TASKS["storycloze"], batch_size=3)
    assert results == {"acc": sum(by_mean) / 4, "count": 4}


def test_storycloze_has_no_download_and_says_to_pass_the_csv(tmp_path, monkeypatch):
    monkeypatch.delenv("STORYCLOZE_FILE", raising=False)
    with pytest.raises(UserError, match=r"cannot be downloaded[\s\S]*--data_file FILE or STORYCLOZE_FILE"):
        evals.TASKS["storycloze"].load(None, None)
    with pytest.raises(UserError, match="is not a file; pass the CSV itself"):
        evals.TASKS["storycloze"].load(tmp_path, None)
    monkeypatch.setenv("STORYCLOZE_FILE", str(write_storycloze(tmp_path / "cloze.csv", STORIES)))
    assert [e["label"] for e in evals.TASKS["storycloze"].load(None, 3)] == [0, 1, 0]


def test_storycloze_bad_csv_is_named(tmp_path):
    bad_answer = STORIES[:1] + [STORIES[1][:-1] + (3,)]
    with pytest.raises(UserError, match="line 3: AnswerRightEnding must be 1 or 2"):
        evals.TASKS["storycloze"].load(write_storycloze(tmp_path / "a.csv", bad_answer), None)
    no_answer_column = evals.STORYCLOZE_COLUMNS[:-1]
    with pytest.raises(UserError, match="no column AnswerRightEnding"):
        path = write_storycloze(tmp_path / "b.csv", [s[:-1] for s in STORIES], no_answer_column)
        evals.TASKS["storycloze"].load(path, None)
    with pytest.raises(UserError, match="line 2: a column is empty or missing"):
        path = write_storycloze(tmp_path / "c.csv", [STORIES[0][:4] + ("",) + STORIES[0][5:]])
        evals.TASKS["storycloze"].load(path, None)


# ---- registry and command line ------------------------------------------------------------------
def test_every_task_logs_a_figure_it_reports(passages, hellaswag_dir, tmp_path):
    model = tiny_model()
    examples = {
        "hellaswag": evals.TASKS["hellaswag"].load(hellaswag_dir, 3),
        "lambada": passages[:2],
        "storycloze": evals.TASKS["storycloze"].load(write_storycloze(tmp_path / "cloze.csv", STORIES), None),
    }
    keys = {
        "hellaswag": ["acc", "acc_norm", "count"],
        "lambada": ["acc", "ppl", "count"],
        "storycloze": ["acc", "count"],
    }
    for name, task in evals.TASKS.items():
        results = score(model, examples[name], task)
        assert list(results) == keys[name] and results["count"] == len(examples[name])
        assert log_line(task, 7, results) == f"7 {task.log_key} {results[task.log_metric]:.4f}"


def test_log_line_uses_the_reference_format():
    hellaswag, lambada, storycloze = (evals.TASKS[name] for name in ("hellaswag", "lambada", "storycloze"))
    assert log_line(hellaswag, 19072, {"acc": 0.2859, "acc_norm": 0.29552, "count": 10042}) == "19072 hella 0.2955"
    assert log_line(lambada, 500, {"acc": 0.4271, "ppl": 20.0, "count": 5153}) == "500 lambada 0.4271"
    assert log_line(storycloze, 500, {"acc": 0.633, "count": 1871}) == "500 storycloze 0.6330"


def test_cli_runs_lambada_and_storycloze(lambada_dir, passages, tmp_path, monkeypatch, capsys):
    model = tiny_model()
    save_checkpoint(tmp_path / "tiny.pt", model_checkpoint(model))
    common = ["--checkpoint", str(tmp_path / "tiny.pt"), "--device", "cpu", "--batch_size", "2"]
    monkeypatch.setattr(sys, "argv", ["evals.py", "lambada", "--limit", "6", "--data_file", str(lambada_dir)] + common)
    evals.main()
    expected = score(model, passages, evals.TASKS["lambada"], batch_size=2)  # same batches, same rounding
    assert capsys.readouterr().out.strip() == f"lambada acc {expected['acc']:.4f} ppl {expected['ppl']:.4f} count 6"
    csv_path = write_storycloze(tmp_path / "cloze.csv", STORIES)
    monkeypatch.setattr(sys, "argv", ["evals.py", "storycloze", "--data_file", str(csv_path)] + common)
    evals.main()
    expected = score(model, evals.TASKS["storycloze"].load(csv_path, None), evals.TASKS["storycloze"], batch_size=2)
    assert capsys.readouterr().out.strip() == f"storycloze acc {expected['acc']:.4f} count 4"


def test_cli_batch_size_default_is_the_device_s_as_in_hellaswag(lambada_dir, tmp_path, monkeypatch, capsys):
    save_checkpoint(tmp_path / "tiny.pt", model_checkpoint(tiny_model()))
    widths = forward_widths(monkeypatch)
    evals.main(["lambada", "--checkpoint", str(tmp_path / "tiny.pt"), "--limit", "3", "--data_file", str(lambada_dir)])
    assert widths == [1, 1, 1] and capsys.readouterr().out.endswith("count 3\n")  # one passage per forward on a CPU
