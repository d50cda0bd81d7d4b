"""Krum, Multi-Krum and Bulyan selection over a matrix of squared distances (torch-free).

Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent"
(NeurIPS 2017) and El Mhamdi et al., "The Hidden Vulnerability of Distributed Learning in
Byzantium" (ICML 2018). Equal scores are common (two mutual nearest neighbours have the
same score when one neighbour is counted), so ties are broken by the sum of all distances
to the other members, then by the lower index: the selection does not depend on the order
of the updates except for exact ties of both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def krum_scores(dist: Sequence[Sequence[float]], members: Sequence[int], f: int) -> dict[int, float]:
    """Krum score of each member: the sum of squared distances to its ``n - f - 2`` nearest
    other members (at least 1), ``n = len(members)``."""
    n = len(members)
    closest = max(1, n - f - 2)
    scores: dict[int, float] = {}
    for i in members:
        row = sorted(dist[i][j] for j in members if j != i)
        scores[i] = math.fsum(row[:closest])
    return scores


def krum_select(dist: Sequence[Sequence[float]], members: Sequence[int], f: int, m: int = 1) -> list[int]:
    """The ``m`` members with the lowest Krum scores, best first."""
    scores = krum_scores(dist, members, f)
    spread = {i: math.fsum(dist[i][j] for j in members) for i in members}
    ranked = sorted(members, key=lambda i: (scores[i], spread[i], i))
    return ranked[:m]


def bulyan_select(dist: Sequence[Sequence[float]], members: Sequence[int], f: int) -> list[int]:
    """Bulyan's first stage: apply Krum ``theta = n - 2f`` times, each time removing the
    chosen update from the candidates. Returns the chosen members in index order."""
    remaining = list(members)
    chosen: list[int] = []
    for _ in range(len(members) - 2 * f):
        best = krum_select(dist, remaining, f, 1)[0]
        chosen.append(best)
        remaining.remove(best)
    return sorted(chosen)
