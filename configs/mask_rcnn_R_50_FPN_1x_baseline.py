"""Mask R-CNN, ResNet-50-FPN, COCO 2017, 1x, as a Python (LazyConfig) config: Detectron2's
model-zoo COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py, evaluated by nl_detectron's
COCO evaluator. The baseline of mask_rcnn_R_50_FPN_1x_nl.py; the same model as
mask_rcnn_baseline.yaml.

    python tools/lazyconfig_train_net.py --config-file configs/mask_rcnn_R_50_FPN_1x_baseline.py \
        --num-gpus 8
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from nl_detectron.evaluation import FastCOCOEvaluator

_zoo = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
model, dataloader, optimizer, lr_multiplier, train = (
    _zoo.model,
    _zoo.dataloader,
    _zoo.optimizer,
    _zoo.lr_multiplier,
    _zoo.train,
)
dataloader.evaluator = L(FastCOCOEvaluator)(dataset_name="${..test.dataset.names}")
train.output_dir = "output/mask_rcnn_R_50_FPN_1x_baseline"
