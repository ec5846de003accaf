"""The three pictures of a trained run: attention maps, predictions, training curves.

``write_demo_figures`` reads a ``tools/train_net.py`` output folder (its ``config.yaml``,
``model_final.pth`` and ``metrics.json``) and writes ``attention_map.png``, ``predictions.png``
and ``training_curves.png``; ``make demo`` calls it on its run and the README shows them.
"""

import logging
from pathlib import Path
from typing import Optional, Union

from ..errors import UserInputError
from .attention import compute_attention_maps, draw_attention_maps
from .curves import load_metrics, plot_metrics
from .figure import save_png
from .image_source import dataset_record, read_rgb_image
from .predictions import draw_predictions_sheet
from .predictor import Predictor, inference_config

__all__ = ["write_demo_figures"]

logger = logging.getLogger(__name__)


def write_demo_figures(
    run_dir: Union[str, Path],
    output_dir: Union[str, Path],
    *,
    baseline_dir: Optional[Union[str, Path]] = None,
    dataset: Optional[str] = None,
    image_index: int = 0,
    num_images: int = 3,
    score_threshold: float = 0.5,
) -> list[Path]:
    """Write the attention maps, predictions and curves of a training run.

    Args:
        run_dir: ``OUTPUT_DIR`` of a run with non-local blocks.
        output_dir: folder for the PNGs (created).
        baseline_dir: ``OUTPUT_DIR`` of a run without them, drawn beside it in the curves.
        dataset: dataset of the pictures; default: the run's ``DATASETS.TEST[0]``.
        image_index: image of the attention maps (queries: its 3 best detections' centres).
        num_images: images of the predictions sheet (the first ones of the dataset).
        score_threshold: predictions scoring below it are not drawn.

    Returns:
        The paths of ``attention_map.png``, ``predictions.png`` and ``training_curves.png``.
    """
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    config, weights = run_dir / "config.yaml", run_dir / "model_final.pth"
    for path in (config, weights):
        if not path.is_file():
            raise UserInputError(
                f"{path} does not exist: {run_dir} is not a finished training run. Train one "
                "first (make demo, or tools/train_net.py with OUTPUT_DIR set to it)."
            )
    cfg = inference_config(str(config), weights=str(weights))
    if dataset is None:
        if not cfg.DATASETS.TEST:
            raise UserInputError(f"{config} has no DATASETS.TEST; pass a dataset name.")
        dataset = cfg.DATASETS.TEST[0]
    predictor = Predictor(cfg, source=str(config))
    output_dir.mkdir(parents=True, exist_ok=True)

    image = read_rgb_image(dataset_record(dataset, image_index)["file_name"])
    attention = compute_attention_maps(predictor, image, top_k=3)
    # A 256-colour palette keeps the pictures small enough for the README (< 300 KB).
    attention_path = draw_attention_maps(
        attention, output_dir / "attention_map.png", panel_size=240, colors=256
    )

    sheet = draw_predictions_sheet(
        predictor, dataset, num_images=num_images, score_threshold=score_threshold, scale=2.0
    )
    predictions_path = save_png(sheet, output_dir / "predictions.png", colors=256)

    runs = [load_metrics(run_dir, "non-local")]
    if baseline_dir is not None:
        runs.insert(0, load_metrics(baseline_dir, "baseline"))
    curves_path = plot_metrics(runs, output_dir / "training_curves.png")

    paths = [attention_path, predictions_path, curves_path]
    for path in paths:
        logger.info("Wrote %s", path)
    return paths
