#!/usr/bin/env python
"""Train and evaluate Mask R-CNN / Keypoint R-CNN, with or without non-local blocks.

Detectron2's command line, e.g.:

    python tools/train_net.py --config-file configs/quickstart/mask_rcnn_nl_shapes.yaml
    python tools/train_net.py --config-file configs/mask_rcnn_nl.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/mask_rcnn_nl.yaml --eval-only \
        MODEL.WEIGHTS output/model_final.pth

Results: ``OUTPUT_DIR`` holds the log, ``metrics.json``, TensorBoard events, checkpoints and
``model_best.pth`` (best ``segm/AP``, ``keypoints/AP`` or ``bbox/AP`` of the periodic evaluation).
"""

import logging
import sys

# First: nl_detectron imports Detectron2 without its known third-party warnings.
from nl_detectron.third_party_warnings import ignore_known_third_party_warnings

# isort: split
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from nl_detectron.checkpoint import NonLocalCheckpointer
from nl_detectron.config import load_config
from nl_detectron.device import describe_device
from nl_detectron.engine import Trainer
from nl_detectron.engine.launch import backend_for_device, launch
from nl_detectron.errors import CheckpointError, UserInputError
from nl_detectron.preflight import check_inputs


def setup(args):
    """The frozen config of the run; sets up logging and OUTPUT_DIR (in every process)."""
    ignore_known_third_party_warnings()
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    # First in the log: where the run computes (the bundled configs' MODEL.DEVICE "auto").
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="nl_detectron")
    logging.getLogger("nl_detectron").info(describe_device(cfg.MODEL.DEVICE))
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        NonLocalCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    ignore_known_third_party_warnings()
    args = default_argument_parser().parse_args()
    try:
        # Before any process starts: datasets on disk, weights reachable, config consistent.
        cfg = load_config(args.config_file, args.opts)
        check_inputs(cfg, eval_only=args.eval_only, resume=args.resume, num_gpus=args.num_gpus)
        # --num-gpus processes per machine: NCCL on GPUs, gloo with MODEL.DEVICE cpu.
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            backend=backend_for_device(cfg.MODEL.DEVICE),
        )
    except (UserInputError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    except FloatingPointError as e:  # detectron2's divergence checks (loss, RPN outputs)
        sys.exit(
            f"error: training diverged: {e} Lower SOLVER.BASE_LR or lengthen "
            "SOLVER.WARMUP_ITERS; the log in OUTPUT_DIR has the details."
        )
