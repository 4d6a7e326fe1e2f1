"""
The serving engine: many clients' replies generated together, one forward pass per step for all of
them (continuous batching). serve.py's HTTP layer (openai_api.py) hands it requests; nothing here
knows about HTTP or text, only token ids.

    engine = Engine(model, stop_ids={tokenizer.eot}, precision=precision, max_batch=8).start()
    request = engine.submit(prompt_ids, Sampling(max_tokens=64, seed=7), emit)   # emit(event), from the engine's thread
    request.cancel()                                                             # a client went away: its row is freed
    engine.close()

One thread, the scheduler, owns the model. At every step it takes the requests that arrived since
the last one from a bounded queue (a full queue refuses a request at once: the client is told to
come back), runs their prompts through the model together (prefill), and joins them to the rows
being generated; then one decode step feeds every row's last token through the model at once. A
row leaves as soon as it ends (a stop token, its max_tokens) or its client cancels it, so a new
request never waits for a whole batch to finish, only for the step under way.

Rows of different lengths share one KV cache per layer, right-aligned: each row's positions are the
last ones, padding before them that no query attends to (generate.py's left padding, kept as rows
come and go). Each row samples with its own torch.Generator, so a seeded reply does not depend on
which other requests shared its steps (up to float rounding, as a batch's matmuls may add in another
order). docs/chat.md has the picture.
"""

import queue
import threading
import traceback
from dataclasses import dataclass

import torch

from generate import KVCache, left_pad, new_cache, next_logits, next_token


