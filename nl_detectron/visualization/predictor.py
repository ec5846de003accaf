"""A detector loaded from a config and weights, run on one RGB image at test-time resolution."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Instances

from ..checkpoint import NonLocalCheckpointer
from ..config import load_config
from ..errors import CheckpointError, UserInputError

__all__ = ["Prediction", "Predictor", "inference_config"]

logger = logging.getLogger(__name__)


def inference_config(
    config_file: str, opts: Sequence[str] = (), *, weights: Optional[str] = None
) -> CfgNode:
    """The frozen config of a trained model: :func:`nl_detectron.config.load_config` (detectron2
    defaults, ``MODEL.NONLOCAL``, the YAML file, ``KEY VALUE`` overrides), then ``weights``.

    Args:
        config_file: a YAML config (e.g. ``configs/quickstart/mask_rcnn_nl_shapes.yaml``, or the
            ``config.yaml`` a training run writes into its output folder).
        opts: ``["KEY", "VALUE", ...]`` overrides, as on the ``train_net.py`` command line.
        weights: sets ``MODEL.WEIGHTS`` when given; ``""`` keeps the random initialisation.

    ``MODEL.DEVICE`` falls back to ``"cpu"`` when CUDA is asked for but not available.
    """
    cfg = load_config(config_file, opts)
    if weights is not None:
        cfg.MODEL.WEIGHTS = weights
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.info("CUDA is not available: running on the CPU (MODEL.DEVICE=cpu).")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


@dataclass(frozen=True)
class Prediction:
    """What a detector returns for one image.

    Attributes:
        instances: detections on the CPU, in the original image's pixel coordinates.
        resized_size: ``(height, width)`` of the image as the model saw it, resized by
            ``INPUT.MIN_SIZE_TEST`` / ``INPUT.MAX_SIZE_TEST`` and before padding.
    """

    instances: Instances
    resized_size: tuple[int, int]


class Predictor:
    """A model in eval mode with its weights and test-time resize, like detectron2's
    ``DefaultPredictor``, but taking RGB images and also reporting the resized size (which
    maps image pixels to feature-map positions).

    Args:
        cfg: a config from :func:`inference_config`; ``MODEL.WEIGHTS`` is loaded with
            ``DetectionCheckpointer`` (``""``: keep the random initialisation).
        source: what the config came from (its file name), used in error messages.

    Attributes:
        model: the ``nn.Module`` (eval mode); hooks may be registered on it.
        blocks_without_weights: names of the non-local blocks that the checkpoint left at their
            random initialisation (e.g. a checkpoint of a model without those blocks).
    """

    def __init__(self, cfg: CfgNode, *, source: str = "the config") -> None:
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise UserInputError(
                f"INPUT.FORMAT {cfg.INPUT.FORMAT!r} of {source} is not supported by the "
                "visualisation tools; they run models that take 'RGB' or 'BGR' images."
            )
        self.cfg = cfg
        self.source = source
        self.model = build_model(cfg)
        self.model.eval()
        self.blocks_without_weights = _load_weights(self.model, cfg.MODEL.WEIGHTS)
        self._resize = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )

    def __call__(self, image_rgb: np.ndarray) -> Prediction:
        """Run the model on one ``(H, W, 3)`` uint8 RGB image."""
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
            raise UserInputError(
                f"Predictor takes an RGB image of shape (H, W, 3); got {image_rgb.shape}."
            )
        height, width = image_rgb.shape[:2]
        image = image_rgb[:, :, ::-1] if self.cfg.INPUT.FORMAT == "BGR" else image_rgb
        resized = self._resize.get_transform(image).apply_image(image)
        # (H', W', 3) -> (3, H', W')
        tensor = torch.as_tensor(resized.transpose(2, 0, 1).astype("float32"))
        with torch.no_grad():
            outputs = self.model([{"image": tensor, "height": height, "width": width}])[0]
        return Prediction(outputs["instances"].to("cpu"), (resized.shape[0], resized.shape[1]))


def _load_weights(model: torch.nn.Module, weights: str) -> list[str]:
    """Load ``weights`` into ``model`` (``""``: keep the random initialisation).

    Returns:
        The non-local blocks the checkpoint has no weights for.
    """
    if not weights:
        logger.warning("No weights given (MODEL.WEIGHTS is empty): the model is random.")
        return []
    checkpointer = NonLocalCheckpointer(model)
    try:
        checkpointer.load(weights)
    except CheckpointError as e:
        raise UserInputError(str(e)) from None
    return list(checkpointer.report.new_non_local) if checkpointer.report else []
