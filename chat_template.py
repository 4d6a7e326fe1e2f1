"""
The chat template: how a conversation becomes token ids, and which of those ids the model learns to say.
finetune.py trains on render_conversation and chat.py prompts with render_prompt, so training and
inference can never disagree on the template. It needs only a tokenizer (no torch, no training code).
JINJA_TEMPLATE is the same format for Hugging Face's tokenizer.apply_chat_template (export.py).
"""

from errors import UserError

# Four special tokens mark the turns (tokenizer.CHAT_TOKENS; with GPT-2's BPE they take ids 50,257-50,260,
# rows the padded embedding already has). One conversation, rendered:
#
#     <|endoftext|><|system|>Be brief.<|end|><|user|>Capital of France?<|end|><|assistant|>Paris.<|end|>
#     targets:  -1 .....................................................................   Paris.<|end|>
#
# The loss is on what the assistant says and on its <|end|> (that is how the model learns to stop),
# never on the system or user text, nor on the tokens that open a turn. Every assistant turn of a
# multi-turn conversation is trained on.

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


def fit_conversation(messages, tokenizer, block_size, max_new_tokens):
    """(messages, dropped): the conversation (ending with the user's turn) without its `dropped` oldest
    turns, as few as it takes for its prompt and a reply of max_new_tokens to fit in a context of
    block_size tokens. The system message stays; turns go in pairs (a user's message and its reply),
    so the user still speaks first. UserError if not even the newest message fits."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    room = block_size - max_new_tokens - len(render_prompt(system, tokenizer))
    # Each message is encoded on its own, between its opener and <|end|>, so a prompt's length is the
    # sum of its messages'. Count from the newest back, each message encoded once, and stop at the
    # first that does not fit: a long conversation costs what the context holds, not what was sent.
    empty = len(render_prompt([], tokenizer))  # <|endoftext|> ... <|assistant|>
    dropped, used = len(turns), 0  # turns[dropped:] fit, in `used` tokens
    for i in range(len(turns) - 1, -1, -1):
        used += len(render_prompt([turns[i]], tokenizer)) - empty
        if used > room:
            break
        if turns[i]["role"] == "user":  # what is kept starts with a user's message
            dropped = i
    if dropped == len(turns):  # not even the newest message fits
        need = len(render_prompt(system + turns[-1:], tokenizer)) + max_new_tokens
        raise UserError(
            f"the message is too long: it and {'the system message and ' if system else ''}room for a reply "
            f"of {max_new_tokens} tokens need {need} tokens, the model's context holds {block_size}: "
            "shorten it (or ask for a shorter reply)"
        )
    return system + turns[dropped:], dropped


def chat_template(tokenizer):
    """What a checkpoint records of the chat format (finetune.py stores it): resuming with another one
    is refused."""
    openers, end = chat_tokens(tokenizer)
    return {"name": "chat-v1", "openers": openers, "end": end}


# The same format as a Jinja template, the form Hugging Face tokenizers read from tokenizer_config.json
# ("chat_template"; export.py writes it for chat fine-tuned checkpoints). Given the same messages,
# tokenizer.apply_chat_template renders the ids of render_conversation, and with add_generation_prompt
# those of render_prompt (tests/test_checkpoint.py checks both). Only the text is rendered here, and
# Hugging Face's tokenizer reads the special tokens' text as those tokens, where encode() reads a
# message's text as plain text: so a message holding a special token's text is refused, rather than
# rendered as other ids than training saw.
JINJA_TEMPLATE = """<|endoftext|>
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('a role is system, user or assistant, not ' + message['role']) }}
    {%- endif %}
    {%- for special in ['<|endoftext|>', '<|system|>', '<|user|>', '<|assistant|>', '<|end|>'] %}
        {%- if special in message['content'] %}
            {{- raise_exception('a message holds the text of the special token ' + special) }}
        {%- endif %}
    {%- endfor %}
    {{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>' }}
{%- endif %}"""
