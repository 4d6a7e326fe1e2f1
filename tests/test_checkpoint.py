"""Tests for checkpoint.py (atomic writes, safe loading, prefixes, RNG state, finding and pruning, LoRA bases)
and export.py (Hugging Face folders, with the chat template of a chat fine-tuned model)."""

import itertools
import json
import os
import random
import re
from collections.abc import Mapping

import numpy as np
import pytest
import torch

import checkpoint as ck
import export
import resume
import sample
from chat_template import chat_template, render_conversation, render_prompt
from errors import UserError
from generate import generate, generate_stream
from lora import LoRALinear, apply_lora
from model import GPT, GPTConfig
from tokenizer import get_tokenizer

TINY = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=8)


def test_save_is_atomic_and_a_failed_save_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = str(tmp_path / "model_00001.pt")
    ck.save_checkpoint(path, {"step": 1})
    assert os.listdir(tmp_path) == ["model_00001.pt"]

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="could not write .*model_00001.pt: no space left"):
        ck.save_checkpoint(path, {"step": 2})
    assert os.listdir(tmp_path) == ["model_00001.pt"]
    assert ck.load_checkpoint(path) == {"step": 1}


class RunsCode:
    def __reduce__(self):
        return (os.makedirs, ("/tmp/checkpoint_test_code_ran",))


def test_load_refuses_a_checkpoint_that_would_run_code(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"model": RunsCode()}, path)
    with pytest.raises(UserError) as error:
        ck.load_checkpoint(path)
    assert not os.path.exists("/tmp/checkpoint_test_code_ran")
    assert str(error.value) == (
        f"cannot read checkpoint {path}: it holds Python objects other than tensors, numbers and containers, "
        "which are never loaded here"
    )


def test_a_damaged_file_is_called_damaged_not_a_file_of_python_objects(tmp_path):
    path = tmp_path / "model_00010.pt"
    path.write_bytes(b"not a checkpoint")  # torch reads it as a pickle: 'n' (110) is no pickle opcode
    with pytest.raises(UserError) as error:
        ck.load_checkpoint(str(path))
    assert str(error.value) == (
        f"cannot read checkpoint {path}: not a file written by torch.save, or a damaged one "
        "(UnpicklingError: Unsupported operand 110)"
    )


def test_load_maps_tensors_to_the_cpu_and_allows_only_weights(tmp_path, monkeypatch):
    """Without map_location a checkpoint written on cuda:3 fails to load on a machine with fewer GPUs,
    and loads into GPU memory on the one that has them (a second copy beside the model)."""
    path = str(tmp_path / "model_00001.pt")
    ck.save_checkpoint(path, {"w": torch.ones(2)})
    seen = {}
    torch_load = torch.load

    def recording_load(*args, **kwargs):
        seen.update(kwargs)
        return torch_load(*args, **kwargs)

    monkeypatch.setattr(ck.torch, "load", recording_load)
    assert torch.equal(ck.load_checkpoint(path)["w"], torch.ones(2))
    assert seen == {"map_location": "cpu", "weights_only": True, "mmap": False}


def test_load_of_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="model_00005.pt does not exist"):
        ck.load_checkpoint(str(tmp_path / "model_00005.pt"))


def test_clean_state_dict_strips_compile_and_ddp_prefixes():
    cleaned = ck.clean_state_dict({"_orig_mod.a.weight": 1, "module._orig_mod.b.bias": 2, "c": 3})
    assert cleaned == {"a.weight": 1, "b.bias": 2, "c": 3}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised while torch.compile imports its parts
def test_checkpoint_of_a_compiled_model_round_trips_without_prefixes(tmp_path):
    torch.manual_seed(0)
    model = GPT(TINY)
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    saved = ck.model_checkpoint(compiled)
    assert set(saved["model"]) == set(model.state_dict())  # no `_orig_mod.`
    path = str(tmp_path / "model.pt")
    ck.save_checkpoint(path, saved)
    loaded = ck.model_from_checkpoint(path, "cpu")
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_rng_state_survives_a_weights_only_round_trip_and_restores_every_generator(tmp_path):
    state = resume.rng_state("cpu")
    path = str(tmp_path / "rng.pt")
    ck.save_checkpoint(path, {"rng": [state]})

    def draws():
        return random.random(), np.random.rand(), torch.rand(1).item()

    expected = draws()
    draws()
    resume.set_rng_state(ck.load_checkpoint(path)["rng"][0], "cpu")
    assert draws() == expected


