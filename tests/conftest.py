import os

# Spin-waiting OpenMP threads collapse throughput when the CPU is shared (CI, parallel helpers);
# the tests use tiny tensors, so passive waiting costs nothing and avoids 10-100x stalls.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from deltatune.models import tiny_llama


@pytest.fixture
def tiny_model():
    """A tiny random Llama in fp32 eval mode (hidden 64, 2 layers, the default vocabulary)."""
    return tiny_llama(seed=0).eval()


@pytest.fixture
def input_ids():
    return torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(1))
