import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# One intra-op thread, set before torch is imported: the tiny test models run faster that way on 2 cores, and the
# reliability tests fork training runs, which can deadlock in the child when the parent's OpenMP pool is running.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# the contract's case table (tests/methods/contract.py) also says how the trainer tests run each method
sys.path.insert(0, str(Path(__file__).parent / "methods"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    from difftune.testing import write_clip_tokenizer

    return write_clip_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    """A tiny SD pipeline saved in diffusers format (what `difftune generate --model` takes)."""
    from difftune.testing import save_tiny_pipeline

    return save_tiny_pipeline("sd", tmp_path_factory.mktemp("sd") / "model")
