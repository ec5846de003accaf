"""A detector loaded from a config and weights, run on one RGB image at test-time resolution."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Instances

from ..config import add_nonlocal_config
from ..non_local_block import NonLocalBlock
from .errors import VisualizationError

__all__ = ["Prediction", "Predictor", "load_config"]

logger = logging.getLogger(__name__)


def load_config(
    config_file: str, opts: Sequence[str] = (), *, weights: Optional[str] = None
) -> CfgNode:
    """Detectron2 config with ``MODEL.NONLOCAL``, merged from a YAML file and ``KEY VALUE`` opts.

    Args:
        config_file: a YAML config (e.g. ``configs/quickstart/mask_rcnn_nl_shapes.yaml``, or the
            ``config.yaml`` a training run writes into its output folder).
        opts: ``["KEY", "VALUE", ...]`` overrides, as on the ``train_net.py`` command line.
        weights: sets ``MODEL.WEIGHTS`` when given; ``""`` keeps the random initialisation.

    ``MODEL.DEVICE`` falls back to ``"cpu"`` when CUDA is asked for but not available.
    """
    path = Path(config_file)
    if not path.is_file():
        raise VisualizationError(
            f"Config file {config_file!r} does not exist. Pass the YAML config the model was "
            "trained with, e.g. configs/quickstart/mask_rcnn_nl_shapes.yaml or a run's "
            "output/<run>/config.yaml."
        )
    if len(opts) % 2:
        raise VisualizationError(
            f"Config overrides come in KEY VALUE pairs; got an odd number: {list(opts)}."
        )
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    try:
        cfg.merge_from_file(str(path))
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise VisualizationError(f"Cannot load config {config_file!r}: {e}") from e
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
        cfg: a config from :func:`load_config`; ``MODEL.WEIGHTS`` is loaded with
            ``DetectionCheckpointer`` (``""``: keep the random initialisation).
        source: what the config came from (its file name), used in error messages.

    Attributes:
        model: the ``nn.Module`` (eval mode); hooks may be registered on it.
        blocks_without_weights: names of the non-local blocks that the checkpoint left at their
            random initialisation (e.g. a checkpoint of a model without those blocks).
    """

    def __init__(self, cfg: CfgNode, *, source: str = "the config") -> None:
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise VisualizationError(
                f"INPUT.FORMAT {cfg.INPUT.FORMAT!r} of {source} is not supported by the "
                "visualisation tools; they run models that take 'RGB' or 'BGR' images."
            )
        self.cfg = cfg
        self.source = source
        self.model = build_model(cfg)
        self.model.eval()
        blocks = [(n, m) for n, m in self.model.named_modules() if isinstance(m, NonLocalBlock)]
        initial = {name: [p.detach().clone() for p in m.parameters()] for name, m in blocks}
        _load_weights(self.model, cfg.MODEL.WEIGHTS)
        self.blocks_without_weights = [
            name
            for name, block in blocks
            if cfg.MODEL.WEIGHTS
            and all(torch.equal(a, b) for a, b in zip(initial[name], block.parameters()))
        ]
        self._resize = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )

    def __call__(self, image_rgb: np.ndarray) -> Prediction:
        """Run the model on one ``(H, W, 3)`` uint8 RGB image."""
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
            raise VisualizationError(
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


def _load_weights(model: torch.nn.Module, weights: str) -> None:
    """Load ``weights`` into ``model``; ``""`` keeps the random initialisation."""
    if not weights:
        logger.warning("No weights given (MODEL.WEIGHTS is empty): the model is random.")
        return
    if "://" not in weights and not Path(weights).is_file():
        raise VisualizationError(
            f"Weights file {weights!r} does not exist. Pass --weights with a checkpoint of this "
            "config, e.g. output/<run>/model_final.pth written by tools/train_net.py."
        )
    try:
        DetectionCheckpointer(model).load(weights)
    except (OSError, RuntimeError, ValueError, AssertionError) as e:
        raise VisualizationError(f"Cannot load weights {weights!r}: {e}") from e
