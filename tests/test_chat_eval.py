"""chat_eval.py: GSM8K's answers and their check on the dataset's own solutions, pass@k and standard
errors against their formulas, replies scored through the command line, multiple choice against the
model's own logits, batching, sharding over 2 processes, and the one-line errors."""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

import chat_eval
import checkpoint as ck
import toy_tasks
from errors import UserError
from model import GPT, GPTConfig
from tokenizer import get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARC_EASY_TEST_ROWS = 2376


def tiny_chat_model(seed=0, vocab_size=50261):
    """A 2-layer GPT over gpt2-chat's ids, its matrices N(0, 0.3) so that its greedy replies and
    letter choices differ from prompt to prompt; block_size 256 holds every GSM8K test question."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=256)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    return model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    path = str(tmp_path_factory.mktemp("chat_eval") / "tiny.pt")
    ck.save_checkpoint(path, ck.model_checkpoint(tiny_chat_model(), tokenizer))
    return path


def arc_row(i):
    """A synthetic ARC row of the hub's schema: 3 to 5 choices, letter labels or (every other row,
    as some ARC rows have) digit labels, the right one moving around."""
    n = 3 + i % 3
    labels = list("ABCDE"[:n]) if i % 2 == 0 else [str(j + 1) for j in range(n)]
    texts = [f"{i * 7 + j} apples" for j in range(n)]
    question = f"Which pile holds {i * 7 + i % n} apples?"
    return {
        "id": f"q{i}",
        "question": question,
        "choices": {"text": texts, "label": labels},
        "answerKey": labels[i % n],
    }


@pytest.fixture(scope="module")
def arc_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arc")
    with open(folder / "arc_easy_test.jsonl", "w") as f:
        f.writelines(json.dumps(arc_row(i)) + "\n" for i in range(ARC_EASY_TEST_ROWS))
    return folder


def last_line(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


# ---- GSM8K: the answer, its check, the annotations ---------------------------------------------
@pytest.mark.parametrize("split, rows", [("test", 1319), ("train", 7473)])
def test_every_reference_solution_scores_right_against_itself(gsm8k_dir, split, rows):
    examples = chat_eval.load_examples("gsm8k", gsm8k_dir, split=split)
    assert len(examples) == rows
    right = 0
    for example in examples:
        solution = example["answer"]
        # the oracle: OpenAI's solutions end with the line "#### N"
        final_line = solution.splitlines()[-1]
        assert final_line.startswith("#### ")
        assert chat_eval.gsm8k_number(solution) == final_line.removeprefix("#### ").replace(",", "")
        without_annotations = chat_eval.gsm8k_answer_text(solution)
        assert "<<" not in without_annotations and ">>" not in without_annotations
        assert without_annotations.splitlines()[-1] == final_line
        right += chat_eval.gsm8k_correct(solution, solution) and chat_eval.gsm8k_correct(without_annotations, solution)
    assert right == rows


def test_calculator_annotations_are_stripped_and_the_final_line_kept():
    answer_text = chat_eval.gsm8k_answer_text
    assert answer_text("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == (
        "Natalia sold 48/2 = 24 clips in May.\n#### 72"
    )
    assert answer_text("She makes 9 * 2 = $<<9*2=18>>18 a day, 3+4=<<3+4=7>>7 eggs.\n#### 18") == (
        "She makes 9 * 2 = $18 a day, 3+4=7 eggs.\n#### 18"
    )
    assert answer_text("No calculator here.\n#### 5") == "No calculator here.\n#### 5"


def test_the_number_after_the_hashes_decides():
    reference = "80,000+50,000=$<<80000+50000=130000>>130,000\n#### 70000"
    assert chat_eval.gsm8k_correct("so he made #### 70,000 dollars", reference)  # commas removed
    assert chat_eval.gsm8k_correct("#### 70000\n#### 5", reference)  # the first one counts
    assert not chat_eval.gsm8k_correct("#### 5\n#### 70000", reference)
    assert not chat_eval.gsm8k_correct("the answer is 70000", reference)  # no #### at all
    assert not chat_eval.gsm8k_correct("#### 70000.0", reference)  # compared as text, like OpenAI's check
    assert chat_eval.gsm8k_number("#### -3.5") == "-3.5"


# ---- figures against their formulas ------------------------------------------------------------
def test_pass_at_k_and_standard_errors_match_their_formulas():
    # problems x 4 samples, 1 = a right reply
    table = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]]
    totals = chat_eval.gsm8k_totals([sum(row) for row in table], num_samples=4)
    results = chat_eval.gsm8k_results(totals, num_samples=4, sampled=True)
    fractions = [sum(row) / 4 for row in table]  # 0.5, 0, 1, 0.25, 0
    assert results["pass@1"] == pytest.approx(0.35)
    assert results["stderr"] == pytest.approx(statistics.pstdev(fractions) / math.sqrt(5))
    assert results["stderr"] == pytest.approx(math.sqrt(0.14 / 5))  # variance of the fractions: 0.7 / 5
    assert results["pass@4"] == pytest.approx(3 / 5)
    assert results["pass@4_stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 5))
    assert results["count"] == 5

    greedy = chat_eval.gsm8k_results(chat_eval.gsm8k_totals([1, 0, 1, 1], 1), 1, sampled=False)
    assert greedy == {"greedy_acc": 0.75, "stderr": pytest.approx(math.sqrt(0.75 * 0.25 / 4)), "count": 4}
    # one sample per problem: pass@1's standard error is the binomial one
    one = chat_eval.gsm8k_results(chat_eval.gsm8k_totals([1, 0, 1, 1], 1), 1, sampled=True)
    assert one == {"pass@1": 0.75, "stderr": pytest.approx(greedy["stderr"]), "count": 4}


def test_chance_corrected_accuracy_is_averaged_per_example():
    # right with 4 choices (1), wrong with 3 (-1/2), right with 5 (1), wrong with 2 (-1)
    totals = chat_eval.choice_totals([1, 0, 4, 1], [1, 2, 4, 0], [4, 3, 5, 2])
    results = chat_eval.choice_results(totals)
    assert results["acc"] == 0.5
    assert results["acc_corrected"] == pytest.approx((1 - 0.5 + 1 - 1) / 4)
    assert results["stderr"] == pytest.approx(math.sqrt(0.25 / 4))
    assert chat_eval.mean_results({"arc_easy": results, "gsm8k": {"greedy_acc": 0.25, "stderr": 0.1, "count": 9}}) == {
        "acc": pytest.approx(0.375),
        "acc_corrected": pytest.approx((0.125 + 0.25) / 2),
        "tasks": 2,
    }


# ---- GSM8K through the command line, the model's replies scripted -------------------------------
def scripted_stream(tokenizer, replies):
    """Stands in for generate.generate_stream: each prompt's next reply from replies[question] (an
    iterator of token-id lists), then <|end|>; calls records what was asked for."""
    end = tokenizer.special("<|end|>")
    calls = []

    def stream(model, prompts, max_new_tokens, temperature, generator=None, eot=None):
        calls.append({"rows": len(prompts), "temperature": temperature, "eot": eot})
        questions = [tokenizer.decode(prompt).split("<|user|>")[1].split("<|end|>")[0] for prompt in prompts]
        rows = [next(replies[question]) + [end] for question in questions]
        for t in range(min(max(map(len, rows)), max_new_tokens)):
            yield torch.tensor([row[t] if t < len(row) else end for row in rows])

    return stream, calls


def test_replies_with_the_right_number_after_the_hashes_score_right(
    gsm8k_dir, tiny_checkpoint, tokenizer, monkeypatch, capsys
):
    examples = chat_eval.load_examples("gsm8k", gsm8k_dir, limit=12)
    replies, right = {}, 0
    for i, example in enumerate(examples):
        solution, number = chat_eval.gsm8k_answer_text(example["answer"]), chat_eval.gsm8k_number(example["answer"])
        if i % 4 == 0:  # the reference solution
            reply, right = tokenizer.encode(solution), right + 1
        elif i % 4 == 1:  # its reasoning with another final number
            reply = tokenizer.encode(solution.rsplit("####", 1)[0] + f"#### {int(number) + 1}")
        elif i % 4 == 2:  # the right number, without the hashes
            reply = tokenizer.encode(f"The answer is {number}.")
        else:  # the right number, after a special token: not part of the reply
            reply = tokenizer.encode("I think") + [tokenizer.eot] + tokenizer.encode(f"#### {number}")
        replies[example["question"]] = iter([reply])
    stream, calls = scripted_stream(tokenizer, replies)
    monkeypatch.setattr(chat_eval, "generate_stream", stream)
    flags = ["--checkpoint", tiny_checkpoint, "--task", "gsm8k", "--data_file", str(gsm8k_dir), "--limit", "12"]
    chat_eval.main([*flags, "--batch_size", "5", "--device", "cpu"])
    assert right == 3
    assert last_line(capsys) == f"gsm8k greedy_acc 0.2500 stderr {math.sqrt(0.25 * 0.75 / 12):.4f} count 12"
    assert [call["rows"] for call in calls] == [5, 5, 2]
    assert {call["temperature"] for call in calls} == {0.0}
    assert {call["eot"] for call in calls} == {tokenizer.special("<|end|>")}


def test_sampled_replies_give_pass_at_1_and_pass_at_k(gsm8k_dir, tiny_checkpoint, tokenizer, monkeypatch, capsys):
    table = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]]  # as in the formula test
    examples = chat_eval.load_examples("gsm8k", gsm8k_dir, limit=5)
    replies = {}
    for example, row in zip(examples, table):
        number = int(chat_eval.gsm8k_number(example["answer"]))
        replies[example["question"]] = iter([tokenizer.encode(f"#### {number + 1 - right}") for right in row])
    stream, calls = scripted_stream(tokenizer, replies)
    monkeypatch.setattr(chat_eval, "generate_stream", stream)
    flags = ["--checkpoint", tiny_checkpoint, "--task", "gsm8k", "--data_file", str(gsm8k_dir), "--limit", "5"]
    chat_eval.main([*flags, "--num_samples", "4", "--temperature", "1.0", "--device", "cpu"])
    assert last_line(capsys) == "gsm8k pass@1 0.3500 stderr 0.1673 pass@4 0.6000 pass@4_stderr 0.2191 count 5"
    assert sum(call["rows"] for call in calls) == 20 and {call["temperature"] for call in calls} == {1.0}


@pytest.mark.parametrize(
    "match, right", [("exact", [True, False, False, True]), ("contains", [True, True, False, True])]
)
def test_your_own_rows_are_checked_exactly_or_by_containing_the_answer(
    tiny_checkpoint, tokenizer, tmp_path, monkeypatch, capsys, match, right
):
    rows = toy_tasks.addition_files()["prompts.jsonl"][:4]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    texts = [rows[0]["answer"], f"It is {rows[1]['answer']}.", "no idea", f"  {rows[3]['answer']}\n"]
    replies = {row["messages"][0]["content"]: iter([tokenizer.encode(text)]) for row, text in zip(rows, texts)}
    stream, _ = scripted_stream(tokenizer, replies)
    monkeypatch.setattr(chat_eval, "generate_stream", stream)
    flags = ["--checkpoint", tiny_checkpoint, "--task", "rows", "--data_file", str(tmp_path / "rows.jsonl")]
    chat_eval.main([*flags, "--match", match, "--device", "cpu"])
    acc = sum(right) / 4
    assert last_line(capsys) == f"rows greedy_acc {acc:.4f} stderr {math.sqrt(acc * (1 - acc) / 4):.4f} count 4"


def test_rows_without_an_answer_or_a_user_prompt_are_named(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match='rows.jsonl, line 1: each row needs "messages"'):
        chat_eval.load_examples("rows", str(tmp_path / "rows.jsonl"))
    with pytest.raises(UserError, match="--task rows reads your rows from a file: pass --data_file ROWS.jsonl"):
        chat_eval.load_examples("rows", None)


# ---- generation and multiple choice on a real (tiny, random) model -----------------------------
def greedy_reply_one_at_a_time(model, prompt, max_new_tokens, specials):
    """The oracle: forward over the whole sequence at each step, no cache, no padding, no batch."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0][0, -1, : model.config.vocab_size]
        ids.append(logits.argmax().item())
        if ids[-1] in specials:
            return ids[len(prompt) : -1]
    return ids[len(prompt) :]