def test_checkpoints_are_found_by_step_temp_files_ignored_and_resume_none_or_path_checked(tmp_path):
    log_dir = str(tmp_path)
    assert resume.pick_checkpoint("auto", log_dir) == (None, [], None)  # a fresh start
    for name in ["model_00900.pt", "model_01000.pt", "model_05000.pt.tmp", "model_final.pt"]:
        (tmp_path / name).write_bytes(b"")
    expected = {900: str(tmp_path / "model_00900.pt"), 1000: str(tmp_path / "model_01000.pt")}
    assert resume.list_checkpoints(log_dir) == expected
    assert resume.explicit_resume(str(tmp_path / "model_00900.pt"), log_dir) == str(tmp_path / "model_00900.pt")
    with pytest.raises(UserError, match="--resume none, but .* already holds checkpoints"):
        resume.explicit_resume("none", log_dir)
    with pytest.raises(UserError, match="--resume nope.pt: no such checkpoint file"):
        resume.explicit_resume("nope.pt", log_dir)


def test_prune_keeps_the_newest_checkpoints(tmp_path):
    for step in [5, 10, 15, 20]:
        (tmp_path / f"model_{step:05d}.pt").write_bytes(b"")
    resume.prune_checkpoints(str(tmp_path), keep_last=0)
    assert len(os.listdir(tmp_path)) == 4
    resume.prune_checkpoints(str(tmp_path), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["model_00015.pt", "model_00020.pt"]


def test_a_checkpoint_of_another_model_shape_names_the_differing_flags():
    saved = ck.model_checkpoint(GPT(TINY))
    resume.check_model_config(saved, TINY, "x.pt")  # same shape: fine
    wider = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)
    with pytest.raises(UserError, match=r"x.pt holds a model with n_embd=8 \(flags say 16\)"):
        resume.check_model_config(saved, wider, "x.pt")


def test_export_writes_a_hugging_face_model_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    path = str(tmp_path / "model_00010.pt")
    ck.save_checkpoint(path, ck.model_checkpoint(model))
    export.main([path, "--hf_dir", str(tmp_path / "hf")])
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, model(idx)[0], rtol=0, atol=1e-5)


def test_export_writes_gpt2_tokenizer_files_so_a_pipeline_generates_offline(tmp_path, gpt2_tokenizer):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=8)).eval()
    path = str(tmp_path / "model_00010.pt")
    ck.save_checkpoint(path, ck.model_checkpoint(model))
    export.main([path, "--hf_dir", str(tmp_path / "hf")])
    pipeline = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    out = pipeline("Hello, I'm a language model,", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    prompt = gpt2_tokenizer.encode("Hello, I'm a language model,")
    expected = generate(model, torch.tensor([prompt]), 5, temperature=0)[0].tolist()  # our greedy decoding
    assert out == gpt2_tokenizer.decode(expected)


CONVERSATIONS = [
    [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": " Two  spaces,\ta tab\nand a blank line\n\n🙂 café"},
        {"role": "assistant", "content": "Noted. "},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": "<|end of a line|> is not a token"}],
]


@pytest.fixture(scope="module")
def chat_export(tmp_path_factory):
    """(Hugging Face folder, our tokenizer, our model): a tiny chat fine-tuned checkpoint, exported."""
    pytest.importorskip("transformers")
    tokenizer = get_tokenizer("gpt2-chat")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=8)).eval()
    folder = tmp_path_factory.mktemp("chat")
    path = str(folder / "model_00100.pt")  # as finetune.py writes it: the chat format under "template"
    ck.save_checkpoint(path, {**ck.model_checkpoint(model, tokenizer), "template": chat_template(tokenizer)})
    export.main([path, "--hf_dir", str(folder / "hf")])
    return str(folder / "hf"), tokenizer, model


def chat_ids(hf_tokenizer, messages, **kwargs):
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return ids["input_ids"] if isinstance(ids, Mapping) else ids  # a BatchEncoding from transformers 5


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_exported_chat_template_renders_the_ids_of_render_prompt_and_render_conversation(chat_export, messages):
    """transformers' own AutoTokenizer on the exported folder, against chat_template.py's renderings."""
    import transformers

    hf_dir, tokenizer, _ = chat_export
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert chat_ids(hf_tokenizer, messages, add_generation_prompt=True) == render_prompt(messages, tokenizer)
    assert chat_ids(hf_tokenizer, messages) == render_conversation(messages, tokenizer)[0]


