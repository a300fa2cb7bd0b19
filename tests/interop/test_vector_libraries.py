"""emokern.interop.vector_libraries: steering-vectors and repeng objects as emokern directions
(the libraries that are installed are tested for real; repeng is optional)."""

import dataclasses

import numpy as np
import pytest
import torch

import emokern
from emokern.interop import bank_from_directions, from_repeng, from_steering_vector


def test_steering_vector_steers_where_emokern_does(tiny_llama, one_thread):
    """A SteeringVector applied by steering-vectors and the bank imported from it, steered by
    emokern with weight 1 at its layers (spread "each"), give the same logits."""
    sv_module = pytest.importorskip("steering_vectors")
    model, tokenizer = tiny_llama
    dim = model.config.hidden_size
    generator = torch.Generator().manual_seed(3)
    acts = {1: torch.randn(dim, generator=generator), 2: torch.randn(dim, generator=generator)}
    vector = sv_module.SteeringVector(layer_activations=acts, layer_type="decoder_block")
    directions = from_steering_vector(vector)
    assert list(directions) == [1, 2]
    assert np.array_equal(directions[1], acts[1].numpy())
    bank = bank_from_directions({"trait": directions})
    enc = tokenizer(["A quiet morning"], return_tensors="pt")
    with torch.no_grad():
        with vector.apply(model, multiplier=1.0):
            theirs = model(**enc).logits
        with emokern.steer(model, bank, [{"trait": 1.0}], layers=[1, 2], spread="each",
                           monitor=False):
            ours = model(**enc).logits
        plain = model(**enc).logits
    assert not torch.allclose(theirs, plain, atol=1e-4)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_steering_vector_layer_types_and_keys():
    sv_module = pytest.importorskip("steering_vectors")
    mlp = sv_module.SteeringVector(layer_activations={1: torch.ones(4)}, layer_type="mlp")
    with pytest.raises(ValueError, match="layer_type 'mlp'"):
        from_steering_vector(mlp)
    negative = sv_module.SteeringVector(layer_activations={-1: torch.ones(4)})
    with pytest.raises(ValueError, match="pass num_layers"):
        from_steering_vector(negative)
    assert list(from_steering_vector(negative, num_layers=6)) == [5]
    with pytest.raises(TypeError, match="expected a steering_vectors.SteeringVector"):
        from_steering_vector({1: torch.ones(4)})


@dataclasses.dataclass
class _ControlVectorLike:
    """The fields of repeng's ControlVector (a dataclass: model_type, directions)."""

    model_type: str
    directions: dict


def test_repeng_like_control_vectors():
    vec = np.arange(4, dtype=np.float32)
    cv = _ControlVectorLike("llama", {3: vec, -1: 2 * vec})
    with pytest.raises(ValueError, match="negative layer -1"):
        from_repeng(cv)
    directions = from_repeng(cv, num_layers=8)
    assert list(directions) == [3, 7]
    assert np.array_equal(directions[7], 2 * vec)
    with pytest.raises(ValueError, match="outside a model of 8 layers"):
        from_repeng(_ControlVectorLike("llama", {8: vec}), num_layers=8)
    with pytest.raises(ValueError, match="must be 1-D"):
        from_repeng(_ControlVectorLike("llama", {1: np.ones((2, 2))}))
    with pytest.raises(TypeError, match="expected a repeng.ControlVector"):
        from_repeng(object())


def test_repeng_control_vector_when_installed():
    repeng = pytest.importorskip("repeng")
    vec = np.linspace(-1, 1, 8, dtype=np.float32)
    cv = repeng.ControlVector(model_type="llama", directions={2: vec, 4: -vec})
    bank = bank_from_directions({"calm": from_repeng(cv)})
    assert bank.layers == [2, 4]
    assert np.array_equal(bank.vector("calm", 4).numpy(), -vec)
