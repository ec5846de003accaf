"""The non-local block and its parts (no Detectron2 model code; no config)."""

from .export_mode import export_mode
from .inspection import non_local_blocks, recorded_block_inputs, runs_on_rois
from .non_local_block import NORMS, NonLocalBlock
from .pairwise import (
    PAIRWISE_FUNCTIONS,
    Concatenation,
    Disentangled,
    DotProduct,
    EmbeddedGaussian,
    Gaussian,
    GlobalContext,
    PairwiseFunction,
)
from .reference import NaiveNonLocal
from .released_weights import from_pytorchvideo
from .sync_batch_norm import SyncBatchNorm

__all__ = [
    "NORMS",
    "PAIRWISE_FUNCTIONS",
    "Concatenation",
    "Disentangled",
    "DotProduct",
    "EmbeddedGaussian",
    "Gaussian",
    "GlobalContext",
    "NaiveNonLocal",
    "NonLocalBlock",
    "PairwiseFunction",
    "SyncBatchNorm",
    "export_mode",
    "non_local_blocks",
    "recorded_block_inputs",
    "runs_on_rois",
    "from_pytorchvideo",
]
