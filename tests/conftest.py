"""Shared test setup: offline data paths and tiny models.

The tests run offline. Data comes from environment variables (what `.ci/run` exports), falling back
to `../shared/data` beside the checkout; a test whose data is missing is skipped, naming the variable.
"""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))  # the scripts live flat at the top level

# Never reach for the Hugging Face hub from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# tiktoken reads its cache folder when the encoding is first loaded, so set it before any test does.
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED_DATA / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_DATA / "tiktoken_cache")


def data_path(variable, default):
    """The path in $variable, else ../shared/data/<default>. Skip the test if the data is simply not
    here; fail if $variable names a path that does not exist (CI must never skip silently)."""
    if variable in os.environ:
        path = Path(os.environ[variable])
        if not path.exists():
            pytest.fail(f"{variable}={path} does not exist")
        return path
    path = SHARED_DATA / default
    if not path.exists():
        pytest.skip(f"offline data not found: set {variable} (looked in {path})")
    return path


@pytest.fixture
def fineweb_sample_dir():
    return data_path("FINEWEB_DATA_FILES", "fineweb_sample")


@pytest.fixture
def hellaswag_dir():
    return data_path("HELLASWAG_DIR", "hellaswag")


@pytest.fixture
def gsm8k_dir():
    return data_path("GSM8K_DIR", "gsm8k")


@pytest.fixture
def lambada_dir():
    return data_path("LAMBADA_DIR", "lambada")


@pytest.fixture
def tinyshakespeare_file():
    return data_path("TINYSHAKESPEARE_FILE", "tinyshakespeare/input.txt")


@pytest.fixture
def gpt2_tokenizer():
    tiktoken = pytest.importorskip("tiktoken")
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        pytest.skip("set TIKTOKEN_CACHE_DIR to a folder holding the GPT-2 BPE files")
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model gains nothing from a second thread, and on a busy 2-core machine each op then waits
    for a thread that is not running: torch.multinomial over 50k ids took 23 ms instead of 1 here.
    A module that serves tiny models uses it for all its tests: pytestmark = usefixtures("one_thread")."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    """The chat tokenizer (GPT-2's BPE and the chat template's special tokens), once per module."""
    from tokenizer import get_tokenizer

    return get_tokenizer("gpt2-chat")


def usage_error(main, argv, capsys):
    """The last line argparse printed for a flag main(argv) refused while parsing: exit code 2, no
    traceback (a script's flags are checked before any model loads)."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    return err.splitlines()[-1]
