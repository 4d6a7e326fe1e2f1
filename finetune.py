"""
Fine-tune a GPT-2 into a chat model (supervised fine-tuning, full or LoRA), or continue its
pretraining on your own text, with train_gpt2.py's training loop.

    python finetune.py --init log/model_19073.pt --data_files chats.jsonl --log_dir log/sft
    python finetune.py --init gpt2 --data_files alpaca.json --lora_rank 8 --log_dir log/sft_lora
    python finetune.py --init log/demo/model_01500.pt --data_files input.txt --log_dir log/shakespeare
    python sample.py --checkpoint log/sft/model_00500.pt ...   # or python chat.py --checkpoint ...

--init: a train_gpt2.py checkpoint, a Hugging Face GPT-2 folder, or gpt2 / gpt2-medium / ... (OpenAI's
weights). Data (--data_files, or --dataset with a Hugging Face id), one row per example:
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}   chat
    {"instruction": "...", "input": "...", "output": "..."}                             Alpaca-style
    {"text": "..."}, or a .txt file                                                     plain text

The chat format
---------------
render_conversation below turns a conversation into token ids and the loss mask; fine-tuning and
chat.py both call it, so training and inference can never disagree on the template. Four special
tokens mark the turns (tokenizer.CHAT_TOKENS; with GPT-2's BPE they take ids 50,257-50,260, rows the
padded embedding already has). One conversation, rendered:

    <|endoftext|><|system|>Be brief.<|end|><|user|>Capital of France?<|end|><|assistant|>Paris.<|end|>
    targets:  -1 .....................................................................   Paris.<|end|>

The loss is on what the assistant says and on its <|end|> (that is how the model learns to stop),
never on the system or user text, nor on the tokens that open a turn. Every assistant turn of a
multi-turn conversation is trained on.
"""

ROLES = ("system", "user", "assistant")


def chat_tokens(tokenizer):
    """{role: id of the token that opens its turn} and the id of <|end|>, which closes every turn."""
    openers = {role: tokenizer.special(f"<|{role}|>") for role in ROLES}
    return openers, tokenizer.special("<|end|>")


def check_conversation(messages):
    """What is wrong with a conversation (a list of {"role", "content"}), or None. An optional system
    turn first, then user and assistant turns alternating, starting with the user; the assistant
    must speak at least once."""
    if not isinstance(messages, list) or not messages:
        return "`messages` must be a non-empty list of {role, content}"
    for message in messages:
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            return f"each message needs a role ({', '.join(ROLES)}) and a content string, not {str(message)[:80]}"
    roles = [message["role"] for message in messages]
    if roles[0] == "system":
        roles = roles[1:]
    if any(role != ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(roles)):
        return "the roles must alternate user, assistant, user, ... (after an optional system message)"
    if "assistant" not in roles:
        return "no assistant turn: nothing to learn from"
    return None


def render_conversation(messages, tokenizer):
    """(ids, train): the token ids of a conversation and, per id, whether it is one the model is
    trained to produce (the assistant's text and its <|end|>). A conversation that ends with a user
    turn renders as a prompt: add the opener of the assistant's turn and let the model continue."""
    openers, end = chat_tokens(tokenizer)
    ids, train = [tokenizer.eot], [False]  # a new document starts, as in pretraining
    for message in messages:
        content = tokenizer.encode(message["content"])
        is_reply = message["role"] == "assistant"
        ids += [openers[message["role"]], *content, end]
        train += [False] + [is_reply] * (len(content) + 1)
    return ids, train


def render_prompt(messages, tokenizer):
    """The ids chat.py feeds the model for its next reply: the conversation so far, then <|assistant|>."""
    ids, _ = render_conversation(messages, tokenizer)
    return ids + [chat_tokens(tokenizer)[0]["assistant"]]


def targets_of(ids, train):
    """The targets of a rendered row: y[t] = ids[t + 1] where that token is trained on, else -1
    (left out of the loss)."""
    return [token if trained else -1 for token, trained in zip(ids[1:], train[1:])]
