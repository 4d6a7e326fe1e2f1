"""
Talk to a chat model fine-tuned with finetune.py, in the terminal (serve.py: in a browser, or any OpenAI client).

    python chat.py --checkpoint log/sft/model_00500.pt                       # a conversation in the terminal
    python chat.py --checkpoint log/sft/model_00500.pt --system "Be brief." --temperature 0.8 --top_p 0.95
    python chat.py --checkpoint log/sft/model_00500.pt --prompt "Capital of France?"   # one reply, then exit
    python chat.py --checkpoint log/sft/model_00500.pt --bench 5             # time to first token, turn by turn

In the terminal, each reply streams as it is generated; /reset starts a new conversation, /quit (or
Ctrl-D) leaves, Ctrl-C stops the reply being written and the conversation goes on. A reply ends at
<|end|> (or any other special token, which is never printed), or after --max_new_tokens, marked
" [cut at --max_new_tokens N]" (on stderr with --prompt, so that stdout is the reply alone). When the
conversation no longer fits in the model's context with room for a reply, its oldest turns are dropped
(the system message stays) and chat.py says so.

The prompt is chat_template.py's render_prompt, the template the model was fine-tuned with, and the KV
cache is kept from one turn to the next. In a browser, or from any OpenAI client, to many users at
once: `python serve.py --checkpoint ...` (the chat page, and the OpenAI API). How it works: docs/chat.md.
"""

import argparse
import sys
import time

import torch

from chat_template import fit_conversation, render_prompt
from checkpoint import add_model_args
from config import bounded
from device import add_device_args, pick_device, setup_precision
from errors import UserError, exit_on_error
from generate import generate_stream, new_cache
from reply_settings import add_reply_args, check_flags, reply_length
from sample import load_sampling_model, text_chunks


class Chat:
    """A chat model's replies, each streamed as text. It keeps the KV cache of the tokens it last read
    (a prompt and its reply) for the next prompt, which usually starts with them."""

    def __init__(self, model, tokenizer, reuse_cache=True):
        self.model, self.tokenizer = model, tokenizer
        self.block_size = model.config.block_size
        self.stops = set(tokenizer.special_tokens.values())  # <|end|>, <|endoftext|>, <|user|>, ...: a reply ends
        self.reuse_cache = reuse_cache
        self.forget()

    def forget(self):
        self.cache, self.cached_ids = None, []  # one KVCache per layer; the ids of the positions it holds
        self.reused = 0  # positions of the last prompt that came from the cache
        self.finish_reason = None  # how the last reply ended: "stop" (a special token), "length" (max_new_tokens)

    def fit(self, messages, max_new_tokens):
        """(messages, dropped): chat_template.fit_conversation in this model's context."""
        return fit_conversation(messages, self.tokenizer, self.block_size, max_new_tokens)

    def reply(self, messages, max_new_tokens, **sampling):
        """The assistant's reply to messages (a conversation that ends with the user's turn and fits,
        see fit), as text chunks, each yielded as soon as its token is sampled (a chunk can be "": a
        character split over two tokens waits for the second). sampling: generate_stream's arguments.
        Once it has ended, finish_reason says how (None if it was stopped)."""
        prompt = render_prompt(messages, self.tokenizer)
        sampled = []  # every token, the one that ended the reply too: the cache may hold all but the last
        self.finish_reason = None

        def tokens():
            for next_id in generate_stream(
                self.model, [prompt], max_new_tokens, kv_cache=self.cache_for(prompt), **sampling
            ):
                sampled.append(next_id.item())
                if sampled[-1] in self.stops:
                    self.finish_reason = "stop"
                    return
                yield sampled[-1]
            self.finish_reason = "length"  # fit left room for max_new_tokens: the stream ends only there

        try:
            yield from text_chunks(tokens(), self.tokenizer, stop=())
        except GeneratorExit:  # closed between two tokens (the reader stopped): the cache is whole
            raise
        except BaseException:  # Ctrl-C can land inside a step, some layers' keys written and not others
            self.forget()
            raise
        finally:
            if self.cache is not None:
                self.cached_ids = (prompt + sampled)[: self.cache[0].length]

    def cache_for(self, prompt):
        """The KV cache to generate from prompt with (None: generate_stream makes a fresh one), holding
        the longest start the prompt shares with the tokens cached. A turn's prompt repeats the
        conversation so far, so that is most of it; not all of it when the reply, re-encoded from its
        text, comes out as other tokens than were sampled (same text, another split into tokens)."""
        if not self.reuse_cache:
            return None
        if self.cache is None:
            self.cache = new_cache(self.model, self.block_size)
        shared = 0
        # the prompt's last token always goes through the model: its logits give the first token
        for cached, token in zip(self.cached_ids, prompt[:-1]):
            if cached != token:
                break
            shared += 1
        for layer in self.cache:
            layer.length = shared  # positions past `length` are overwritten by the next append
        self.reused = shared
        return self.cache


# ---- the terminal ----


