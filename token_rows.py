"""
Trainable token rows: with a frozen base (LoRA, prefix tuning, a quantized base), still train the
embedding rows of a few tokens, the chat template's (<|system|>, <|user|>, <|assistant|>, <|end|>).
PEFT calls this trainable_token_indices.

Why: GPT-2 never saw the chat tokens. Their rows of its embedding (ids 50,257-50,260, padding rows of
the table) were never an input in pretraining, and as outputs they were only ever pushed down, since
no text contained them. Full fine-tuning trains them with the rest. LoRA and prefix tuning freeze the
embedding, so the model could never learn to read <|assistant|> as "reply now" or to say <|end|>: on
the demo model, none of their 192 replies ended its turn; with these rows trained, all 192 did, with
LoRA and with prefix tuning alike (docs/benchmarks.md).

What trains is a change to k rows, (k, C), zero at the start, so step 0 is the base exactly. The token
embedding is also the output layer (tied), so the same change moves both what the token means as an
input and how likely it is as an output: a lookup of x's ids and the k logits x @ change^T. An untied
head (the modern recipe) gets a change of its own. The (V, C) table is never copied, and its gradient
is never formed: only the k rows'.

    apply_token_rows(model, ids)      # model.token_rows: what GPT.embed and GPT.head add
    merge_token_rows(model)           # back into the table: a plain GPT again
"""

import torch
import torch.nn as nn

from tokenizer import CHAT_TOKENS


def chat_token_ids(tokenizer):
    """The ids of the chat template's special tokens (tokenizer.CHAT_TOKENS): the turn openers, <|end|>."""
    return [tokenizer.special(token) for token in CHAT_TOKENS]


class TokenRows(nn.Module):
    """The change to the rows `ids` of the token embedding (and of an untied output layer), (k, C)."""

    def __init__(self, ids, n_embd, untied_head, device=None):
        super().__init__()
        # not saved with the weights: a checkpoint's record holds the ids (finetune.load_base)
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=device), persistent=False)  # (k,)
        self.embedding = nn.Parameter(torch.zeros(len(ids), n_embd, device=device))  # (k, C)
        self.head = nn.Parameter(torch.zeros(len(ids), n_embd, device=device)) if untied_head else None

    def embedding_change(self, idx):
        """(B, T, C): the change of the embedding of each id of idx (B, T), zero for all but the k ids."""
        match = idx[..., None] == self.ids  # (B, T, k): at most one True per position
        # a lookup (not a one-hot matmul, which autocast would round to bf16): the matching row, or 0
        return self.embedding[match.int().argmax(-1)] * match.any(-1, keepdim=True)  # (B, T, C)

    def add_to_logits(self, logits, x):
        """logits (B, T, V) of the frozen output layer for x (B, T, C), with the k ids' columns given
        their change: += x @ change^T. In place: the output layer's backward does not need its output."""
        change = self.embedding if self.head is None else self.head
        return logits.index_add_(-1, self.ids, (x @ change.t()).to(logits.dtype))


def apply_token_rows(model, ids):
    """Give model (its base frozen) a TokenRows for ids: the only parameters it adds, and they train."""
    config = model.config
    model.token_rows = TokenRows(ids, config.n_embd, config.untied_head, model.lm_head.weight.device)
    return model


@torch.no_grad()
def merge_token_rows(model):
    """Add the trained change into the embedding (and an untied head) rows, in place, and drop it."""
    rows = model.token_rows
    if rows is None:
        return model
    model.transformer.wte.weight.index_add_(0, rows.ids, rows.embedding.to(model.transformer.wte.weight.dtype))
    if rows.head is not None:
        model.lm_head.weight.index_add_(0, rows.ids, rows.head.to(model.lm_head.weight.dtype))
    model.token_rows = None
    return model
