import os

# Spin-waiting OpenMP threads collapse throughput when the CPU is shared (CI, parallel helpers);
# the tests use tiny tensors, so passive waiting costs nothing and avoids 10-100x stalls.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from deltatune.models import load_tokenizer, tiny_llama


@pytest.fixture
def tiny_model():
    """A tiny random Llama in fp32 eval mode (hidden 64, 2 layers, the default vocabulary)."""
    return tiny_llama(seed=0).eval()


@pytest.fixture
def input_ids():
    return torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model's 64-wide matmuls gain nothing from intra-op threads, and on a shared CPU
    OpenMP's barriers then cost far more than the work; one thread keeps these tests fast.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random model whose logits can actually move: with the usual 0.02 init, frozen tied
    embeddings cap the logit scale near 1, so no adapter could lower the loss much."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(seed=0, initializer_range=0.3).save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path
