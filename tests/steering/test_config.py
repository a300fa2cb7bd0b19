"""The steering configuration (emokern.steering.config): every setting validated once, from
plain values (a bank and a layer count, no model), shared by the Steerer, emokern.steer and
the vLLM plugin."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from helpers import random_bank

from emokern.bank import EmotionBank
from emokern.steering import Steerer, SteeringConfig, steer
from emokern.steering.config import POSITIONS, SPREADS, check_layers


def _bank():
    """Layers 2, 4, 6, 8 of a 10-layer model; recommended [4, 6], detection [8]."""
    g = torch.Generator().manual_seed(0)
    return EmotionBank(torch.randn(4, 3, 8, generator=g), ["joy", "sadness", "fear"],
                       [2, 4, 6, 8], metadata={"recommended_layers": [4, 6],
                                               "detection_layers": [8]})


def test_resolve_from_plain_values():
    """What the vLLM plugin calls: a bank and a layer count, no Hugging Face model."""
    bank = _bank()
    config = SteeringConfig.resolve(bank, 10)
    assert config == SteeringConfig(names=("joy", "sadness", "fear"), layers=(4, 6), band=(4, 6),
                                    monitor_layers=(4, 6), positions="all", monitor="all",
                                    trajectory=False, spread="divide", norm_preserving=False,
                                    backend=None)
    assert config.scale == 0.5 and config.reads
    each = SteeringConfig.resolve(bank, 10, layers=(8, 2), spread="each", monitor=False,
                                  norm_preserving=True, who="emokern.vllm")
    assert each.layers == (8, 2) and each.scale == 1.0 and each.monitor is None
    assert each.norm_preserving and not each.reads
    watched = SteeringConfig.resolve(bank, 10, layers=[2], monitor_layers="auto",
                                     monitor="generated", positions="prompt",
                                     emotions=["fear", "joy"], trajectory=True)
    assert watched.monitor_layers == (8,) and watched.names == ("fear", "joy")
    assert watched.monitor == "generated" and watched.positions == "prompt"
    assert SteeringConfig.resolve(bank, 10, positions="generated").monitor == "generated"
    assert SteeringConfig.resolve(bank, 10, monitor_layers=[8, 2]).monitor_layers == (8, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.layers = (2,)


def test_settings_resolve_back_to_the_same_config():
    bank = _bank()
    for settings in ({}, {"layers": [8], "monitor_layers": "auto", "monitor": "prompt"},
                     {"emotions": ["sadness"], "spread": "each", "trajectory": True,
                      "monitor": False, "backend": "reference"}):
        config = SteeringConfig.resolve(bank, 10, **settings)
        assert SteeringConfig.resolve(bank, 10, **config.settings()) == config


@pytest.mark.parametrize("settings, exc, match", [
    ({"layers": [10]}, ValueError, r"^emokern\.vllm: layers: layer 10 is outside the model, "
                                   r"which has 10 decoder layers \(0\.\.9\)$"),
    ({"layers": [3]}, ValueError, r"^emokern\.vllm: layers: layer 3 has no vectors in the bank"),
    ({"layers": "middle"}, ValueError, r"^emokern\.vllm: layers must be 'auto' or a list"),
    ({"layers": [2, 2]}, ValueError, "layers lists a layer twice"),
    ({"layers": [2.0]}, TypeError, "layers must hold ints"),
    ({"positions": "decode"}, ValueError, r"positions must be one of \('all', 'prompt', "),
    ({"monitor": "sometimes"}, ValueError, "monitor must be True, False or one of"),
    ({"spread": "sum"}, ValueError, r"^emokern\.vllm: spread must be one of \('divide', 'each'\)"),
    ({"norm_preserving": 1}, TypeError, "norm_preserving must be a bool, got int"),
    ({"emotions": "joy"}, ValueError, "emotions must be a non-empty list"),
    ({"emotions": []}, ValueError, "emotions must be a non-empty list"),
    ({"emotions": ["anger"]}, ValueError, "emotions names unknown emotion 'anger'"),
    ({"emotions": ["joy", "joy"]}, ValueError, "emotions lists a name twice"),
    ({"monitor_layers": "deep"}, ValueError, "monitor_layers must be None, 'auto' or a list"),
    ({"monitor_layers": [5]}, ValueError, "monitor_layers: layer 5 has no vectors"),
])
def test_every_error_names_the_caller_and_the_argument(settings, exc, match):
    with pytest.raises(exc, match=match) as info:
        SteeringConfig.resolve(_bank(), 10, who="emokern.vllm", **settings)
    assert str(info.value).startswith("emokern.vllm: ")
    with pytest.raises(exc) as info:
        SteeringConfig.resolve(_bank(), 10, **settings)
    assert str(info.value).startswith("emokern.steer: ")


def test_one_parameter_list_for_steer_steerer_and_config(tiny_llama):
    model, _ = tiny_llama
    resolve = inspect.signature(SteeringConfig.resolve).parameters
    settings = [n for n, p in resolve.items() if p.kind is p.KEYWORD_ONLY and n != "who"]
    shown = inspect.signature(steer).parameters
    assert list(shown)[:6] == ["model", "bank", "mix", "target", "control", "config"]
    assert list(shown)[6:] == settings
    for name in settings:
        assert shown[name].default == resolve[name].default
    assert (POSITIONS, SPREADS) == (("all", "prompt", "generated"), ("divide", "each"))
    assert check_layers("auto", _bank(), 10) == (4, 6)

    bank = random_bank(model)
    config = SteeringConfig.resolve(bank, 4, layers=[1, 3], spread="each", monitor="prompt")
    by_config = Steerer(model, bank, [{"joy": 1.0}], config=config)
    by_keywords = steer(model, bank, [{"joy": 1.0}], layers=[1, 3], spread="each",
                        monitor="prompt")
    assert by_config.config == by_keywords.config == config
    assert by_config.layers == (1, 3) and by_config.scale == 1.0
    with pytest.raises(TypeError, match="give config or settings, not both"):
        steer(model, bank, [{}], config=config, layers=[1])
    with pytest.raises(TypeError, match=r"^emokern\.steer: unknown setting\(s\) \['layer'\]"):
        steer(model, bank, [{}], layer=[1])
    with pytest.raises(TypeError, match="config must be a SteeringConfig"):
        steer(model, bank, [{}], config={"layers": [1]})
    # A configuration resolved for a larger model is checked again against this one.
    with pytest.raises(ValueError, match="layer 6 is outside the model"):
        steer(model, bank.select(layers=[1]), [{}],
              config=dataclasses.replace(config, layers=(6,)))