def test_batched_replies_equal_one_problem_at_a_time(gsm8k_dir, tokenizer):
    model = tiny_chat_model(seed=1)
    examples = chat_eval.load_examples("gsm8k", gsm8k_dir, limit=6)
    prompts = [chat_eval.gsm8k_prompt(example, tokenizer, chat=True) for example in examples]
    settings = chat_eval.EvalSettings(max_new_tokens=10, batch_size=4)  # batches of 4 and 2, lengths differ
    batched = chat_eval.generate_replies(model, tokenizer, prompts, settings, "cpu")
    specials = set(tokenizer.special_tokens.values())
    alone = [tokenizer.decode(greedy_reply_one_at_a_time(model, p, 10, specials)) for p in prompts]
    assert batched == alone
    assert len(set(batched)) == 6 and all(batched)


def test_a_question_longer_than_the_context_keeps_its_end(gsm8k_dir, tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50261, n_layer=1, n_head=2, n_embd=32, block_size=16)).eval()
    examples = chat_eval.load_examples("gsm8k", gsm8k_dir, limit=3)
    prompts = [chat_eval.gsm8k_prompt(example, tokenizer, chat=True) for example in examples]
    assert min(map(len, prompts)) > 16
    settings = chat_eval.EvalSettings(max_new_tokens=1, batch_size=3)
    with torch.no_grad():
        first = [model(torch.tensor([p[-16:]]))[0][0, -1, :50261].argmax().item() for p in prompts]
    specials = set(tokenizer.special_tokens.values())
    expected = ["" if token in specials else tokenizer.decode([token]) for token in first]
    assert chat_eval.generate_replies(model, tokenizer, prompts, settings, "cpu") == expected


