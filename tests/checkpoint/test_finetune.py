"""Fine-tuning a pretrained detector with non-local blocks.

A vanilla Mask / Keypoint R-CNN checkpoint (Detectron2 ``.pth`` with optimizer state, model-zoo
``.pkl``) loads into the NL model through ``NonLocalCheckpointer``, the loader of the trainer:
the NL model then predicts bit for bit what the vanilla one did, one SGD step later its blocks
have learnt and its predictions differ. Bad files and wrong architectures are reported clearly,
and resuming from another model's checkpoint is refused.
"""

from __future__ import annotations

import logging
import pickle
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, Keypoints
from detectron2.utils.events import EventStorage
from tiny_detectors import tiny_cfg
from training_runs import REPO, train_net

from nl_detectron import NonLocalBlock
from nl_detectron.checkpoint import NonLocalCheckpointer
from nl_detectron.config import load_config
from nl_detectron.data import SHAPES_SPLITS, register_shapes_datasets
from nl_detectron.engine import Trainer
from nl_detectron.errors import CheckpointError

# (backbone layout, heads, NL norm, ResNet norm); the C4 ROI head supports no keypoint head.
CASES = {
    "mask_rcnn_FPN": ("FPN", "mask", "GN", "BN"),
    "keypoint_rcnn_FPN": ("FPN", "keypoint", "BN", "BN"),
    "mask_rcnn_C4": ("C4", "mask", "SyncBN", "BN"),
}
SIZES = [(64, 80), (72, 72), (56, 96)]  # (H, W) of the test images


def _cfgs(case: str) -> tuple[CfgNode, CfgNode]:
    """Tiny vanilla and NL configs, identical but for the NL blocks."""
    arch, heads, nl_norm, resnet_norm = CASES[case]
    cfgs = []
    for non_local in (False, True):
        cfg = tiny_cfg(arch, non_local=non_local)
        cfg.MODEL.RESNETS.NORM = resnet_norm
        cfg.MODEL.MASK_ON = heads == "mask"
        cfg.MODEL.KEYPOINT_ON = heads == "keypoint"
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3 if heads == "mask" else 1
        if arch == "FPN":
            cfg.MODEL.FPN.NORM = "GN"
            cfg.MODEL.ROI_MASK_HEAD.NORM = "GN"
        # Every box, so that each image has detections to compare.
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
        if non_local:
            cfg.MODEL.NONLOCAL.NORM = nl_norm
            cfg.MODEL.ROI_KEYPOINT_HEAD.NAME = "NonLocalKRCNNConvDeconvUpsampleHead"
            if arch == "FPN":
                cfg.MODEL.ROI_MASK_HEAD.NAME = "NonLocalMaskRCNNConvUpsampleHead"
                cfg.MODEL.NONLOCAL.MASK_HEAD_POSITIONS = [2]
        cfgs.append(cfg)
    return cfgs[0], cfgs[1]


def _expected_blocks(case: str) -> list[str]:
    arch, heads, _, _ = CASES[case]
    resnet = "backbone.bottom_up" if arch == "FPN" else "backbone"
    blocks = [f"{resnet}.res4.non_local_before_5"]
    if heads == "mask" and arch == "FPN":
        blocks.append("roi_heads.mask_head.non_local_after_mask_fcn2")
    if heads == "keypoint":
        blocks += [f"roi_heads.keypoint_head.non_local_after_conv_fcn{k}" for k in (2, 4, 6, 8)]
    return blocks


def _train_norms(model: torch.nn.Module, case: str) -> None:
    """Give the norms the state of a trained model: batch statistics of real activations in
    BN's running averages, affine parameters away from their init. Defaults would equal those
    of a freshly built model, so loading them would go unseen; and BN in eval mode with its
    initial statistics lets random-weight activations grow through the ResNet until the
    predictions saturate."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "norm" in name:
                noise = torch.rand(tensor.shape, generator=g) - 0.5
                tensor.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the batches below
        model.train()
        for seed in range(3):
            torch.manual_seed(seed)
            with EventStorage():
                model(_training_batch(case))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.1


def _models(case: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A vanilla model with random weights and the NL model, built from another seed."""
    vanilla_cfg, cfg = _cfgs(case)
    torch.manual_seed(0)
    vanilla = build_model(vanilla_cfg)
    _train_norms(vanilla, case)
    torch.manual_seed(1)
    return vanilla, build_model(cfg)


