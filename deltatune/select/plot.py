"""selection.png: where the kept records lie (2-D PCA of the embeddings), their score histograms, and
why the others were dropped. matplotlib's Agg backend, as the training loss plot uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SCORE_LABELS = {
    "ifd": "IFD (loss with prompt / answer alone)",
    "perplexity": "perplexity (log scale)",
    "loss_with_prompt": "answer loss given the prompt",
    "loss_answer_only": "answer loss alone",
}


def plot_selection(
    out: Path,
    kept: list[bool],
    scores: list[dict[str, float | None]],
    reasons: dict[str, int],
    embeddings: np.ndarray | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept_mask = np.asarray(kept, dtype=bool)
    present = [k for k in SCORE_LABELS if any(s.get(k) is not None for s in scores)]
    panels = (embeddings is not None) + len(present) + 1
    cols = 2 if panels > 1 else 1
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    flat = list(axes.flat)
    i = 0
    if embeddings is not None:
        ax = flat[i]
        i += 1
        xy = _pca2(embeddings)
        ax.scatter(*xy[~kept_mask].T, s=6, c="lightgray", label=f"dropped ({int((~kept_mask).sum())})")
        ax.scatter(*xy[kept_mask].T, s=8, c="tab:blue", label=f"kept ({int(kept_mask.sum())})")
        ax.set_title("embeddings, 2-D PCA")
        ax.legend(loc="best", fontsize=8)
    for key in present:
        ax = flat[i]
        i += 1
        values = np.array([np.nan if s.get(key) is None else s[key] for s in scores], dtype=float)
        if key == "perplexity":
            values = np.log10(values)
        has = ~np.isnan(values)
        bins = np.histogram_bin_edges(values[has], bins=30) if has.any() else 10
        ax.hist(
            [values[has & ~kept_mask], values[has & kept_mask]],
            bins=bins,
            stacked=True,
            color=["lightgray", "tab:blue"],
            label=["dropped", "kept"],
        )
        ax.set_title(SCORE_LABELS[key])
        ax.set_xlabel("log10 perplexity" if key == "perplexity" else key)
        ax.legend(fontsize=8)
    ax = flat[i]
    i += 1
    names = list(reasons)
    ax.barh(names, [reasons[n] for n in names], color=["tab:blue" if n == "kept" else "gray" for n in names])
    ax.set_title("records per reason")
    ax.invert_yaxis()
    for ax in flat[i:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)


def _pca2(embeddings: np.ndarray) -> np.ndarray:
    """The first two principal components (zeros when there is no variance to project)."""
    x = np.asarray(embeddings, dtype=np.float64)
    if len(x) < 3 or np.allclose(x, x[0]):
        return np.zeros((len(x), 2))
    from sklearn.decomposition import PCA

    return PCA(n_components=2).fit_transform(x)