def test_multiple_choice_picks_the_letter_the_model_finds_most_likely(arc_dir, tokenizer):
    model = tiny_chat_model(seed=3)
    examples = chat_eval.load_examples("arc_easy", arc_dir, limit=12)
    assert examples[1] == {
        "question": "Which pile holds 8 apples?",
        "choices": ["7 apples", "8 apples", "9 apples", "10 apples"],
        "answer": 1,  # answerKey "2" of labels "1".."4"
    }
    user, assistant, end = (tokenizer.special(t) for t in ("<|user|>", "<|assistant|>", "<|end|>"))
    letters = [tokenizer.encode(letter)[0] for letter in "ABCDE"]
    expected, corrected = [], []
    for example in examples:
        lines = [f"{letter}. {text}" for letter, text in zip("ABCDE", example["choices"])]
        text = "\n".join([example["question"], *lines, "Answer with the letter."])
        ids = [tokenizer.eot, user, *tokenizer.encode(text), end, assistant]
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0][0, -1]
        n = len(example["choices"])
        expected.append(logits[letters[:n]].argmax().item())
        corrected.append(((expected[-1] == example["answer"]) - 1 / n) / (1 - 1 / n))
    settings = chat_eval.EvalSettings(batch_size=5)
    assert chat_eval.choice_predictions(model, tokenizer, examples, settings, "cpu") == expected
    assert len(set(expected)) > 1
    results = chat_eval.evaluate("arc_easy", model, tokenizer, examples, settings=settings)
    acc = sum(p == e["answer"] for p, e in zip(expected, examples)) / 12
    assert results == {
        "acc": pytest.approx(acc),
        "stderr": pytest.approx(math.sqrt(acc * (1 - acc) / 12)),
        "acc_corrected": pytest.approx(sum(corrected) / 12),
        "count": 12,
    }


