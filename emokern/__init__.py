"""emokern: fused emotion steering and monitoring for transformer language models.

>>> import emokern
>>> model, tok = emokern.load_model("default")
>>> bank = emokern.EmotionBank.load_default()
>>> with emokern.steer(model, bank, mix=[{"joy": 2.0}, {}]) as s:
...     out = model.generate(**tok(["Hi", "Hi"], return_tensors="pt", padding=True))
>>> s.monitor.mean()   # [B, L, K]
"""

from emokern.bank import EmotionBank, Recipe
from emokern.models import load_model
from emokern.ops import RunningProjections, available_backends, steer_
from emokern.steering import Steerer, steer
from emokern.steering.ablate import Ablator, ablate
from emokern.version import __version__

__all__ = [
    "Ablator",
    "EmotionBank",
    "Recipe",
    "RunningProjections",
    "Steerer",
    "__version__",
    "ablate",
    "available_backends",
    "load_model",
    "steer",
    "steer_",
]
