"""
Replies as the model scores them: a prompt and a reply as token ids with the reply's targets, batches
of them, and the summed log-probability of each reply under a model. dpo.py and rl.py both build on it.

    ids, targets = reply_row(prompt_ids, reply_ids)              # targets: -1 except the reply's tokens
    x, y = pad_rows([(ids, targets), ...], pad_id, "cpu")        # (B, L) each, right-padded
    logps = reply_logprobs(model, x, y)                          # (B,): sum of log p(reply token | before)

A reply is scored on its own tokens and the <|end|> that closes it (what the model must learn to say,
as in fine-tuning: chat_template.py), never on the prompt or the padding.
"""

import torch
import torch.nn.functional as F

from chat_template import render_conversation, render_prompt


def reply_row(prompt_ids, reply_ids):
    """(x, y) token lists for a prompt followed by a reply: x = all ids but the last, y[t] = ids[t + 1]
    where that id belongs to the reply, else -1."""
    ids = list(prompt_ids) + list(reply_ids)
    targets = [-1] * (len(prompt_ids) - 1) + list(reply_ids)
    return ids[:-1], targets


def chat_reply_row(messages, reply, tokenizer):
    """reply_row of a conversation (ending with a user turn) and an assistant reply, rendered with the
    chat template: the reply's text and its <|end|> are the targets. The prompt's ids are exactly the
    ones render_conversation gives the whole conversation (tests/test_dpo.py checks it)."""
    prompt = render_prompt(messages, tokenizer)
    whole, _ = render_conversation([*messages, {"role": "assistant", "content": reply}], tokenizer)
    return reply_row(prompt, whole[len(prompt) :])


def pad_rows(rows, pad_id, device, length=None):
    """(x, y), each (B, L) int64 on device, from (x, y) token lists: right-padded to L = length (or the
    longest row), y -1 on the padding."""
    L = length or max(len(x) for x, _ in rows)
    x = torch.full((len(rows), L), pad_id, dtype=torch.long)
    y = torch.full((len(rows), L), -1, dtype=torch.long)
    for b, (xs, ys) in enumerate(rows):
        x[b, : len(xs)], y[b, : len(ys)] = torch.tensor(xs), torch.tensor(ys)
    return x.to(device), y.to(device)


def token_logprobs(model, x, y):
    """(B, L) float32: log p(y[b, t] | x[b, :t+1]) where y is a target, 0 where y is -1."""
    logits, _ = model(x)  # (B, L, vocab_size)
    # cross_entropy is -log softmax at the target: one fused, numerically stable op, 0 at ignore_index
    return -F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="none")


def reply_logprobs(model, x, y):
    """(B,) float32: the summed log-probability of each row's reply tokens (its targets)."""
    return token_logprobs(model, x, y).sum(dim=1)
