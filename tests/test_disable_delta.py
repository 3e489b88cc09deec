"""`disable_delta(model)`: inside the block the model is the base model, after it the delta is back.

Every registered method, with random (non-zero) delta weights so the delta is not a no-op. No method
changes the base weights when it attaches (PiSSA/OLoRA keep their initial factors as buffers instead
of subtracting them from W, the sparse methods and VeRA add modules that wrap nothing), so "disabled"
is compared with the untouched base model itself, not with some residual of it.
"""

import pytest
import torch
from test_methods import SMALL, VOCAB, attach, randomize, tiny

import deltatune
from deltatune.deltas import METHODS, delta_layers, disable_delta, set_merged


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base_logits(ids):
    return tiny()(ids).logits


@pytest.mark.parametrize("method", list(METHODS))
def test_disabled_delta_is_the_base_model_and_comes_back(method, ids, base_logits):
    model = attach(method)
    randomize(model)
    model.eval()
    with_delta = model(ids).logits
    assert (with_delta - base_logits).abs().max() > 1e-3  # the delta does something
    with disable_delta(model) as same:
        assert same is model
        torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(ids).logits, with_delta, atol=1e-6, rtol=0)


def test_disable_delta_restores_on_error_and_nests():
    model = attach("lora", target_modules=["q_proj"])
    layers = delta_layers(model).values()
    with pytest.raises(RuntimeError, match="boom"), deltatune.disable_delta(model):
        raise RuntimeError("boom")
    assert not any(layer.disabled for layer in layers)
    with disable_delta(model):
        with disable_delta(model):
            assert all(layer.disabled for layer in layers)
        assert all(layer.disabled for layer in layers)  # the outer block still holds
    assert not any(layer.disabled for layer in layers)


def test_a_merged_delta_cannot_be_disabled():
    model = attach("lora", **SMALL.get("lora", {}))
    set_merged(model, True)
    with pytest.raises(ValueError, match="unmerge it before disabling it"), disable_delta(model):
        pass
    assert not any(layer.disabled for layer in delta_layers(model).values())
