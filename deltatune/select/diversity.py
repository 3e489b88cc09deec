"""Fill a budget with records that cover the embedding space: k-center greedy or k-means sampling.

- k-center greedy (Sener & Savarese 2018, as in diversity-centric instruction selection): start from
  one point, then repeatedly add the point farthest (Euclidean; on unit vectors the same order as
  cosine) from everything chosen so far. The start is the highest-quality candidate when a quality
  score ran before, else the first candidate in input order; ties go to the lower index.
- k-means sampling: k = budget clusters (scikit-learn KMeans), and from each the record nearest its
  centroid.

scikit-learn rather than faiss: the candidate sets are small (thousands to ~100k), so exact k-means
and distances run in seconds; scikit-learn is already needed for the PCA of the plot and SemDeDup's
k-means; and faiss-cpu would be a large extra wheel whose approximate indexes buy nothing here.
"""

from __future__ import annotations

import numpy as np


def k_center_greedy(points: np.ndarray, k: int, start: int | list[int] = 0) -> list[int]:
    """Row indices of `points` in the order k-center greedy picks them, beginning with `start`
    (one index, or several already chosen)."""
    x = np.asarray(points, dtype=np.float64)
    chosen = [start] if isinstance(start, int) else list(start)
    k = min(k, len(x))
    if k <= 0 or not chosen:
        return chosen[:k]
    sq = np.einsum("ij,ij->i", x, x)

    def dist(j: int) -> np.ndarray:
        return np.sqrt(np.maximum(sq + sq[j] - 2.0 * (x @ x[j]), 0.0))

    nearest = np.min([dist(j) for j in chosen], axis=0)
    nearest[chosen] = -1.0
    while len(chosen) < k:
        j = int(np.argmax(nearest))  # first maximum: the lower index wins a tie
        chosen.append(j)
        nearest = np.minimum(nearest, dist(j))
        nearest[chosen] = -1.0
    return chosen


def assign(points: np.ndarray, centers: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """For each point, the index of its nearest center (Euclidean), `chunk` points at a time so the
    distance matrix stays small (10k records x 2.5k centers would be 200 MB at once)."""
    x, c = np.asarray(points, dtype=np.float64), np.asarray(centers, dtype=np.float64)
    c_sq = (c * c).sum(1)[None]
    out = np.empty(len(x), dtype=np.int64)
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk]
        out[i : i + chunk] = np.argmin((part * part).sum(1)[:, None] + c_sq - 2.0 * part @ c.T, axis=1)
    return out


def kmeans_sample(points: np.ndarray, k: int, seed: int = 0) -> tuple[list[int], np.ndarray]:
    """(the row nearest each of k centroids, the KMeans model's centroids); k >= len keeps every row."""
    x = np.asarray(points, dtype=np.float64)
    if k >= len(x):
        return list(range(len(x))), x.copy()
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x)
    labels = km.labels_
    chosen: list[int] = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if len(members):  # a cluster is empty only when there are fewer distinct points than k
            d = ((x[members] - km.cluster_centers_[c]) ** 2).sum(1)
            chosen.append(int(members[np.argmin(d)]))  # ties: the lower index
    # identical points can leave clusters empty: fill up with the farthest remaining points
    return k_center_greedy(x, k, chosen), km.cluster_centers_
