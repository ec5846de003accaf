"""Mask R-CNN, ResNet-50-FPN, 100 epochs of large-scale jitter from scratch (Detectron2's
new_baselines: 44.6 box / 40.3 mask AP), with one non-local block right before the last res4
block. SyncBN everywhere, as in new_baselines, the block's norm included.

    python tools/lazyconfig_train_net.py \
        --config-file configs/mask_rcnn_R_50_FPN_100ep_LSJ_nl.py --num-gpus 8
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from nl_detectron.evaluation import FastCOCOEvaluator
from nl_detectron.modeling import add_non_local_blocks

_zoo = model_zoo.get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
model, dataloader, optimizer, lr_multiplier, train = (
    _zoo.model,
    _zoo.dataloader,
    _zoo.optimizer,
    _zoo.lr_multiplier,
    _zoo.train,
)
model.backbone.bottom_up = L(add_non_local_blocks)(
    resnet=model.backbone.bottom_up, positions=["res4:-1"], norm="SyncBN"
)
model.backbone.in_features = ["res2", "res3", "res4", "res5"]
dataloader.evaluator = L(FastCOCOEvaluator)(dataset_name="${..test.dataset.names}")
train.output_dir = "output/mask_rcnn_R_50_FPN_100ep_LSJ_nl"
