"""The attention statistics of the context benchmark (nl_detectron.evaluation.attention_stats):
which key cells a cue covers, and what the statistics say of a fresh NL model (an identity with
a uniform map) and of a map that looks only at each disc's cue."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from training_runs import REPO

from nl_detectron.data.context import ensure_context_split
from nl_detectron.data.generated import GeneratedSplit
from nl_detectron.engine import Trainer
from nl_detectron.evaluation.attention_stats import context_attention_stats, cue_cells
from nl_detectron.layers import non_local_blocks

NL_CONFIG = REPO / "configs" / "context" / "mask_rcnn_nl_context.yaml"


def test_cue_cells_of_a_band_and_of_a_key():
    # 12 x 12 key grid on the 192 px image: cells of 16 px.
    top_band = cue_cells({"band": {"side": 0, "color": 0}, "discs": []}, {}, (12, 12))
    assert top_band[0].all() and not top_band[1:].any()  # the band is 12 px high
    right_band = cue_cells({"band": {"side": 1, "color": 0}, "discs": []}, {}, (12, 12))
    assert right_band[:, -1].all() and not right_band[:, :-1].any()
    layout = {"keys": [{"center": (100, 60), "mark": 2}, {"center": (20, 20), "mark": 0}]}
    cells = cue_cells(layout, {"mark": 2}, (12, 12))  # the key spans x 90-110, y 50-70
    assert sorted(zip(*np.nonzero(cells))) == [(3, 5), (3, 6), (4, 5), (4, 6)]


def _model_and_split(tmp_path, variant: str, init: str = "normal", opts=()):
    from nl_detectron.config import load_config

    cfg = load_config(str(NL_CONFIG), ["MODEL.DEVICE", "cpu", "MODEL.NONLOCAL.INIT", init, *opts])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    split = GeneratedSplit(f"nl_context_{variant}_val", 3, 77)
    ensure_context_split(split, tmp_path)
    return model, split


def test_a_fresh_fan_in_block_is_an_identity_with_a_peaked_map(tmp_path):
    # The context config's init: unit-variance affinities, the gate still closed.
    model, split = _model_and_split(tmp_path, "pair", init="fan_in")
    (stats,) = context_attention_stats(model, split, num_images=3, root=tmp_path)
    assert stats.gate == 0.0 and stats.branch == 0.0
    assert stats.entropy < 0.97


@pytest.mark.parametrize("variant", ["image", "pair"])
def test_a_fresh_block_is_an_identity_with_a_uniform_map(tmp_path, variant):
    # The released init (std 0.01): affinities near 0, a near-uniform map.
    model, split = _model_and_split(tmp_path, variant)
    (stats,) = context_attention_stats(model, split, num_images=3, root=tmp_path)
    assert stats.gate == 0.0 and stats.branch == 0.0
    assert stats.entropy > 0.99
    assert stats.cue_mass == pytest.approx(stats.uniform_mass, abs=0.02)
    assert 0 < stats.uniform_mass < 0.5
    if variant == "pair":  # a uniform map: as much on the other disc's key as on its own
        assert stats.decoy_mass == pytest.approx(stats.cue_mass, abs=0.02)
    assert stats.query_dependence < 0.05


def test_a_map_on_each_disc_s_cue_gives_all_its_mass_to_the_cue(tmp_path, monkeypatch):
    model, split = _model_and_split(tmp_path, "pair")
    directory = ensure_context_split(split, tmp_path)
    layouts = iter(json.loads((directory / "layout.json").read_text()))
    ((_, block),) = non_local_blocks(model)

    def looks_at_the_cue(x, query):
        layout = next(layouts)
        h, w = x.shape[2] // 2, x.shape[3] // 2  # keys after the block's 2 x 2 pooling
        rows = torch.stack([
            torch.as_tensor(cue_cells(layout, disc, (h, w)), dtype=torch.float32).flatten()
            for disc in layout["discs"]
        ])  # fmt: skip
        assert len(query) == len(rows)
        return (rows / rows.sum(1, keepdim=True))[None], (h, w)

    monkeypatch.setattr(block, "affinity", looks_at_the_cue)
    (stats,) = context_attention_stats(model, split, num_images=3, root=tmp_path)
    assert stats.cue_mass == pytest.approx(1.0)
    assert stats.decoy_mass == 0.0  # nothing on the other disc's key
    assert stats.query_dependence == pytest.approx(1.0)  # the two discs' keys are apart
    assert stats.entropy < 0.5


def test_a_disentangled_block_is_measured_with_and_without_its_unary_term(tmp_path):
    model, split = _model_and_split(
        tmp_path, "pair", "fan_in", ["MODEL.NONLOCAL.PAIRWISE", "disentangled"]
    )
    both, pairwise = context_attention_stats(model, split, num_images=3, root=tmp_path)
    assert pairwise.block == both.block + ":pairwise"
    # the unary term is the same for every query: it only dilutes the query dependence
    assert pairwise.query_dependence > both.query_dependence > 0