def test_mmlu_rows_become_the_same_kind_of_example(tmp_path):
    row = {"question": "2 + 2 =", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"], "answer": 1}
    with open(tmp_path / "mmlu_test.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for _ in range(14042))
    examples = chat_eval.load_examples("mmlu", tmp_path, limit=2)
    assert examples == [{"question": "2 + 2 =", "choices": ["3", "4", "5", "22"], "answer": 1}] * 2


def test_a_base_model_gets_a_plain_prompt_and_a_note(gsm8k_dir, tmp_path, capsys):
    gpt2 = get_tokenizer("gpt2")
    example = chat_eval.load_examples("gsm8k", gsm8k_dir, limit=1)[0]
    assert gpt2.decode(chat_eval.gsm8k_prompt(example, gpt2, chat=False)) == (
        f"<|endoftext|>Question: {example['question']}\nAnswer:"
    )
    assert chat_eval.letter_ids(gpt2, chat=False)[:2] == gpt2.encode(" A") + gpt2.encode(" B")
    path = str(tmp_path / "base.pt")
    ck.save_checkpoint(path, ck.model_checkpoint(tiny_chat_model(vocab_size=50257), gpt2))
    flags = ["--task", "gsm8k", "--data_file", str(gsm8k_dir), "--limit", "2", "--max_new_tokens", "3"]
    chat_eval.main(["--checkpoint", path, *flags, "--device", "cpu"])
    out = capsys.readouterr().out
    assert "note: the gpt2 tokenizer has no chat tokens" in out
    assert out.strip().splitlines()[-1] == "gsm8k greedy_acc 0.0000 stderr 0.0000 count 2"


# ---- two processes -----------------------------------------------------------------------------
def test_two_torchrun_processes_give_the_figures_of_one(gsm8k_dir, arc_dir, tiny_checkpoint, monkeypatch, capsys):
    """5 problems per task: rank 0 takes 3, rank 1 takes 2; the all-reduced totals are those of one process."""
    flags = ["--checkpoint", tiny_checkpoint, "--task", "gsm8k,arc_easy", "--limit", "5", "--max_new_tokens", "6"]
    monkeypatch.setenv("GSM8K_DIR", str(gsm8k_dir))
    monkeypatch.setenv("ARC_DIR", str(arc_dir))
    chat_eval.main([*flags, "--device", "cpu"])
    one = capsys.readouterr().out.strip().splitlines()[-3:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*torchrun, os.path.join(REPO, "chat_eval.py"), *flags, "--device", "cpu", "--batch_size", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    two = result.stdout.strip().splitlines()
    assert two == one  # rank 0 alone prints
    assert one[0].endswith("count 5") and one[1].endswith("count 5") and one[2].startswith("mean acc")


# ---- one-line errors ---------------------------------------------------------------------------
def fail(argv):
    with pytest.raises(SystemExit) as e:
        chat_eval.main(argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_bad_flags_and_missing_data_are_one_line_errors(tiny_checkpoint, gsm8k_dir, tmp_path, monkeypatch):
    model = ["--checkpoint", tiny_checkpoint, "--device", "cpu"]
    assert (
        "--task hellaswag: choose one or more (comma-separated) of gsm8k, rows, arc_easy, arc_challenge, mmlu"
        in fail([*model, "--task", "hellaswag"])
    )
    missing = fail([*model, "--task", "gsm8k", "--data_file", str(tmp_path)])
    assert f"--data_file={tmp_path}: no {tmp_path / 'test.jsonl'}" in missing
    several = fail([*model, "--task", "gsm8k,mmlu", "--data_file", str(gsm8k_dir / "test.jsonl")])
    assert "with several tasks, pass a folder" in several
    assert "identical replies" in fail([*model, "--task", "gsm8k", "--num_samples", "4"])

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("GSM8K_DIR", raising=False)
    message = fail([*model, "--task", "gsm8k"])
    assert "could not load openai/gsm8k (main, test) from the Hugging Face hub" in message
    assert "Set GSM8K_DIR=FOLDER, a folder holding test.jsonl, or pass --data_file" in message


def test_damaged_gsm8k_files_are_named_with_their_line(gsm8k_dir, tmp_path):
    lines = (gsm8k_dir / "test.jsonl").read_text().splitlines()
    (tmp_path / "short.jsonl").write_text("\n".join(lines[:100]) + "\n")
    with pytest.raises(chat_eval.UserError, match="holds 100 examples, expected 1,319"):
        chat_eval.load_examples("gsm8k", tmp_path / "short.jsonl")
    bad = json.dumps({"question": "How many?", "answer": "Three."})
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], bad, *lines[2:]]) + "\n")
    with pytest.raises(chat_eval.UserError, match=r"bad.jsonl, line 2: the answer has no `#### N`"):
        chat_eval.load_examples("gsm8k", tmp_path / "bad.jsonl")