def _save_like_a_trainer(model: torch.nn.Module, save_dir) -> str:
    """``model_final.pth`` as Detectron2 training writes it: weights, optimizer state with
    momentum, iteration. Returns its path."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the momentum buffers; zero gradients leave the weights alone
    DetectionCheckpointer(model, str(save_dir), optimizer=optimizer).save(
        "model_final", iteration=99
    )
    return str(save_dir / "model_final.pth")


def _images() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {"image": torch.rand(3, h, w, generator=g) * 255, "height": h, "width": w} for h, w in SIZES
    ]


def _predict(model: torch.nn.Module) -> list[Instances]:
    model.eval()
    with torch.no_grad():
        return [model([image])[0]["instances"] for image in _images()]


def _fields(instances: Instances) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in instances.get_fields().items():
        out[name] = value.tensor if isinstance(value, Boxes) else value
    return out


def _assert_same_predictions(expected: list[Instances], got: list[Instances], case: str) -> None:
    heads = CASES[case][1]
    wanted = {"pred_boxes", "scores", "pred_classes"}
    wanted |= {"pred_masks"} if heads == "mask" else {"pred_keypoints", "pred_keypoint_heatmaps"}
    for a, b in zip(expected, got):
        a, b = _fields(a), _fields(b)
        assert set(a) == set(b) and wanted <= set(a)
        assert len(a["scores"]) > 0
        for name in a:
            assert torch.equal(a[name], b[name]), name


def _training_batch(case: str) -> list[dict]:
    h, w = SIZES[0]
    boxes = torch.tensor([[6.0, 8.0, 40.0, 44.0], [44.0, 20.0, 76.0, 60.0]])
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.tensor([2, 0]) if CASES[case][1] == "mask" else torch.tensor([0, 0])
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    keypoints = torch.zeros(2, 17, 3)
    for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        masks[i, y0:y1, x0:x1] = True
        keypoints[i, :, 0] = torch.linspace(x0 + 1, x1 - 1, 17)
        keypoints[i, :, 1] = torch.linspace(y0 + 1, y1 - 1, 17)
        keypoints[i, :, 2] = 2
    inst.gt_masks = BitMasks(masks)
    inst.gt_keypoints = Keypoints(keypoints)
    image = _images()[0]
    return [dict(image, instances=inst), dict(image, image=image["image"].flip(-1), instances=inst)]


@pytest.fixture
def report_log(caplog):
    """The records of ``nl_detectron.checkpoint``, whether or not its logger propagates."""
    log = logging.getLogger("nl_detectron.checkpoint")
    saved = log.level, log.propagate
    log.addHandler(caplog.handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # each record once, in caplog's handler
    yield caplog
    log.removeHandler(caplog.handler)
    log.level, log.propagate = saved


# ------------------------------------------------------------------------------------------------
# A vanilla checkpoint in, the vanilla predictions out; then the blocks learn.


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_vanilla_checkpoint_gives_the_vanilla_predictions_then_the_blocks_learn(
    case, tmp_path, report_log
):
    vanilla, model = _models(case)
    path = _save_like_a_trainer(vanilla, tmp_path)

    # The trainer's path for MODEL.WEIGHTS (resume=False: weights only, iteration 0).
    checkpointer = NonLocalCheckpointer(model, str(tmp_path / "finetune"))
    assert checkpointer.resume_or_load(path, resume=False)["iteration"] == 99
    report = checkpointer.report
    blocks = _expected_blocks(case)
    assert list(report.new_non_local) == blocks
    for block in blocks:
        own = [k for k in model.state_dict() if k.startswith(block + ".")]
        assert len(report.new_non_local[block]) == len(own)
    assert not report.has_problems and report.warning() == ""
    assert report.missing == report.unexpected == report.incorrect_shapes == []
    assert report.num_loaded == len(vanilla.state_dict())
    assert f"{len(blocks)} non-local block(s)" in report.summary()
    assert "non_local_before_5" in report_log.text and "CHECKPOINT MISMATCH" not in report_log.text
    loaded = model.state_dict()
    for key, value in vanilla.state_dict().items():
        assert torch.equal(loaded[key], value), key

    _assert_same_predictions(_predict(vanilla), _predict(model), case)

    # One identical SGD step for both: the blocks are identities, so the losses and every
    # vanilla parameter's update are the same; only the NL parameters differ afterwards.
    nl_params = {
        f"{name}.{p_name}": p
        for name, m in model.named_modules()
        if isinstance(m, NonLocalBlock)
        for p_name, p in m.named_parameters()
    }
    before = {k: p.detach().clone() for k, p in nl_params.items()}
    losses = []
    for m in (vanilla, model):
        m.train()
        optimizer = torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9)
        torch.manual_seed(2)  # the same RoI sampling
        with EventStorage():
            loss_dict = m(_training_batch(case))
        sum(loss_dict.values()).backward()
        optimizer.step()
        losses.append(loss_dict)
    assert losses[0].keys() == losses[1].keys()
    for name in losses[0]:
        assert torch.equal(losses[0][name], losses[1][name]), name
    for block in blocks:
        gamma = dict(model.named_parameters())[f"{block}.out_norm.weight"]
        assert gamma.grad.abs().sum() > 0, block
    changed = [k for k, p in nl_params.items() if not torch.equal(p, before[k])]
    assert {k.rsplit(".", 2)[0] for k in changed if k.endswith("out_norm.weight")} == set(blocks)
    params = dict(model.named_parameters())
    for name, p in vanilla.named_parameters():
        assert torch.equal(p, params[name]), name

    # Each block now changes its input, and so the predictions change.
    changes: dict[str, float] = {}

    def record(block: str):
        def hook(module, inputs, output) -> None:
            changes.setdefault(block, (output - inputs[0]).abs().max().item())

        return hook

    for block in blocks:
        model.get_submodule(block).register_forward_hook(record(block))
    expected, got = _predict(vanilla), _predict(model)
    assert set(changes) == set(blocks) and min(changes.values()) > 0, changes
    assert all(len(a) > 0 and len(b) > 0 for a, b in zip(expected, got))
    assert any(
        not torch.equal(a.scores, b.scores)
        or not torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        for a, b in zip(expected, got)
    )


@pytest.mark.parametrize("case", ["mask_rcnn_FPN", "keypoint_rcnn_FPN"])
def test_model_zoo_pkl_loads_with_only_the_non_local_blocks_new(case, tmp_path):
    vanilla, model = _models(case)
    # How Detectron2 model-zoo files (model_final_*.pkl) are laid out.
    zoo = {
        "model": {k: v.numpy() for k, v in vanilla.state_dict().items()},
        "__author__": "Detectron2 Model Zoo",
        "matching_heuristics": True,
    }
    with open(tmp_path / "model_final_abc123.pkl", "wb") as f:
        pickle.dump(zoo, f)

    checkpointer = NonLocalCheckpointer(model)
    checkpointer.load(str(tmp_path / "model_final_abc123.pkl"), checkpointables=[])
    report = checkpointer.report
    assert list(report.new_non_local) == _expected_blocks(case)
    assert not report.has_problems and report.from_scratch == []
    assert "Detectron2 Model Zoo" in report.source
    _assert_same_predictions(_predict(vanilla), _predict(model), case)


def test_imagenet_backbone_checkpoint_reports_heads_from_scratch_without_a_warning(
    tmp_path, report_log
):
    vanilla, model = _models("mask_rcnn_FPN")
    resnet = {k: v.numpy() for k, v in vanilla.backbone.bottom_up.state_dict().items()}
    # An ImageNet classifier's extras that no detector uses (Caffe2 R-50.pkl has both).
    resnet["fc1000.weight"] = torch.zeros(1000, 256).numpy()
    resnet["stem.conv1.bias"] = torch.zeros(8).numpy()
    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump({"model": resnet, "__author__": "torchvision", "matching_heuristics": True}, f)

    checkpointer = NonLocalCheckpointer(model)
    checkpointer.load(str(tmp_path / "R-50.pkl"), checkpointables=[])
    report = checkpointer.report
    assert list(report.new_non_local) == _expected_blocks("mask_rcnn_FPN")
    assert report.ignored == ["fc1000.weight", "stem.conv1.bias"]
    scratch_modules = {k.split(".")[0] for k in report.from_scratch}
    assert scratch_modules == {"backbone", "proposal_generator", "roi_heads"}
    assert all(not k.startswith("backbone.bottom_up.") for k in report.from_scratch)
    assert not report.has_problems and "CHECKPOINT MISMATCH" not in report_log.text
    assert "trained from their init" in report.summary()


# ------------------------------------------------------------------------------------------------
# The wrong architecture: loaded as far as it fits, with a loud report of the rest.


def test_r101_checkpoint_into_r50_model_is_reported_loudly(tmp_path, report_log):
    r101_cfg, cfg = _cfgs("mask_rcnn_FPN")
    r101_cfg.MODEL.RESNETS.DEPTH = 101
    r101_cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5  # and another dataset's classes
    DetectionCheckpointer(build_model(r101_cfg), str(tmp_path)).save("r101")
    model = build_model(cfg)

    checkpointer = NonLocalCheckpointer(model)
    checkpointer.load(str(tmp_path / "r101.pth"), checkpointables=[])
    report = checkpointer.report
    assert report.has_problems
    # res4 of R101 has blocks 0..22, R50's 0..5: 17 blocks of 3 convs with a BN (5 tensors) each
    skipped_blocks = {".".join(k.split(".")[:4]) for k in report.unexpected}
    assert skipped_blocks == {f"backbone.bottom_up.res4.{i}" for i in range(6, 23)}
    assert len(report.unexpected) == 17 * 3 * (1 + 5)
    assert {name for name, _, _ in report.incorrect_shapes} == {
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.mask_head.predictor.weight",
        "roi_heads.mask_head.predictor.bias",
    }
    assert ("roi_heads.box_predictor.cls_score.weight", (6, 32), (4, 32)) in report.incorrect_shapes
    assert set(report.missing) == {k for k, _, _ in report.incorrect_shapes}
    warnings = [r for r in report_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "CHECKPOINT MISMATCH" in message and str(tmp_path / "r101.pth") in message
    assert "306 checkpoint tensors have no place in this model and were SKIPPED" in message
    assert "backbone.bottom_up.res4.22.*  (18 tensors)" in message
    assert "(6, 32) in the checkpoint, (4, 32) in the model" in message
    assert "MODEL.RESNETS.DEPTH" in message


# ------------------------------------------------------------------------------------------------
# Files that are not checkpoints.


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    vanilla, _ = _models("mask_rcnn_C4")
    path = _save_like_a_trainer(vanilla, tmp_path_factory.mktemp("ckpt"))
    with open(path, "rb") as f:
        return f.read()


def _load_error(path, model=None) -> str:
    model = model or build_model(_cfgs("mask_rcnn_C4")[1])
    with pytest.raises(CheckpointError) as info:
        NonLocalCheckpointer(model).resume_or_load(str(path), resume=False)
    return str(info.value)


def test_missing_path_and_directory(tmp_path):
    message = _load_error(tmp_path / "nope" / "model_final.pth")
    assert f"'{tmp_path / 'nope' / 'model_final.pth'}' does not exist" in message
    assert "MODEL.WEIGHTS" in message
    message = _load_error(tmp_path)
    assert "is a directory" in message and str(tmp_path / "model_final.pth") in message


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_text_file_is_not_a_checkpoint(tmp_path, suffix):
    path = tmp_path / f"metrics{suffix}"
    path.write_text('{"iteration": 99, "segm/AP": 12.5}\n')
    message = _load_error(path)
    assert message.startswith(f'{path} is not a checkpoint: it starts with b\'{{"iteration"')
    assert "text" in message and "weights_only" not in message


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_truncated_file(tmp_path, checkpoint_bytes, suffix):
    if suffix == ".pkl":
        data = pickle.dumps({"model": {"w": torch.ones(1000).numpy()}, "__author__": "x"})
    else:
        data = checkpoint_bytes
    path = tmp_path / f"model_final{suffix}"
    path.write_bytes(data[: len(data) // 2])
    message = _load_error(path)
    assert message.startswith(f"Checkpoint {path} is truncated or corrupt")
    assert "download it again" in message
    path.write_bytes(b"")
    assert "is an empty file" in _load_error(path)


def test_checkpoint_without_model_weights(tmp_path):
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "iteration": 5}, tmp_path / "o.pth")
    message = _load_error(tmp_path / "o.pth")
    assert f"Checkpoint {tmp_path / 'o.pth'} holds no model weights" in message
    assert "[iteration, optimizer]" in message
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    assert "holds a list, not model weights" in _load_error(tmp_path / "list.pth")


def test_pth_with_arbitrary_objects_is_refused_by_the_safe_loader(tmp_path):
    # e.g. numpy arrays: unpickling them runs code that torch.load(weights_only=True) refuses.
    torch.save({"model": {"w": torch.ones(2).numpy()}}, tmp_path / "numpy.pth")
    message = _load_error(tmp_path / "numpy.pth")
    assert "holds Python objects other than tensors (first: numpy" in message
    assert "If you trust the file" in message


# ------------------------------------------------------------------------------------------------
# Resuming from another model's checkpoint.


def test_resume_from_a_vanilla_checkpoint_is_refused_before_restoring_the_optimizer(tmp_path):
    vanilla, model = _models("mask_rcnn_FPN")
    path = _save_like_a_trainer(vanilla, tmp_path)  # also writes tmp_path/last_checkpoint
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    checkpointer = NonLocalCheckpointer(model, str(tmp_path), optimizer=optimizer)
    with pytest.raises(CheckpointError) as info:
        checkpointer.resume_or_load("", resume=True)
    message = str(info.value)
    assert message.startswith(f"Cannot resume training from {path}: it was written by another")
    assert "it has none of the 2 non-local blocks (backbone.bottom_up.res4.non_local_before_5" in (
        message
    )
    n_vanilla, n_nl = len(list(vanilla.parameters())), len(list(model.parameters()))
    assert (
        f"the optimizer state checkpoint['optimizer'] has 1 parameter group(s) of {n_vanilla} "
        f"parameters ({n_vanilla} in all), this model's optimizer has 1 of {n_nl} ({n_nl})"
    ) in message
    assert f"pass MODEL.WEIGHTS {path} without --resume, with a new OUTPUT_DIR" in message
    assert optimizer.state_dict()["state"] == {}  # not restored


def test_resume_with_another_optimizer_grouping_is_refused(tmp_path):
    _, model = _models("mask_rcnn_C4")
    _save_like_a_trainer(model, tmp_path)  # this model, one parameter group
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    others = [p for n, p in model.named_parameters() if "norm" not in n]
    optimizer = torch.optim.SGD([{"params": others}, {"params": norms, "weight_decay": 0.0}], lr=1)
    checkpointer = NonLocalCheckpointer(model, str(tmp_path), optimizer=optimizer)
    with pytest.raises(CheckpointError) as info:
        checkpointer.resume_or_load("", resume=True)
    assert (
        f"has 1 parameter group(s) of {len(others) + len(norms)} parameters "
        f"({len(others) + len(norms)} in all), this model's optimizer has 2 of "
        f"{len(others)}/{len(norms)}"
    ) in str(info.value)
    assert "non-local blocks" not in str(info.value)  # the weights themselves fit


def test_resume_from_this_models_checkpoint_restores_the_optimizer(tmp_path):
    _, model = _models("mask_rcnn_C4")
    path = _save_like_a_trainer(model, tmp_path)
    saved = torch.load(path, weights_only=True)["optimizer"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    checkpointer = NonLocalCheckpointer(model, str(tmp_path), optimizer=optimizer)
    extra = checkpointer.resume_or_load("", resume=True)
    assert extra["iteration"] == 99
    assert checkpointer.report.num_loaded == checkpointer.report.num_tensors
    restored = optimizer.state_dict()["state"]
    assert restored.keys() == saved["state"].keys() and len(restored) > 0
    for index, state in saved["state"].items():
        assert torch.equal(restored[index]["momentum_buffer"], state["momentum_buffer"])


# ------------------------------------------------------------------------------------------------
# End to end: the trainer and tools/train_net.py on the bundled shapes data.

QUICKSTART = REPO / "configs" / "quickstart"
# 4 iterations of 2 images on the 16-image split, evaluated on it once, at the end; every box
# is kept so that the predictions are many.
TINY = [
    "DATASETS.TRAIN", "('nl_shapes_mini',)",
    "DATASETS.TEST", "('nl_shapes_mini',)",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "4",
    "SOLVER.STEPS", "(3,)",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "TEST.EVAL_PERIOD", "0",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


def _train_net(args: list[str], data: Path) -> subprocess.CompletedProcess:
    return train_net(*args, config=None, data_root=data)


def _copypaste(log: str) -> dict[str, list[str]]:
    """The AP tables of detectron2's copypaste lines: task -> [names line, values line]."""
    lines = [line.split("copypaste: ")[1] for line in log.splitlines() if "copypaste: " in line]
    return {lines[i][len("Task: ") :]: lines[i + 1 : i + 3] for i in range(0, len(lines), 3)}


