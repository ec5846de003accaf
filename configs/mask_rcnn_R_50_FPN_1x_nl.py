"""Mask R-CNN, ResNet-50-FPN + 1 non-local block, COCO 2017, 1x (the paper's Table 5 "+1 NL":
39.0 box AP / 35.5 mask AP), as a Python config: mask_rcnn_R_50_FPN_1x_baseline.py with one block
right before the last res4 block, its norm SyncBN. The same model as mask_rcnn_nl.yaml.

    python tools/lazyconfig_train_net.py --config-file configs/mask_rcnn_R_50_FPN_1x_nl.py \
        --num-gpus 8
"""

from detectron2.config import LazyCall as L

from nl_detectron.modeling import add_non_local_blocks

from .mask_rcnn_R_50_FPN_1x_baseline import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up = L(add_non_local_blocks)(
    resnet=model.backbone.bottom_up,
    positions=["res4:-1"],  # between the 5th and the 6th (last) res4 block
    norm="SyncBN",  # 2 images per GPU: statistics over all GPUs (single process: plain BN)
)
model.backbone.in_features = ["res2", "res3", "res4", "res5"]
train.output_dir = "output/mask_rcnn_R_50_FPN_1x_nl"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