def sampling_settings(args, device):
    """generate_stream's sampling arguments from the flags; the generator is seeded once, so a whole
    conversation (the same messages, the same flags) replays the same."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)


def say(chat, messages, max_new_tokens, sampling, marks=None):
    """Print the reply to messages as it streams, and return its text. Ctrl-C stops it (what was
    printed stays the reply, marked [stopped] on screen); a reply cut at max_new_tokens is marked
    too. marks: the file the marks go to (None: stdout, with the reply)."""
    chunks = chat.reply(messages, max_new_tokens, **sampling)
    printed = []
    try:
        for chunk in chunks:
            print(chunk, end="", flush=True)
            printed.append(chunk)
        if chat.finish_reason == "length":
            print(f" [cut at --max_new_tokens {max_new_tokens}]", end="", file=marks or sys.stdout, flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="", file=marks or sys.stdout)
    finally:
        chunks.close()
    print()
    return "".join(printed)


def chat_loop(chat, system, max_new_tokens, sampling):
    """The conversation in the terminal, until /quit or the end of input."""
    messages = list(system)
    while True:
        try:
            text = input("you> ")
        except EOFError:  # Ctrl-D, or the end of piped input
            print()
            return
        except KeyboardInterrupt:  # the reply had ended already: one Ctrl-C too many should not end it all
            print("\n(/quit or Ctrl-D leaves)")
            continue
        if text.strip() == "/quit":
            return
        if text.strip() == "/reset":
            messages = list(system)
            print("(a new conversation)")
            continue
        if not text.strip():
            continue
        try:
            asked, dropped = chat.fit(messages + [{"role": "user", "content": text}], max_new_tokens)
        except UserError as e:
            print(f"({e})")
            continue
        if dropped:
            print(
                f"(the conversation outgrew the model's context of {chat.block_size} tokens: "
                f"dropped its oldest {dropped} turns)"
            )
        messages = asked + [{"role": "assistant", "content": say(chat, asked, max_new_tokens, sampling)}]


# ---- time to first token, with the cache reused and without ----

BENCH_MESSAGES = [
    "Hi! Can you tell me a little about how the GPT-2 language model was trained?",
    "What is the difference between a token and a word, and why do models read tokens?",
    "How does a KV cache make generating text faster, and what does it cost in memory?",
    "Could you sum up what we have talked about so far in three sentences?",
    "Thanks. What should I read next to learn more about transformers?",
]


def bench(chat, system, turns, max_new_tokens, args, device):
    """Time to first token at each turn of a scripted conversation (the user's side is BENCH_MESSAGES,
    the replies are the model's, each up to max_new_tokens), once reusing the KV cache between turns
    and once computing every prompt afresh. Prints one line per turn and mode."""
    first_token = {}
    for reuse in (False, True):
        chat.reuse_cache = reuse
        chat.forget()
        messages, sampling = list(system), sampling_settings(args, device)
        for turn in range(turns):
            user = {"role": "user", "content": BENCH_MESSAGES[turn % len(BENCH_MESSAGES)]}
            messages, _ = chat.fit(messages + [user], max_new_tokens)
            start = time.perf_counter()
            chunks = chat.reply(messages, max_new_tokens, **sampling)
            reply = [next(chunks)]  # the text of the first token (maybe ""): it has been sampled
            first_token[reuse, turn] = time.perf_counter() - start
            reply += list(chunks)
            prompt_len, ms = len(render_prompt(messages, chat.tokenizer)), 1000 * first_token[reuse, turn]
            print(
                f"cache reused: {'yes' if reuse else 'no '}  turn {turn + 1}: prompt of {prompt_len} tokens, "
                f"{chat.reused} from the cache, first token after {ms:.1f} ms"
            )
            messages = messages + [{"role": "assistant", "content": "".join(reply)}]
    last = turns - 1
    print(
        f"turn {turns}: time to first token {1000 * first_token[False, last]:.1f} ms computing the whole prompt, "
        f"{1000 * first_token[True, last]:.1f} ms reusing the cache "
        f"({first_token[False, last] / first_token[True, last]:.1f}x)"
    )


# ---- the command line ----


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prompt", default=None, help="reply to this one message, print the reply and exit")
    mode.add_argument(
        "--bench",
        type=bounded(int, 1, None),
        metavar="TURNS",
        default=None,
        help="time to first token over a scripted conversation of TURNS turns, cache reused and not",
    )
    add_reply_args(parser, seed_default=1337, seed_help="the same seed, flags and messages: the same replies")
    add_device_args(parser)
    return parser.parse_args(argv)


@exit_on_error
def main(argv=None):
    args = parse_args(argv)
    check_flags(args)
    device = pick_device(args.device, local_rank=0)
    precision = setup_precision(args.dtype, device.split(":")[0])
    model, tokenizer = load_sampling_model(args, device)
    if "<|assistant|>" not in tokenizer.special_tokens:
        raise UserError(
            f"the {tokenizer.name} tokenizer has no chat tokens: chat.py talks to a model fine-tuned by "
            "finetune.py (GPT-2's BPE with chat tokens is --tokenizer gpt2-chat)"
        )
    args.max_new_tokens = reply_length(args, model.config.block_size)
    chat = Chat(model, tokenizer)
    system = [{"role": "system", "content": args.system}] if args.system else []
    with precision.autocast():
        if args.bench:
            return bench(chat, system, args.bench, args.max_new_tokens, args, device)
        if args.prompt is not None:
            messages, _ = chat.fit(system + [{"role": "user", "content": args.prompt}], args.max_new_tokens)
            return say(chat, messages, args.max_new_tokens, sampling_settings(args, device), marks=sys.stderr)
        print(
            f"chat.py: {args.checkpoint or args.model} ({model.num_params() / 1e6:.1f}M parameters, a context of "
            f"{chat.block_size} tokens). /reset starts over, /quit leaves, Ctrl-C stops a reply."
        )
        chat_loop(chat, system, args.max_new_tokens, sampling_settings(args, device))


if __name__ == "__main__":
    main()
