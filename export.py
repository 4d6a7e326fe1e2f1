"""
Export a training checkpoint as a Hugging Face GPT2LMHeadModel folder, with GPT-2's tokenizer files,
for the EleutherAI evaluation harness, transformers' pipelines, or `python hellaswag.py --model FOLDER`:

    python export.py log/model_19073.pt --hf_dir gpt2-fineweb

A chat fine-tuned checkpoint (finetune.py on conversations) also gets its chat template, so that
`tokenizer.apply_chat_template(messages)` and `pipeline("text-generation")` given messages render the
ids training saw, and generation stops at the end of the assistant's turn (<|end|>). A LoRA checkpoint
is exported merged (on a quantized base, --base_quant: merged into the dequantized weights it trained
on); a prefix-tuned one is refused: GPT-2's format has no place for its prefixes.
"""

import argparse
import os

from chat_template import JINJA_TEMPLATE, chat_template, chat_tokens
from checkpoint import checkpoint_tokenizer, load_checkpoint, model_from_checkpoint
from errors import UserError, exit_on_error
from files import describe_os_error
from hf import save_hf_tokenizer, save_pretrained, save_stop_ids


def exported_chat_template(path, tokenizer):
    """The Jinja chat template of a chat fine-tuned checkpoint (finetune.py records its format under
    "template"), for Hugging Face's apply_chat_template; None for any other checkpoint."""
    template = load_checkpoint(path, mmap=True).get("template")
    if not template:
        return None
    if template != chat_template(tokenizer):
        raise UserError(
            f"{path} was fine-tuned with the chat format {template}, not this tokenizer's {chat_template(tokenizer)}: "
            f"export it with the tokenizer it was fine-tuned with (--tokenizer)"
        )
    return JINJA_TEMPLATE


@exit_on_error
def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a training checkpoint in Hugging Face GPT-2 format.")
    parser.add_argument("checkpoint", help="a checkpoint written by train_gpt2.py, e.g. log/model_19073.pt")
    parser.add_argument("--hf_dir", required=True, help="folder to write the GPT2LMHeadModel into")
    parser.add_argument("--tokenizer", default="auto", help="auto (the one the checkpoint records), gpt2, or a folder")
    args = parser.parse_args(argv)
    if load_checkpoint(args.checkpoint, mmap=True).get("prefix"):
        raise UserError(
            f"{args.checkpoint} is prefix-tuned (finetune.py --peft prefix): its learned keys and values in every "
            f"layer have no place in a plain GPT-2, so it cannot be exported; sample.py, chat.py and the "
            f"evaluations run it, or fine-tune with --lora_rank R (LoRA merges into the weights) to export"
        )
    model = model_from_checkpoint(args.checkpoint)
    tokenizer = checkpoint_tokenizer(args.checkpoint, args.tokenizer)
    chat = exported_chat_template(args.checkpoint, tokenizer)
    if os.path.exists(args.hf_dir) and not os.path.isdir(args.hf_dir):
        raise UserError(f"--hf_dir {args.hf_dir} is a file: pass a folder (new, or one to overwrite)")
    try:
        save_pretrained(model, args.hf_dir)
    except OSError as e:  # a read-only or full disk
        raise UserError(f"could not write {args.hf_dir}: {describe_os_error(e)}") from e
    if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):  # transformers logs some failures and returns
        raise UserError(f"writing {args.hf_dir} failed: it holds no config.json afterwards")
    save_hf_tokenizer(tokenizer, args.hf_dir, chat)
    if chat:
        save_stop_ids(args.hf_dir, [chat_tokens(tokenizer)[1], tokenizer.eot])  # a reply ends at <|end|>
    print(f"wrote {args.hf_dir}: load it with transformers.GPT2LMHeadModel.from_pretrained({args.hf_dir!r})")


if __name__ == "__main__":
    main()
