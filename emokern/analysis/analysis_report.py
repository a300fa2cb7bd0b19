"""Writing the analyses' results: JSON (the numbers), markdown (tables) and PNG plots, all
through :mod:`emokern.files` (atomic). Plots need matplotlib (the ``analysis`` extra); without
it the JSON and markdown are written and the markdown says why there is no plot.

Tested through ``tests/analysis/test_analyze_command.py`` (every analysis end to end,
with its written files).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from emokern.files import atomic_write, write_json, write_text

__all__ = ["write_inference", "write_neurons", "write_space", "write_words"]


def _pyplot():
    try:
        import matplotlib  # optional: the analysis extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, buf.getvalue())
    return path.name


def _no_plot() -> str:
    return "_(no plots: matplotlib is not installed)_\n"


def _f(x, digits=2) -> str:
    return "nan" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


# ------------------------------------------------------------------------------ space


def write_space(result: dict, out: Path, *, title: str = "") -> list[Path]:
    """``space.json``, ``space.md``, ``space-pca.png``, ``space-layers.png``."""
    out = Path(out)
    write_json(out / "space.json", result)
    rows = result["layers"]
    md = [f"# Emotion space vs human valence/arousal{title}\n",
          f"{len(result['categories'])} categories; norms: {result['norms']}; RSA: Spearman "
          f"rho between 1 - cos of the category vectors and the distance in z-scored "
          f"valence-arousal, Mantel p over {result['n_perm']} label permutations.\n",
          "| layer | PC1 var | PC2 var | r(PC1, V) | r(PC1, A) | r(PC2, V) | r(PC2, A) | RSA rho "
          "| p |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['layer']} | {_f(r['explained'][0])} | {_f(r['explained'][1])} | "
                  f"{_f(r['r_pc1_valence'])} | {_f(r['r_pc1_arousal'])} | "
                  f"{_f(r['r_pc2_valence'])} | {_f(r['r_pc2_arousal'])} | {_f(r['rsa_rho'])} | "
                  f"{r['rsa_p']:.2g} |")
    plt = _pyplot()
    if plt is None:
        md.append(_no_plot())
    else:
        best = next(r for r in rows if r["layer"] == result["best"]["r_pc1_valence"])
        fig, ax = plt.subplots(figsize=(6.4, 5))
        sc = ax.scatter(best["pc1"], best["pc2"], c=result["valence"], cmap="coolwarm_r",
                        s=40, edgecolors="k", linewidths=0.4)
        for name, x, y in zip(result["categories"], best["pc1"], best["pc2"], strict=True):
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 2), textcoords="offset points")
        fig.colorbar(sc, label="human valence (Warriner)")
        ax.set(xlabel="PC1", ylabel="PC2",
               title=f"category vectors, layer {best['layer']}{title}")
        pca = _save(fig, out / "space-pca.png")
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(7, 3.6))
        layers = [r["layer"] for r in rows]
        for key, label in (("r_pc1_valence", "|r| PC1-valence"),
                           ("r_pc1_arousal", "|r| PC1-arousal"),
                           ("r_pc2_valence", "|r| PC2-valence"),
                           ("r_pc2_arousal", "|r| PC2-arousal"), ("rsa_rho", "RSA rho")):
            ax.plot(layers, [abs(r[key]) for r in rows], marker=".", label=label)
        ax.set(xlabel="layer", ylabel="correlation", ylim=(0, 1))
        ax.legend(fontsize=7, ncol=3)
        per_layer = _save(fig, out / "space-layers.png")
        plt.close(fig)
        md += ["", f"![categories on PC1/PC2]({pca})", f"![r per layer]({per_layer})"]
    write_text(out / "space.md", "\n".join(md) + "\n")
    return [out / "space.json", out / "space.md"]


# ------------------------------------------------------------------------------ words


def write_words(result: dict, out: Path, *, name: str = "words") -> list[Path]:
    """``<name>.json``, ``<name>.md``, ``<name>.png``."""
    out = Path(out)
    write_json(out / f"{name}.json", result)
    dims = result["dimensions"]
    md = [f"# Word-rating prediction ({result['norms']})\n",
          f"{result['n_words']} of {result['words_total']} words (seed {result['seed']}); "
          f"carrier {result['carrier']!r}; ridge, {result['folds']}-fold CV, Pearson r of the "
          f"held-out predictions with bootstrap 95% CI ({result['n_boot']} resamples); "
          f"baseline: {result['n_directions']} random directions, {result['n_random']} draws "
          f"(mean r; CI of draw 1).\n",
          "| layer | " + " | ".join(f"{d} r [CI] | random r" for d in dims) + " |",
          "|---|" + "---|---|" * len(dims)]
    for r in result["layers"]:
        cells = []
        for d in dims:
            x = r[d]
            cells.append(f"{_f(x['r'])} [{_f(x['ci'][0])}, {_f(x['ci'][1])}] | "
                         f"{_f(float(np.mean(x['random_r'])))}")
        md.append(f"| {r['layer']} | " + " | ".join(cells) + " |")
    plt = _pyplot()
    if plt is None:
        md.append(_no_plot())
    else:
        fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 3.4), squeeze=False)
        layers = [r["layer"] for r in result["layers"]]
        for ax, d in zip(axes[0], dims, strict=True):
            r = np.array([x[d]["r"] for x in result["layers"]])
            lo = np.array([x[d]["ci"][0] for x in result["layers"]])
            hi = np.array([x[d]["ci"][1] for x in result["layers"]])
            rand = np.array([np.mean(x[d]["random_r"]) for x in result["layers"]])
            ax.plot(layers, r, marker=".", label="bank directions")
            ax.fill_between(layers, lo, hi, alpha=0.25)
            ax.plot(layers, rand, marker=".", color="grey", label="random directions")
            ax.set(title=d, xlabel="layer", ylabel="CV Pearson r")
            ax.legend(fontsize=7)
        fig.suptitle(f"{result['norms_name']}: {result['n_words']} words")
        md += ["", f"![r per layer]({_save(fig, out / f'{name}.png')})"]
        plt.close(fig)
    write_text(out / f"{name}.md", "\n".join(md) + "\n")
    return [out / f"{name}.json", out / f"{name}.md"]


# ---------------------------------------------------------------------------- neurons


def write_neurons(result: dict, out: Path) -> list[Path]:
    """``neurons.json``, ``neurons.md``, ``neurons-layers.png``."""
    out = Path(out)
    write_json(out / "neurons.json", result)
    per = result["per_attribute"]
    md = ["# Emotion-attribute neurons\n",
          f"{result['n_neurons']} MLP intermediate neurons ({result['shape'][1]} layers x "
          f"{result['shape'][2]}), {result['shape'][0]} categories; Kendall tau-b RSA per neuron "
          f"and attribute, BH-FDR at q < {result['alpha']}; null: {result['n_perm']} "
          f"permutations of the categories' attribute values.\n",
          "| attribute | significant | null: mean [max] | top-k mean tau | null: mean [max] |",
          "|---|---|---|---|---|"]
    for name, a in per.items():
        ns, nt = a["null_n_significant"], a["null_top_mean_tau"]
        md.append(f"| {name} | {a['n_significant']} | {_f(float(np.mean(ns)), 1)} [{max(ns)}] "
                  f"| {_f(a['top_mean_tau'], 3)} | {_f(float(np.mean(nt)), 3)} "
                  f"[{_f(max(nt), 3)}] |")
    plt = _pyplot()
    if plt is None:
        md.append(_no_plot())
    else:
        fig, ax = plt.subplots(figsize=(7.5, 3.6))
        for name, a in per.items():
            ax.plot(a["top_layers"], marker=".", label=name)
        ax.set(xlabel="layer", ylabel=f"neurons among the top {result['top_k']}",
               title="layers of each attribute's top neurons")
        ax.legend(fontsize=7, ncol=3)
        md += ["", f"![layers of the top neurons]({_save(fig, out / 'neurons-layers.png')})"]
        plt.close(fig)
    write_text(out / "neurons.md", "\n".join(md) + "\n")
    return [out / "neurons.json", out / "neurons.md"]


# -------------------------------------------------------------------------- inference


def inference_summary(result: dict) -> list[dict]:
    """One row per (attribute, k): calibrated accuracy with the top set ablated, the random
    sets' mean and sd, the difference, and the per-emotion drops beyond random."""
    intact = np.array(result["intact"]["calibrated"]["per_emotion"])
    rows = []
    for c in result["conditions"]:
        rand = np.array([r["calibrated"]["accuracy"] for r in c["random"]])
        rand_per = np.array([r["calibrated"]["per_emotion"] for r in c["random"]]).mean(0)
        top_per = np.array(c["top"]["calibrated"]["per_emotion"])
        rows.append({"attribute": c["attribute"], "k": c["k"],
                     "top": c["top"]["calibrated"]["accuracy"],
                     "random_mean": float(rand.mean()), "random_sd": float(rand.std(ddof=1))
                     if len(rand) > 1 else 0.0,
                     "top_minus_random": float(c["top"]["calibrated"]["accuracy"] - rand.mean()),
                     "drop_per_emotion": (intact - top_per).tolist(),
                     "drop_beyond_random": (rand_per - top_per).tolist()})
    return rows


