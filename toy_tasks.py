"""
A verifiable toy task for trying fine-tuning, DPO and RL on a CPU in minutes: single-digit addition
("What is 3 + 4?" -> "7"), whose fine-tuning data is systematically imperfect.

    python toy_tasks.py --out_dir data/addition
    python finetune.py --preset cpu --init BASE --data_files data/addition/sft.jsonl --log_dir log/add_sft
    python dpo.py --init log/add_sft/model_00300.pt --data_files data/addition/pairs.jsonl --log_dir log/add_dpo
    python rl.py --init log/add_sft/model_00300.pt --data_files data/addition/prompts.jsonl --log_dir log/add_rl

Each of the 100 sums a + b (a, b = 0..9) is written NUM_REPLIES times in sft.jsonl, half of them with
the right answer and half with a + b + 1: a model that imitates the data says the right number about
half the time, so fine-tuning alone cannot get there, yet the right answer is often sampled. A verifier
(the reply equals the answer) tells RL which samples to reinforce; pairs.jsonl prefers the right answer
to the wrong one for DPO. HELD_OUT sums are in none of the training files: heldout.jsonl asks them.
"""

import argparse
import json
import os
import random

from errors import exit_on_error

NUM_REPLIES = 4  # fine-tuning rows per sum: half right, half one too many
HELD_OUT = 20  # sums kept out of every training file (seeded choice)


def question(a, b):
    return f"What is {a} + {b}?"


def addition_files(seed=0):
    """{file name: rows} of the task: sft.jsonl (chat rows), pairs.jsonl (DPO pairs in TRL's
    conversational format), prompts.jsonl and heldout.jsonl (RL / evaluation rows with the answer)."""
    sums = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(sums)
    held_out, train = sums[:HELD_OUT], sums[HELD_OUT:]

    def user(a, b):
        return [{"role": "user", "content": question(a, b)}]

    def reply(text):
        return [{"role": "assistant", "content": text}]

    sft = [{"messages": user(a, b) + reply(str(a + b + i % 2))} for a, b in train for i in range(NUM_REPLIES)]
    pairs = [{"prompt": user(a, b), "chosen": reply(str(a + b)), "rejected": reply(str(a + b + 1))} for a, b in train]
    return {
        "sft.jsonl": sft,
        "pairs.jsonl": pairs,
        "prompts.jsonl": [{"messages": user(a, b), "answer": str(a + b)} for a, b in train],
        "heldout.jsonl": [{"messages": user(a, b), "answer": str(a + b)} for a, b in held_out],
    }


def write_addition(out_dir, seed=0):
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in addition_files(seed).items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{os.path.join(out_dir, name)}: {len(rows)} rows")


@exit_on_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="data/addition", help="where the four .jsonl files go")
    parser.add_argument("--seed", type=int, default=0, help="which sums are held out")
    args = parser.parse_args(argv)
    write_addition(args.out_dir, args.seed)


if __name__ == "__main__":
    main()
