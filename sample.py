"""
Sample text from a GPT-2, a training checkpoint or OpenAI's weights, streamed as it is generated.

    python sample.py --checkpoint log/model_19073.pt --prompt "Hello, I'm a language model," --num_samples 4
    python sample.py --model gpt2 --prompt_file prompt.txt --temperature 0.8 --top_p 0.95 --seed 7
    python sample.py --model path/to/hf_folder --temperature 0 --stop $'\\n\\n'  # greedy (1 sample), up to a blank line

Each sample is printed token by token, one sample after the other; --no_stream generates them all as
one batch (faster on a GPU) and prints them at the end. Greedy decoding (--temperature 0) gives the
same text every time, so it prints one sample unless --num_samples asks for more. A sample ends at
<|endoftext|>, at a --stop string, or after --max_new_tokens. The sampling itself (KV cache,
temperature, top-k, top-p) is model.py's GPT.generate_stream, the function the training samples use too.
"""

import argparse
import codecs
import sys

import torch

from checkpoint import add_model_args, load_model
from device import add_device_args, pick_device, setup_precision
from errors import UserError, exit_on_error
from generate import check_sampling_args, generate_stream
from reply_settings import add_sampling_args

SAMPLE_PROMPT = "Hello, I'm a language model,"  # build-nanogpt's prompt, also train_gpt2.py's


class TextStream:
    """Token ids in, text to print out, one token at a time.

    A GPT-2 token is a string of bytes, and one character can be split over two tokens (the 4 bytes of
    an emoji often are): decoding each token alone would print U+FFFD for each half. An incremental
    UTF-8 decoder holds incomplete bytes back until their character is whole. Text that may be the
    beginning of a stop string is held back too, until it is clear whether the stop string follows."""

    def __init__(self, tokenizer, stop=()):
        self.token_bytes = tokenizer.encoding.decode_single_token_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = [s for s in stop if s]
        self.text = ""  # everything decoded so far
        self.shown = 0  # characters of self.text already handed out
        self.stopped = False  # a stop string appeared: the sample ends just before it

    def push(self, token):
        """Add one token; return the text that can be shown now (often all of it, sometimes "")."""
        self.text += self.decoder.decode(self.token_bytes(token))
        return self.release(final=False)

    def finish(self):
        """Generation has ended: the text still held back."""
        self.text += self.decoder.decode(b"", final=True)
        return self.release(final=True)

    def release(self, final):
        stops = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if stops:
            self.stopped = True
            end = min(stops)
        else:
            end = len(self.text) if final else len(self.text) - held_back(self.text, self.stop)
        out, self.shown = self.text[self.shown : end], max(self.shown, end)
        return out


def held_back(text, stops):
    """Length of the longest end of text that is the beginning of a stop string."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=SAMPLE_PROMPT, help=f"the text to continue (default: {SAMPLE_PROMPT!r})")
    prompt.add_argument("--prompt_file", help="read the prompt from this file, newlines and all")
    parser.add_argument(
        "--num_samples",
        type=int,
        help="completions of the prompt (default: 4; 1 with --temperature 0, as greedy ones are all the same)",
    )
    parser.add_argument("--max_new_tokens", type=int, default=200, help="tokens per completion, at most")
    add_sampling_args(parser, 1.0, None, 1337, "the same seed and settings give the same text")
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        help="end a completion where this text appears (repeatable); <|endoftext|> always ends it",
    )
    add_device_args(parser)
    parser.add_argument(
        "--no_stream",
        action="store_true",
        help="generate all samples as one batch, then print them (other random draws than streaming)",
    )
    return parser.parse_args(argv)


def load_sampling_model(args, device):
    """(model, tokenizer) to sample with, in eval mode."""
    try:
        model, tokenizer = load_model(args, device)
    except UserError as e:  # a missing or unreadable file; the cause can run over many lines
        raise UserError(str(e).strip().splitlines()[0]) from None
    if model.config.vocab_size != tokenizer.vocab_size:
        raise UserError(
            f"the model has vocab_size={model.config.vocab_size}, the {tokenizer.name} tokenizer "
            f"{tokenizer.vocab_size}: they do not belong together"
        )
    return model.eval(), tokenizer


def read_prompt(args):
    if args.prompt_file is None:
        return args.prompt
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompt_file {args.prompt_file}: cannot read it ({e.__class__.__name__}: {e})")


def text_chunks(tokens, tokenizer, stop):
    """The text of generated tokens, piece by piece as they come, up to a special token (<|endoftext|>,
    or a chat model's <|end|>) or a stop string."""
    stream = TextStream(tokenizer, stop)
    specials = set(tokenizer.special_tokens.values())
    for token in tokens:
        if token in specials:
            break
        yield stream.push(token)
        if stream.stopped:
            break  # when tokens is a live generation, no more are asked for: it ends there
    yield stream.finish()


@exit_on_error
def main(argv=None):
    args = parse_args(argv)
    if args.num_samples is None:
        args.num_samples = 1 if args.temperature == 0 else 4
    elif args.num_samples > 1 and args.temperature == 0:
        print(f"note: --temperature 0 is greedy: the {args.num_samples} samples will be identical", file=sys.stderr)
    if args.num_samples < 1:
        raise UserError(f"--num_samples {args.num_samples}: ask for at least 1")
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    device = pick_device(args.device, local_rank=0)
    precision = setup_precision(args.dtype, device.split(":")[0])
    model, tokenizer = load_sampling_model(args, device)
    text = read_prompt(args)
    prompt = tokenizer.encode(text)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    settings = dict(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator, eot=tokenizer.eot
    )
    with precision.autocast():
        if args.no_stream:
            steps = generate_stream(model, [prompt] * args.num_samples, args.max_new_tokens, **settings)
            rows = torch.stack(list(steps), dim=1).tolist()  # (num_samples, steps)
            for i, row in enumerate(rows):
                completion = "".join(text_chunks(row, tokenizer, args.stop))
                print(f"--- sample {i + 1}/{args.num_samples}\n{text}{completion}")
            return
        for i in range(args.num_samples):
            # created before anything is printed: it checks the prompt (empty, longer than block_size)
            steps = generate_stream(model, [prompt], args.max_new_tokens, **settings)
            print(f"--- sample {i + 1}/{args.num_samples}\n{text}", end="", flush=True)
            for chunk in text_chunks((next_id.item() for next_id in steps), tokenizer, args.stop):
                print(chunk, end="", flush=True)
            print()


if __name__ == "__main__":
    main()
