#!/usr/bin/env python
"""Train and evaluate from a Python (LazyConfig) config, as Detectron2's
``tools/lazyconfig_train_net.py``, with what ``tools/train_net.py`` has: pre-flight checks,
periodic COCO evaluation, ``model_best.pth``, atomic checkpoints, ``--resume`` (model, optimizer,
schedule, iteration), ``--eval-only``, ``metrics.json`` and TensorBoard events. E.g.:

    python tools/lazyconfig_train_net.py --config-file configs/quickstart/mask_rcnn_nl_shapes.py
    python tools/lazyconfig_train_net.py --config-file configs/mask_rcnn_R_50_FPN_1x_nl.py \
        --num-gpus 8 train.output_dir=output/lazy_nl
    python tools/lazyconfig_train_net.py --config-file configs/mask_rcnn_R_50_FPN_1x_nl.py \
        --eval-only train.init_checkpoint=output/lazy_nl/model_final.pth

Overrides are ``key=value`` (``train.max_iter=100``), as in Detectron2's Python configs.
"""

import logging
import sys

# First: nl_detectron imports Detectron2 without its known third-party warnings.
from nl_detectron.third_party_warnings import ignore_known_third_party_warnings

# isort: split
from detectron2.config import LazyConfig
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from hydra.errors import OverrideParseException

from nl_detectron.device import describe_device
from nl_detectron.engine.launch import backend_for_device, launch
from nl_detectron.engine.lazy_trainer import lazy_evaluate, lazy_train
from nl_detectron.errors import CheckpointError, UserInputError
from nl_detectron.preflight import check_lazy_inputs


def load(args):
    """The config of ``args.config_file`` with the ``key=value`` overrides applied."""
    try:
        cfg = LazyConfig.load(args.config_file)
    except FileNotFoundError:
        raise UserInputError(
            f"Config file {args.config_file!r} not found. Pass --config-file with a Python "
            "config, e.g. configs/quickstart/mask_rcnn_nl_shapes.py."
        ) from None
    try:
        return LazyConfig.apply_overrides(cfg, args.opts)
    except (KeyError, ValueError, AttributeError, OverrideParseException) as e:
        raise UserInputError(
            f"In the overrides {args.opts}: {e}. Overrides are key=value, e.g. train.max_iter=100."
        ) from None


def main(args):
    ignore_known_third_party_warnings()
    cfg = load(args)
    # First in the log: where the run computes (train.device; the quickstart picks CUDA if any).
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="nl_detectron")
    logging.getLogger("nl_detectron").info(describe_device(cfg.train.device))
    default_setup(cfg, args)
    if args.eval_only:
        return lazy_evaluate(cfg, resume=args.resume)
    return lazy_train(cfg, resume=args.resume)


if __name__ == "__main__":
    ignore_known_third_party_warnings()
    args = default_argument_parser().parse_args()
    try:
        cfg = load(args)
        check_lazy_inputs(cfg, eval_only=args.eval_only, resume=args.resume, num_gpus=args.num_gpus)
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            backend=backend_for_device(cfg.train.device),
        )
    except (UserInputError, CheckpointError) as e:
        sys.exit(f"error: {e}")