@pytest.mark.slow
def test_train_net_fine_tune_starts_from_the_vanilla_evaluation(tmp_path):
    vanilla_dir, nl_dir = tmp_path / "vanilla", tmp_path / "nl_eval"
    proc = _train_net(
        [
            "--config-file", str(QUICKSTART / "mask_rcnn_baseline_shapes.yaml"), *TINY,
            "OUTPUT_DIR", str(vanilla_dir),
        ],
        tmp_path / "data",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = vanilla_dir / "model_final.pth"
    # The NL model with the vanilla weights: the fine-tune's model at iteration 0.
    proc = _train_net(
        [
            "--config-file", str(QUICKSTART / "mask_rcnn_nl_shapes.yaml"), "--eval-only", *TINY,
            "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(nl_dir),
        ],
        tmp_path / "data",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    log = (nl_dir / "log.txt").read_text()
    blocks = re.search(r"Newly initialised: \d+ tensors of (\d+) non-local block\(s\)", log)
    assert blocks and int(blocks.group(1)) >= 2  # in res4 and in the keypoint head
    assert "CHECKPOINT MISMATCH" not in log
    # The vanilla run's final evaluation and the NL evaluation: same predictions, same AP.
    inference = Path("inference") / "nl_shapes_mini"
    expected = torch.load(vanilla_dir / inference / "instances_predictions.pth", weights_only=False)
    got = torch.load(nl_dir / inference / "instances_predictions.pth", weights_only=False)
    assert sum(len(p["instances"]) for p in expected) > 100
    assert got == expected
    tables = _copypaste((vanilla_dir / "log.txt").read_text())
    assert set(tables) == {"bbox", "segm", "keypoints"}
    assert _copypaste(log) == tables

    # --resume in the vanilla run's directory: refused with the fix, no traceback.
    proc = _train_net(
        [
            "--config-file", str(QUICKSTART / "mask_rcnn_nl_shapes.yaml"), "--resume", *TINY,
            "OUTPUT_DIR", str(vanilla_dir),
        ],
        tmp_path / "data",
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert f"error: Cannot resume training from {weights}: it was written by another model" in (
        proc.stderr
    )
    assert f"none of the {blocks.group(1)} non-local blocks" in proc.stderr
    assert "the optimizer state checkpoint['trainer']['_trainer']['optimizer'] has" in proc.stderr
    assert f"pass MODEL.WEIGHTS {weights} without --resume, with a new OUTPUT_DIR" in proc.stderr


@pytest.fixture(scope="module")
def mini_split(tmp_path_factory) -> str:
    """The 16-image shapes split, registered under another name with its data in a temp dir."""
    name = "nl_shapes_mini_finetune_test"
    if name not in DatasetCatalog.list():
        mini = next(s for s in SHAPES_SPLITS if s.name == "nl_shapes_mini")
        register_shapes_datasets(tmp_path_factory.mktemp("data"), [replace(mini, name=name)])
    return name


@pytest.mark.slow
def test_trainer_resume_restores_model_optimizer_scheduler_and_iteration(tmp_path, mini_split):
    tiny = [*TINY, "DATASETS.TRAIN", f"('{mini_split}',)", "DATASETS.TEST", "()"]
    tiny += ["SOLVER.MAX_ITER", "2"]
    cfg = load_config(str(QUICKSTART / "mask_rcnn_nl_shapes.yaml"), tiny)
    cfg.OUTPUT_DIR = str(tmp_path)
    trainer = Trainer(cfg)
    assert isinstance(trainer.checkpointer, NonLocalCheckpointer)
    trainer.resume_or_load(resume=False)
    trainer.train()
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert saved["iteration"] == 1 and saved["trainer"]["iteration"] == 1
    optimizer_state = saved["trainer"]["_trainer"]["optimizer"]
    assert len(optimizer_state["state"]) > 0  # momentum buffers

    cfg.SOLVER.MAX_ITER = 4
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    assert resumed.checkpointer.report.num_loaded == resumed.checkpointer.report.num_tensors
    model_state = resumed.model.state_dict()
    for key, value in saved["model"].items():
        assert torch.equal(model_state[key], value), key
    restored = resumed.optimizer.state_dict()
    assert restored["state"].keys() == optimizer_state["state"].keys()
    for index, state in optimizer_state["state"].items():
        assert torch.equal(restored["state"][index]["momentum_buffer"], state["momentum_buffer"])
    assert resumed.scheduler.last_epoch == saved["trainer"]["hooks"]["LRScheduler"]["last_epoch"]
