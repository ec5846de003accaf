"""The pairwise variant of the context data, small and at the block: a query's category is that of
a key elsewhere with the same mark, and two queries of different categories share each map, so
only position-to-position matching solves it. Trained briefly, the block's attention from a
query puts far more than uniform mass on its partner, and classifies it; with the released
code's init (std 0.01) the logits start near 0, neither theta nor phi gets a first-order
gradient, and the attention stays uniform (docs/evidence.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nl_detectron.layers import NonLocalBlock

SIDE, CHANNELS, STEPS = 8, 16, 60


def _maps(n: int, gen: torch.Generator):
    """``n`` feature maps ``(n, C, 8, 8)``: two queries (a mark in channels 0-2, a flag in 3)
    and their two keys (the same marks, a flag in 4, the category in 5-7) at random positions,
    on noise; returns the maps, the positions ``(n, 4)`` (queries, then their keys) and the
    queries' categories ``(n, 2)``."""
    x = torch.randn(n, CHANNELS, SIDE * SIDE, generator=gen) * 0.1
    positions = torch.stack([torch.randperm(SIDE * SIDE, generator=gen)[:4] for _ in range(n)])
    marks = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(n)])
    categories = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(n)])
    b = torch.arange(n)
    for j in range(2):
        query, key = positions[:, j], positions[:, 2 + j]
        x[b, marks[:, j], query] += 1.0
        x[b, 3, query] += 1.0
        x[b, marks[:, j], key] += 1.0
        x[b, 4, key] += 1.0
        x[b, 5 + categories[:, j], key] += 1.0
    return x.view(n, CHANNELS, SIDE, SIDE), positions, categories


def _train(init: str) -> tuple[float, float]:
    """Partner mass (mean over queries) and accuracy after a short SGD run."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    block = NonLocalBlock(CHANNELS, sub_sample=False, init=init)
    head = torch.nn.Linear(CHANNELS, 3)
    optimizer = torch.optim.SGD([*block.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    for _ in range(STEPS):
        x, positions, categories = _maps(32, gen)
        y = block(x).flatten(2)
        b = torch.arange(32)
        features = torch.cat([y[b, :, positions[:, j]] for j in range(2)])
        loss = F.cross_entropy(head(features), categories.t().flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    block.eval()
    x, positions, categories = _maps(64, torch.Generator().manual_seed(99))
    with torch.no_grad():
        masses = []
        for i in range(64):
            rows, _ = block.affinity(x[i : i + 1], positions[i, :2])
            masses += [float(rows[0, j, positions[i, 2 + j]]) for j in range(2)]
        y = block(x).flatten(2)
        b = torch.arange(64)
        predicted = torch.stack([head(y[b, :, positions[:, j]]).argmax(1) for j in range(2)], 1)
    return sum(masses) / len(masses), float((predicted == categories).float().mean())


UNIFORM = 1 / (SIDE * SIDE)


def test_attention_finds_the_partner_with_unit_variance_logits():
    mass, accuracy = _train("fan_in")
    assert mass > 3 * UNIFORM, mass
    assert accuracy > 0.6, accuracy  # a summary of the map gives at most 0.5


@pytest.mark.slow
def test_attention_stays_uniform_with_the_released_init():
    mass, accuracy = _train("normal")
    assert mass == pytest.approx(UNIFORM, rel=0.05)
    assert accuracy < 0.55
