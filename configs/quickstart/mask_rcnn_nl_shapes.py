"""The quickstart as a Python (LazyConfig) config: the model, data and schedule of
mask_rcnn_nl_shapes.yaml (a width-cut ResNet-50-FPN Mask R-CNN with a keypoint head, one NL block
before the last res4 block and 4 in the keypoint head, trained from scratch on CPU on the bundled
shapes data), built from Detectron2's model-zoo Python configs.

    python tools/lazyconfig_train_net.py --config-file configs/quickstart/mask_rcnn_nl_shapes.py
"""

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data.detection_utils import create_keypoint_hflip_indices
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import BottleneckBlock, ResNet
from detectron2.modeling.poolers import ROIPooler
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler

from nl_detectron.data import SHAPES_KEYPOINT_OKS_SIGMAS
from nl_detectron.data.checks import CheckedDatasetMapper
from nl_detectron.data.train_loader import ResumableTrainLoader
from nl_detectron.device import default_device
from nl_detectron.engine.lazy_trainer import clipped_sgd
from nl_detectron.evaluation import FastCOCOEvaluator
from nl_detectron.modeling import NonLocalKRCNNConvDeconvUpsampleHead, add_non_local_blocks

_zoo = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
model, train = _zoo.model, _zoo.train

# ResNet-50 with every width cut (stem 32, bottleneck 16, 32, 64, 128), BN (from scratch), and
# the paper's NL block right before the last res4 block.
resnet = model.backbone.bottom_up
resnet.freeze_at = 0
resnet.stem.out_channels = 32
resnet.stem.norm = "BN"
resnet.stages = [
    L(ResNet.make_stage)(
        block_class=BottleneckBlock,
        num_blocks=num_blocks,
        stride_per_block=[1 if i == 0 else 2] + [1] * (num_blocks - 1),
        in_channels=32 * 2**i if i else 32,
        bottleneck_channels=16 * 2**i,
        out_channels=64 * 2**i,
        norm="BN",
        stride_in_1x1=True,
    )
    for i, num_blocks in enumerate([3, 4, 6, 3])
]
model.backbone.bottom_up = L(add_non_local_blocks)(resnet=resnet, positions=["res4:-1"], norm="BN")
model.backbone.update(in_features=["res2", "res3", "res4", "res5"], out_channels=32, norm="BN")
model.pixel_mean, model.pixel_std = [127.5, 127.5, 127.5], [64.0, 64.0, 64.0]

rpn = model.proposal_generator
rpn.head.update(in_channels=32, num_anchors=1)
rpn.anchor_generator.update(sizes=[[16], [32], [64], [128], [256]], aspect_ratios=[1.0])
rpn.update(pre_nms_topk=(1000, 500), post_nms_topk=(128, 100))

heads = model.roi_heads
heads.update(num_classes=3, batch_size_per_image=32)
heads.box_head.update(
    input_shape=ShapeSpec(channels=32, height=7, width=7),
    conv_dims=[32, 32],
    conv_norm="GN",
    fc_dims=[256],
)
heads.box_predictor.input_shape = ShapeSpec(channels=256)
heads.box_predictor.test_topk_per_image = 20
heads.mask_head.update(
    input_shape=ShapeSpec(channels=32, width=14, height=14), conv_dims=[32] * 5, conv_norm="GN"
)
heads.update(
    keypoint_in_features=["p2", "p3", "p4", "p5"],
    keypoint_pooler=L(ROIPooler)(
        output_size=14,
        scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
        sampling_ratio=0,
        pooler_type="ROIAlignV2",
    ),
    keypoint_head=L(NonLocalKRCNNConvDeconvUpsampleHead)(
        input_shape=ShapeSpec(channels=32, width=14, height=14),
        num_keypoints=4,
        conv_dims=[32] * 8,
        non_local_positions=[2, 4, 6, 8],
        non_local_args={"norm": "BN"},
        conv_norm="GN",  # as MODEL.ROI_KEYPOINT_HEAD.NORM of the yacs config
    ),
)

# The bundled shapes data, generated on first use.
dataloader = {
    "train": L(ResumableTrainLoader)(
        dataset_dicts=L(get_detection_dataset_dicts)(names="nl_shapes_train", min_keypoints=1),
        mapper=L(CheckedDatasetMapper)(
            is_train=True,
            augmentations=[
                L(T.ResizeShortestEdge)(
                    short_edge_length=(128,), max_size=256, sample_style="choice"
                ),
                L(T.RandomFlip)(horizontal=True),
            ],
            image_format="BGR",
            use_instance_mask=True,
            use_keypoint=True,
            keypoint_hflip_indices=L(create_keypoint_hflip_indices)(
                dataset_names=["nl_shapes_train"]
            ),
        ),
        total_batch_size=8,
        num_workers=0,
        seed=0,
    ),
    "test": L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names="nl_shapes_val", filter_empty=False),
        mapper=L(CheckedDatasetMapper)(
            is_train=False,
            augmentations=[L(T.ResizeShortestEdge)(short_edge_length=128, max_size=256)],
            image_format="BGR",
        ),
        num_workers=0,
    ),
    "evaluator": L(FastCOCOEvaluator)(
        dataset_name="nl_shapes_val", kpt_oks_sigmas=list(SHAPES_KEYPOINT_OKS_SIGMAS)
    ),
}

# 400 iterations of 8 images at lr 0.08, each parameter's gradient norm clipped to 2.
optimizer = L(clipped_sgd)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=0.08,
    momentum=0.9,
    weight_decay=1e-4,
    clip_value=2.0,
)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[340, 385], num_updates=400
    ),
    warmup_length=100 / 400,
    warmup_factor=0.001,
)
train.update(
    output_dir="output/quickstart_nl_lazy",
    init_checkpoint="",
    max_iter=400,
    eval_period=200,
    checkpointer={"period": 200, "max_to_keep": 100},
    device=default_device(),  # CUDA when there is a GPU, else the CPU
    seed=0,
    precise_bn={"enabled": True, "num_iter": 20},
)