def test_exported_chat_template_refuses_what_it_would_render_otherwise(chat_export):
    """Hugging Face's tokenizer reads "<|end|>" in a message as the token, encode() as text: refused."""
    import transformers

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(chat_export[0])
    for content, message in [
        ("say <|end|> now", "a message holds the text of the special token <|end|>"),
        ("<|endoftext|>", "a message holds the text of the special token <|endoftext|>"),
    ]:
        with pytest.raises(Exception, match=re.escape(message)):
            chat_ids(hf_tokenizer, [{"role": "user", "content": content}])
    with pytest.raises(Exception, match="a role is system, user or assistant, not tool"):
        chat_ids(hf_tokenizer, [{"role": "tool", "content": "42"}])


def test_exported_chat_model_answers_messages_in_a_pipeline_as_our_generation_does(chat_export):
    """pipeline("text-generation") given messages: our prompt, our greedy tokens, up to <|end|>."""
    import transformers

    hf_dir, tokenizer, model = chat_export
    messages = CONVERSATIONS[1][:4]
    pipeline = transformers.pipeline("text-generation", model=hf_dir, device="cpu")
    reply = pipeline(messages, max_new_tokens=6, do_sample=False)[0]["generated_text"][-1]
    end = tokenizer.special("<|end|>")
    steps = generate_stream(model, [render_prompt(messages, tokenizer)], 6, temperature=0, eot=end)
    ids = list(itertools.takewhile(lambda token: token not in (end, tokenizer.eot), (t.item() for t in steps)))
    assert reply == {"role": "assistant", "content": tokenizer.decode(ids)}
    assert transformers.GenerationConfig.from_pretrained(hf_dir).eos_token_id == [end, tokenizer.eot]


def test_a_checkpoint_that_was_not_chat_fine_tuned_exports_no_chat_template(tmp_path):
    path = str(tmp_path / "model_00010.pt")
    ck.save_checkpoint(path, ck.model_checkpoint(GPT(TINY), get_tokenizer("gpt2")))
    export.main([path, "--hf_dir", str(tmp_path / "hf")])
    with open(tmp_path / "hf" / "tokenizer_config.json") as f:
        assert "chat_template" not in json.load(f)


def lora_checkpoint(tmp_path):
    """(adapters' checkpoint, base file): a LoRA checkpoint as finetune.py writes it, its base named
    by absolute path (finetune.py's --init) with its fingerprint."""
    torch.manual_seed(0)
    base_path = str(tmp_path / "base.pt")
    ck.save_checkpoint(base_path, ck.model_checkpoint(GPT(TINY)))
    base = ck.load_init(base_path)
    extra = {"init": {"path": base_path, "fingerprint": ck.fingerprint(base)}}
    extra["lora"] = {"rank": 2, "alpha": 4.0, "targets": ["attn", "mlp"]}
    path = str(tmp_path / "model_00010.pt")
    ck.save_checkpoint(path, {**ck.model_checkpoint(apply_lora(base, 2, 4.0, ["attn", "mlp"])), **extra})
    return path, base_path


def test_lora_adapters_whose_base_is_gone_say_so_to_someone_who_never_passed_init(tmp_path):
    path, base_path = lora_checkpoint(tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in ck.model_from_checkpoint(path).modules())  # merged
    os.remove(base_path)
    message = (
        f"{path} holds LoRA adapters for the base weights in {base_path}, which is no longer there: restore it, "
        "or fine-tune again from a base that exists"
    )
    with pytest.raises(UserError) as error:
        ck.model_from_checkpoint(path)
    assert str(error.value) == message
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--checkpoint", path])
    assert exit_info.value.code == f"error: {message}"


def test_lora_adapters_whose_base_cannot_be_read_name_it_as_their_base(tmp_path):
    path, base_path = lora_checkpoint(tmp_path)
    with open(base_path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--checkpoint", path])
    assert str(exit_info.value).startswith(
        f"error: {path} holds LoRA adapters for the base weights in {base_path}, which cannot be loaded: "
        f"cannot read checkpoint {base_path}: not a file written by torch.save"
    )
