"""Duplicates, three ways: the same text, nearly the same text, and the same meaning.

Every function takes the indices still in play (`alive`, ascending) and returns, for each record it
drops, the earlier record it duplicates and how close they are; the first of a group is always kept.

- exact: a hash of the normalised text (lowercase, punctuation removed, whitespace collapsed).
- near: MinHash LSH (datasketch) finds candidate pairs; each candidate is then checked with the exact
  Jaccard similarity of the two shingle sets, so the reported similarity is the true one and an LSH
  false positive never drops a record. Shingles are character 5-grams of the normalised text by
  default: instruction records are short, and on a 10-word record one edited word changes 3 of 8 word
  3-shingles (Jaccard ~0.45) but only ~5 of ~55 character 5-grams (Jaccard ~0.85), so the small edits
  that make near duplicates stay above a 0.8 threshold while different content does not. Word
  3-shingles (the usual choice for long web documents) are an option.
- semantic (SemDeDup, Abbas et al. 2023): embeddings are clustered with k-means; within a cluster a
  record is dropped when its cosine to an earlier record that was kept exceeds the threshold. Unlike
  the paper's one-shot max over the upper triangle, a record is only compared with kept ones, so a
  chain a~b~c where a and c are not similar keeps c.
"""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np

Dropped = dict[int, tuple[int, float]]  # dropped index -> (index it duplicates, similarity)
_PUNCT = re.compile(r"[^\w\s]|_")


def normalise(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: what "the same text" means here."""
    return " ".join(_PUNCT.sub("", text.lower()).split())


def exact_duplicates(texts: list[str], alive: list[int]) -> Dropped:
    """Records whose normalised text hashes like an earlier one's."""
    first: dict[bytes, int] = {}
    dropped: Dropped = {}
    for i in alive:
        key = hashlib.sha256(normalise(texts[i]).encode()).digest()
        if key in first:
            dropped[i] = (first[key], 1.0)
        else:
            first[key] = i
    return dropped


def shingle_set(text: str, shingles: str = "char5") -> set[str]:
    """Character 5-grams or word 3-grams of the normalised text (the whole text when it is shorter)."""
    norm = normalise(text)
    if shingles == "word3":
        words = norm.split()
        return {" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))}
    return {norm[i : i + 5] for i in range(max(1, len(norm) - 4))}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicates(
    texts: list[str], alive: list[int], threshold: float = 0.8, num_perm: int = 128, shingles: str = "char5"
) -> Dropped:
    """Records with Jaccard >= threshold to an earlier kept record (LSH candidates, exact check)."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    template = MinHash(num_perm=num_perm, seed=1)
    permutations, scheme = template.permutations, template.scheme  # made once, not per record
    sets: dict[int, set[str]] = {}
    dropped: Dropped = {}
    for i in alive:
        s = shingle_set(texts[i], shingles)
        m = MinHash(num_perm=num_perm, permutations=permutations, scheme=scheme)
        m.update_batch([x.encode() for x in s])
        best, best_j = -1, 0.0
        for j in sorted(lsh.query(m)):
            sim = jaccard(s, sets[j])
            if sim > best_j:
                best, best_j = j, sim
        if best >= 0 and best_j >= threshold:
            dropped[i] = (best, best_j)
        else:
            sets[i] = s
            lsh.insert(i, m)
    return dropped


def semantic_clusters(embeddings: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means labels of (normalised) embeddings; k = 1 puts everything in one cluster."""
    k = min(k, len(embeddings))
    if k <= 1:
        return np.zeros(len(embeddings), dtype=np.int64)
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(embeddings).astype(np.int64)


def semantic_duplicates(
    embeddings: np.ndarray,
    alive: list[int],
    threshold: float = 0.95,
    clusters: int | None = None,
    seed: int = 0,
) -> tuple[Dropped, dict[int, int]]:
    """SemDeDup: (dropped -> (kept earlier record, cosine), cluster label of every alive record).

    `embeddings` are unit vectors (one row per record); the default cluster count is one per 1000
    records, so each cluster's cosine matrix stays small while duplicates still share a cluster."""
    if not alive:
        return {}, {}
    vectors = embeddings[alive].astype(np.float32)
    k = clusters if clusters is not None else math.ceil(len(alive) / 1000)
    labels = semantic_clusters(vectors, k, seed)
    dropped: Dropped = {}
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)  # ascending: earlier records first
        sims = vectors[members] @ vectors[members].T
        kept: list[int] = []
        for pos in range(len(members)):
            if kept:
                row = sims[pos, kept]
                best = int(np.argmax(row))
                if row[best] > threshold:
                    dropped[alive[members[pos]]] = (alive[members[kept[best]]], float(row[best]))
                    continue
            kept.append(pos)
    return dropped, {alive[p]: int(labels[p]) for p in range(len(alive))}