@dataclass
class Sampling:
    """How one request's reply is sampled: generate.next_token's settings and the reply's length."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0


class Request:
    """One reply being generated. emit(event) is called from the engine's thread with ("token", id)
    for each token of the reply, then ("end", "stop" | "length") or ("error", message), once."""

    def __init__(self, prompt, sampling, emit, device):
        self.prompt, self.sampling, self.emit = list(prompt), sampling, emit
        self.generator = torch.Generator(device=device).manual_seed(sampling.seed)
        self.sampled = 0  # tokens sampled so far, the one that ended the reply included
        self.finished = False
        self.cancelled = False  # set by the client's side; the engine drops the row before its next step

    def cancel(self):
        self.cancelled = True

    @property
    def active(self):
        return not (self.finished or self.cancelled)


class QueueFull(Exception):
    """The engine already has max_queue requests waiting: the client should try again later."""


class Batch:
    """Rows generated together. caches: one KVCache per layer whose k and v are (B, nh, P + capacity, hs),
    holding a prefix-tuned model's P positions (else P = 0), then `length` positions, each row's own at
    the right end; real (B, length) True at a row's own positions (False: padding); last (B,) the token
    each row sampled last, not yet in the cache."""

    def __init__(self, requests, caches, real, last):
        self.requests, self.caches, self.real, self.last = requests, caches, real, last


def regroup(parts, block_size):
    """One Batch of the chosen rows of several: parts is [(batch, row indices)], and the cache gets as few
    columns as the rows need. Every row's positions stay right-aligned, so trimming the columns that
    are padding in every row kept leaves length = the longest row's. Its capacity is what the rows can
    still reach, length + the most tokens any of them may still add (at most block_size: a request's
    prompt and max_tokens fit in it), so no step outgrows it before the next regroup."""
    parts = [(batch, rows) for batch, rows in parts if rows]
    if not parts:
        return None
    requests = [batch.requests[i] for batch, rows in parts for i in rows]
    lengths = [batch.real[rows].sum(dim=1) for batch, rows in parts]  # (rows,) each: positions per row
    length = int(max(n.max() for n in lengths))
    capacity = min(block_size, length + max(r.sampling.max_tokens - r.sampled for r in requests))
    first = parts[0][0].caches
    # a prefix-tuned model's caches start with its P learned positions (prefix.py), the same in every row
    P = 0 if first[0].prefix is None else len(first[0].prefix)
    caches = []
    for layer in range(len(first)):
        B, (_, nh, _, hs) = len(requests), first[layer].k.shape
        cache = KVCache(capacity, first[layer].prefix)
        # zeros, not empty: padding is masked out of attention, but 0 x NaN from stale memory would still be NaN
        cache.k = first[layer].k.new_zeros(B, nh, P + capacity, hs)
        cache.v = first[layer].v.new_zeros(B, nh, P + capacity, hs)
        cache.k[:, :, :P] = first[layer].k[:1, :, :P]
        cache.v[:, :, :P] = first[layer].v[:1, :, :P]
        cache.length = length
        caches.append(cache)
    real = torch.zeros(len(requests), length, dtype=torch.bool, device=first[0].k.device)
    start = 0
    for batch, rows in parts:
        index = torch.tensor(rows, device=real.device)
        n, old = len(rows), batch.caches[0].length
        keep = min(old, length)  # the last `keep` columns hold every position of these rows
        new, kept = slice(P + length - keep, P + length), slice(P + old - keep, P + old)
        for cache, old_cache in zip(caches, batch.caches):
            cache.k[start : start + n, :, new] = old_cache.k[index, :, kept]
            cache.v[start : start + n, :, new] = old_cache.v[index, :, kept]
        real[start : start + n, length - keep :] = batch.real[index, old - keep :]
        start += n
    last = torch.cat([batch.last[torch.tensor(rows, device=real.device)] for batch, rows in parts])
    return Batch(requests, caches, real, last)


class Engine:
    """The scheduler thread and its queue. max_batch: rows generated together at most (1: one request
    at a time); max_queue: requests waiting at most, beyond which submit raises QueueFull."""

    def __init__(self, model, stop_ids, precision, max_batch=8, max_queue=64):
        self.model, self.stop_ids, self.precision = model, set(stop_ids), precision
        self.block_size = model.config.block_size
        self.device = model.transformer.wte.weight.device
        self.max_batch = max_batch
        self.waiting = queue.Queue(maxsize=max_queue)
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self.steps = self.rows_stepped = 0  # decode steps, and rows in them: rows_stepped / steps rows per step

    def start(self):
        self.thread.start()
        return self

    def close(self):
        self.closing.set()
        self.thread.join()

    def submit(self, prompt, sampling, emit):
        """Queue a request and return it (its cancel() frees its row); QueueFull if the queue is full.
        The prompt and max_tokens must fit in the model's context (the HTTP layer says so to the client)."""
        if not prompt or len(prompt) + sampling.max_tokens > self.block_size:
            raise ValueError(f"a prompt of {len(prompt)} tokens and {sampling.max_tokens} more do not fit")
        request = Request(prompt, sampling, emit, self.device)
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull from None
        return request

    def run(self):
        batch = None
        # autocast is per thread: it must be entered in the one that runs the model
        with torch.no_grad(), self.precision.autocast():
            while not self.closing.is_set():
                joining = self.take(batch)
                try:
                    batch = self.admit(batch, joining)
                    if batch is not None:
                        self.step(batch)
                except Exception as e:  # a bug: its traceback in the server's log, one line to each client
                    traceback.print_exc()
                    rows = joining + (batch.requests if batch is not None else [])
                    for request in rows:
                        if request.active:
                            request.finished = True
                            request.emit(("error", f"the reply failed: {type(e).__name__}: {e}"))
                    batch = None

    def take(self, batch):
        """The requests to join the batch at this step: those queued, up to the free rows. With no rows
        being generated, wait for one (checking now and then whether the engine is closing)."""
        free = self.max_batch - (0 if batch is None else sum(r.active for r in batch.requests))
        taken = []
        while batch is None and not taken and not self.closing.is_set():
            try:
                taken.append(self.waiting.get(timeout=0.1))
            except queue.Empty:
                pass
        while len(taken) < free:
            try:
                taken.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        return [request for request in taken if not request.cancelled]

    def admit(self, batch, joining):
        """The batch for the next step: its rows still active, then the joining requests' rows after
        their prefill, which samples their first token."""
        parts = []
        if batch is not None:
            rows = [i for i, request in enumerate(batch.requests) if request.active]
            if len(rows) == len(batch.requests) and not joining:
                return batch  # nothing came or went: the cache stays as it is
            parts.append((batch, rows))
        if joining:
            new = self.prefill(joining)
            parts.append((new, [i for i, request in enumerate(new.requests) if request.active]))
        return regroup(parts, self.block_size)

    def prefill(self, requests):
        """The prompts of requests through the model together, left-padded; their first token sampled."""
        idx, real = left_pad([r.prompt for r in requests], self.block_size, self.device)  # (B, T) each
        caches = new_cache(self.model, idx.size(1))
        logits = next_logits(self.model, idx, real, caches)  # (B, vocab_size)
        return Batch(requests, caches, real, self.sample(requests, logits))

    def step(self, batch):
        """One decode step: each row's last token goes through the model, attending to its cached
        positions, and each row samples its next token."""
        batch.real = torch.cat((batch.real, torch.ones_like(batch.real[:, :1])), dim=1)  # (B, length + 1)
        logits = next_logits(self.model, batch.last[:, None], batch.real, batch.caches)  # (B, vocab_size)
        batch.last = self.sample(batch.requests, logits)
        self.steps, self.rows_stepped = self.steps + 1, self.rows_stepped + len(batch.requests)

    def sample(self, requests, logits):
        """(B,) the next token of each row, sampled with its own settings and generator (one row at a
        time: the draws of a row must not depend on the others'); each is handed to its request."""
        tokens = []
        for request, row_logits in zip(requests, logits):
            s = request.sampling
            token = next_token(row_logits[None], s.temperature, s.top_k, s.top_p, request.generator).item()
            tokens.append(token)
            self.deliver(request, token)
        return torch.tensor(tokens, device=logits.device)

    def deliver(self, request, token):
        if not request.active:  # cancelled meanwhile: its row leaves at the next step
            return
        request.sampled += 1
        if token in self.stop_ids:
            request.finished = True
            request.emit(("end", "stop"))
            return
        request.emit(("token", token))
        if request.sampled == request.sampling.max_tokens:
            request.finished = True
            request.emit(("end", "length"))