def write_inference(result: dict, out: Path) -> list[Path]:
    """``inference.json``, ``inference.md``, ``inference.png``."""
    out = Path(out)
    write_json(out / "inference.json", result)
    options = result["options"]
    intact = result["intact"]
    rows = inference_summary(result)
    md = ["# Emotion inference and neuron ablation\n",
          f"{result['n_items']} vignettes ({result['n_items'] // len(options)} per emotion), "
          f"6-way choice from next-token logits. Accuracy intact: raw "
          f"{_f(intact['raw']['accuracy'])}, calibrated {_f(intact['calibrated']['accuracy'])} "
          f"(chance {_f(1 / len(options))}); {result['draws']} random layer-matched sets per "
          f"condition; {result['seconds']} s.\n",
          "Intact, calibrated, per emotion: " + ", ".join(
              f"{o} {_f(a)}" for o, a in zip(options, intact["calibrated"]["per_emotion"],
                                             strict=True)) + "\n",
          "| attribute | k | top-k ablated | random: mean (sd) | top - random | "
          "largest per-emotion drop beyond random |", "|---|---|---|---|---|---|"]
    for r in rows:
        worst = int(np.argmax(r["drop_beyond_random"]))
        md.append(f"| {r['attribute']} | {r['k']} | {_f(r['top'])} | {_f(r['random_mean'])} "
                  f"({_f(r['random_sd'])}) | {r['top_minus_random']:+.2f} | "
                  f"{options[worst]} {r['drop_beyond_random'][worst]:+.2f} |")
    if not result.get("complete", True):
        md.insert(1, f"**Partial result**: {len(rows)} of "
                     f"{len(result['ks']) * len(result['attributes'])} conditions so far.\n")
    plt = _pyplot()
    if plt is None:
        md.append(_no_plot())
    elif rows:
        k = max(r["k"] for r in rows)
        sel = [r for r in rows if r["k"] == k]
        mat = np.array([r["drop_beyond_random"] for r in sel])
        fig, ax = plt.subplots(figsize=(6.5, 0.42 * len(sel) + 1.6))
        lim = max(0.05, float(np.abs(mat).max()))
        im = ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(options)), options, rotation=30)
        ax.set_yticks(range(len(sel)), [r["attribute"] for r in sel])
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(im, label="accuracy drop beyond random ablation")
        ax.set_title(f"per-emotion drop, top-{k} neurons of each attribute ablated")
        md += ["", f"![per-emotion drops]({_save(fig, out / 'inference.png')})"]
        plt.close(fig)
    write_text(out / "inference.md", "\n".join(md) + "\n")
    return [out / "inference.json", out / "inference.md"]
