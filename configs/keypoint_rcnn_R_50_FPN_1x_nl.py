"""Keypoint R-CNN, ResNet-50-FPN, COCO 2017 person keypoints, 1x, with the paper's non-local
blocks (Sec. 6, Table 6): 4 in the 8-conv keypoint head, one after every 2 convs, and one right
before the last res4 block. Detectron2's model-zoo COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.py
with those blocks; evaluated by nl_detectron's COCO evaluator.

    python tools/lazyconfig_train_net.py --config-file configs/keypoint_rcnn_R_50_FPN_1x_nl.py \
        --num-gpus 8
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from nl_detectron.evaluation import FastCOCOEvaluator
from nl_detectron.modeling import NonLocalKRCNNConvDeconvUpsampleHead, add_non_local_blocks

_zoo = model_zoo.get_config("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.py")
model, dataloader, optimizer, lr_multiplier, train = (
    _zoo.model,
    _zoo.dataloader,
    _zoo.optimizer,
    _zoo.lr_multiplier,
    _zoo.train,
)
model.roi_heads.keypoint_head = L(NonLocalKRCNNConvDeconvUpsampleHead)(
    input_shape=ShapeSpec(channels=256, width=14, height=14),
    num_keypoints=17,
    conv_dims=[512] * 8,
    loss_normalizer="visible",
    non_local_positions=[2, 4, 6, 8],
    non_local_args={"norm": "SyncBN"},
)
model.backbone.bottom_up = L(add_non_local_blocks)(
    resnet=model.backbone.bottom_up, positions=["res4:-1"], norm="SyncBN"
)
model.backbone.in_features = ["res2", "res3", "res4", "res5"]
dataloader.evaluator = L(FastCOCOEvaluator)(dataset_name="${..test.dataset.names}")
train.output_dir = "output/keypoint_rcnn_R_50_FPN_1x_nl"
