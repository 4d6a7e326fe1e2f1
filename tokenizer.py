"""
Tokenizers: text <-> token ids, behind one small interface that every script uses.

    from tokenizer import get_tokenizer
    tok = get_tokenizer("gpt2")           # OpenAI's GPT-2 BPE, through tiktoken
    ids = tok.encode("Hello world")       # [15496, 995]
    tok.decode(ids), tok.eot, tok.vocab_size

GPT-2's BPE has 50,000 merges on top of the 256 single bytes, plus one special token,
<|endoftext|> (id 50256), which fineweb.py puts before every document. tiktoken downloads its two
files on first use; offline, set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached copies.
"""

import numpy as np
import tiktoken

from errors import UserError

GPT2 = "gpt2"


class Tokenizer:
    """A tiktoken Encoding with the few things the rest of the repo asks of a tokenizer."""

    def __init__(self, encoding, name):
        self.encoding = encoding
        self.name = name  # "gpt2", or the folder a trained tokenizer was loaded from
        self.eot = encoding.eot_token  # <|endoftext|>: separates documents
        self.vocab_size = encoding.n_vocab  # ids are 0 .. vocab_size - 1
        self.special_tokens = {text: encoding.encode_single_token(text) for text in encoding.special_tokens_set}

    def encode(self, text):
        """Token ids of text, list of int. Special-token text ("<|endoftext|>") inside ordinary text
        is encoded as plain text: data can never inject a document separator."""
        return self.encoding.encode_ordinary(text)

    def encode_to_numpy(self, text):
        """encode(text) as a (T,) uint32 array. encode_to_numpy skips building a Python list of ints,
        the part of encoding that holds the GIL, so threads encode in parallel (fineweb.py)."""
        try:
            return self.encoding.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # a lone surrogate (a JSON "\ud800"): replace it, as encode_ordinary does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self.encoding.encode_to_numpy(text, disallowed_special=())

    def decode(self, ids):
        """Text of token ids; bytes that do not form valid UTF-8 (a cut multi-byte character) become U+FFFD."""
        return self.encoding.decode(list(ids))

    def token_bytes(self):
        """(vocab_size,) int64: the UTF-8 bytes each token stands for, 0 for special tokens. The
        denominator of bits per byte, which compares models with different tokenizers."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        specials = set(self.special_tokens.values())
        for token in range(self.vocab_size):
            if token not in specials:
                lengths[token] = len(self.encoding.decode_single_token_bytes(token))
        return lengths


def get_tokenizer(name=GPT2):
    """The tokenizer called `name`: "gpt2" (tiktoken's GPT-2 BPE)."""
    if name != GPT2:
        raise UserError(f"unknown tokenizer {name!r}: only {GPT2!r} is available")
    if not hasattr(tiktoken.Encoding, "encode_to_numpy"):
        raise UserError(f"this repo needs tiktoken >= 0.9 (this is {tiktoken.__version__}): pip install -U tiktoken")
    try:
        encoding = tiktoken.get_encoding(GPT2)
    except Exception as e:  # the BPE files are downloaded on first use
        raise UserError(
            f"could not load the {GPT2} tokenizer ({e}): tiktoken downloads it on first use. "
            f"Offline, set TIKTOKEN_CACHE_DIR to a folder holding its cached BPE files"
        )
    return Tokenizer(encoding, GPT2)
