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


def _trained(init: str, **block_args) -> tuple[NonLocalBlock, torch.nn.Linear]:
    """A block and a linear classifier of its output at the queries, after a short SGD run."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    block = NonLocalBlock(CHANNELS, sub_sample=False, init=init, **block_args)
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
    return block.eval(), head


def _train(init: str) -> tuple[float, float]:
    """Partner mass (mean over queries) and accuracy after a short SGD run."""
    block, head = _trained(init)
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


def test_disentangled_pairwise_term_carries_the_partner():
    # DNL's whitened pairwise term relates each query to its own key; its unary term, the same
    # for every query, cannot tell the two keys apart (GCNet's global context is all it can be).
    # Temperature 0.2 with unit-variance logits (0.05, DNL's, makes them near one-hot here).
    block, head = _trained("fan_in", pairwise="disentangled", temperature=0.2)
    x, positions, _ = _maps(64, torch.Generator().manual_seed(99))
    partner, decoy, unary_partner, unary_decoy = [], [], [], []
    with torch.no_grad():
        for i in range(64):
            flat = x[i : i + 1].flatten(2)
            keys, _, _ = block._keys_values(x[i : i + 1], flat)
            queries = block.pairwise_fn.embed_queries(
                flat, block.theta.weight, block.theta.bias, None
            )
            pairwise, unary = block.pairwise_fn.terms(queries[..., positions[i, :2]], keys)
            for j in range(2):
                own, other = positions[i, 2 + j], positions[i, 3 - j]
                partner.append(float(pairwise[0, j, own]))
                decoy.append(float(pairwise[0, j, other]))
                unary_partner.append(float(unary[0, j, own]))
                unary_decoy.append(float(unary[0, j, other]))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert mean(partner) > 3 * UNIFORM and mean(partner) > 3 * mean(decoy), (partner, decoy)
    # over both queries of a map, the unary term gives each key the same mass as partner and
    # as decoy: it carries none of the relation
    assert mean(unary_partner) == pytest.approx(mean(unary_decoy))
