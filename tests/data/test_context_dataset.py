"""The context datasets: deterministic COCO-format splits in which an object's category is set
only by a cue at least MIN_CUE_DISTANCE px away, Chebyshev, from the disc's centre to the cue's
nearest pixel (or, in the local controls, by its own outline)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from nl_detectron.data import CONTEXT_CLASSES, CONTEXT_SPLITS, CONTEXT_VARIANTS
from nl_detectron.data.context import (
    IMAGE_SIZE,
    KEY_SIZE,
    MIN_CUE_DISTANCE,
    ensure_context_split,
    generate_context_split,
    render_context_image,
)
from nl_detectron.data.generated import GeneratedSplit


def _digest(directory) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("variant", CONTEXT_VARIANTS)
def test_generation_is_deterministic_coco(variant, tmp_path):
    split = GeneratedSplit(f"nl_context_{variant}_val", 4, 123)
    generate_context_split(split, tmp_path / "a")
    generate_context_split(split, tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    dicts = load_coco_json(str(tmp_path / "a" / "annotations.json"), str(tmp_path / "a" / "images"))
    assert len(dicts) == 4 and all(d["annotations"] for d in dicts)
    assert all(len(a["segmentation"][0]) == 64 for d in dicts for a in d["annotations"])


def _band_distance(center, side):
    x, y = center
    return (y - 12, IMAGE_SIZE - 12 - x, IMAGE_SIZE - 12 - y, x - 12)[side]


@pytest.mark.parametrize("variant", CONTEXT_VARIANTS)
def test_the_cue_is_far_and_decides_the_category(variant):
    rng = np.random.default_rng(0)
    agree = []
    for _ in range(60):
        _, layout = render_context_image(rng, variant)
        discs = layout["discs"]
        if variant.startswith("image"):
            side = layout["band"]["side"]
            assert all(_band_distance(d["center"], side) >= MIN_CUE_DISTANCE for d in discs)
            agree += [d["category"] == layout["band"]["color"] for d in discs]
        else:
            assert len(discs) == 2 and discs[0]["category"] != discs[1]["category"]
            for disc in discs:
                (key,) = [k for k in layout["keys"] if k["mark"] == disc["mark"]]
                for other in discs:  # every key pixel is far from both discs
                    (kx, ky), (ox, oy) = key["center"], other["center"]
                    gap = max(abs(kx - ox), abs(ky - oy)) - KEY_SIZE / 2
                    assert gap >= MIN_CUE_DISTANCE
                agree.append(disc["category"] == key["color"])
    if variant.endswith("local"):  # the distant cue carries nothing: about 1 in 3 by chance
        assert 0.15 < np.mean(agree) < 0.55
    else:  # the distant cue is the category
        assert all(agree)


def test_splits_are_registered_and_generated_on_first_use(tmp_path):
    names = {s.name for s in CONTEXT_SPLITS}
    assert {f"nl_context_{v}_{p}" for v in CONTEXT_VARIANTS for p in ("train", "val")} == names
    assert names <= set(DatasetCatalog.list())
    assert MetadataCatalog.get("nl_context_pair_val").thing_classes == list(CONTEXT_CLASSES)
    split = GeneratedSplit("nl_context_pair_val", 2, 6001)
    directory = ensure_context_split(split, tmp_path)
    assert (directory / "layout.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [directory.name]  # no temporary left


def test_marks_pretext_labels_marks_not_categories(tmp_path):
    # The fine-tuning pretext: every disc and key tile labelled by its kind and mark; key colours
    # random (no category is named or implied), the pairs' geometry as in `pair`.
    from nl_detectron.data import MARKS_CLASSES, MARKS_SPLITS

    split = GeneratedSplit("nl_context_marks_val", 6, 321)
    generate_context_split(split, tmp_path / "marks")
    dicts = load_coco_json(
        str(tmp_path / "marks" / "annotations.json"), str(tmp_path / "marks" / "images")
    )
    import json

    layouts = json.loads((tmp_path / "marks" / "layout.json").read_text())
    for record, layout in zip(dicts, layouts):
        discs, keys = layout["discs"], layout["keys"]
        assert len(record["annotations"]) == len(discs) + len(keys) == 4
        labels = sorted(a["category_id"] - 1 for a in record["annotations"])  # COCO ids from 1
        # discs by their mark (0-2), keys by 3 + mark: the same marks on both kinds
        assert labels == sorted([d["mark"] for d in discs] + [3 + k["mark"] for k in keys])
        assert {d["mark"] for d in discs} == {k["mark"] for k in keys}
    colours = [k["color"] for layout in layouts for k in layout["keys"]]
    categories = [d["category"] for layout in layouts for d in layout["discs"]]
    assert colours != categories  # key colours are drawn at random, not the discs' categories
    assert MetadataCatalog.get(MARKS_SPLITS[0].name).thing_classes == list(MARKS_CLASSES)


def test_marks_colours_pretext_adds_the_key_colour_to_the_same_images(tmp_path):
    # The second pretext: the marks pretext's images (same seeds), each key labelled by its mark
    # and colour; a disc still by its mark alone, so no label gives a disc's category.
    import json

    from nl_detectron.data import MARKS_COLOURS_CLASSES

    for variant in ("marks", "marks_colours"):
        generate_context_split(
            GeneratedSplit(f"nl_context_{variant}_val", 4, 321), tmp_path / variant
        )
    for index in range(4):
        name = f"{index:05d}.png"
        assert (tmp_path / "marks" / "images" / name).read_bytes() == (
            tmp_path / "marks_colours" / "images" / name
        ).read_bytes()
    dicts = load_coco_json(
        str(tmp_path / "marks_colours" / "annotations.json"),
        str(tmp_path / "marks_colours" / "images"),
    )
    layouts = json.loads((tmp_path / "marks_colours" / "layout.json").read_text())
    for record, layout in zip(dicts, layouts):
        names = sorted(MARKS_COLOURS_CLASSES[a["category_id"] - 1] for a in record["annotations"])
        marks = ("hbar", "vbar", "ring")
        expected = [f"disc {marks[d['mark']]}" for d in layout["discs"]] + [
            f"key {marks[k['mark']]} {CONTEXT_CLASSES[k['color']]}" for k in layout["keys"]
        ]
        assert names == sorted(expected)
    assert MetadataCatalog.get("nl_context_marks_colours_val").thing_classes == list(
        MARKS_COLOURS_CLASSES
    )
