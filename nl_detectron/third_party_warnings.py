"""Known-harmless warnings of the pinned third-party stack, filtered narrowly.

Each entry names the warning by category, message and the module it is attributed to, so that
nothing else is hidden, and never a warning of nl_detectron itself. The same list serves the
command-line tools (:func:`ignore_known_third_party_warnings`), the package's own import of
Detectron2 (:func:`quiet_third_party_imports`) and the test suite (``tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import NamedTuple

from torch.jit import TracerWarning

__all__ = [
    "KNOWN_NOISY_LOGGERS",
    "KNOWN_THIRD_PARTY_WARNINGS",
    "KnownWarning",
    "ignore_known_third_party_warnings",
    "quiet_third_party_imports",
]


class KnownWarning(NamedTuple):
    """A warning to ignore: ``message`` and ``module`` are regular expressions matched at the
    start of the warning's text and of the name of the module it is attributed to."""

    category: type[Warning]
    message: str
    module: str
    why: str

    def pytest_filter(self) -> str:
        """The entry for pytest's ``filterwarnings`` option (``action:message:category:module``;
        pytest escapes nothing, so ``:`` must not occur in the patterns)."""
        assert ":" not in self.message + self.module, "pytest splits its filters at ':'"
        name = f"{self.category.__module__}.{self.category.__qualname__}"
        if self.category.__module__ == "builtins":
            name = self.category.__qualname__
        return f"ignore:{self.message}:{name}:{self.module}"


KNOWN_THIRD_PARTY_WARNINGS: tuple[KnownWarning, ...] = (
    KnownWarning(
        FutureWarning,
        r"`torch\.jit\.script` is deprecated",
        r"torch\.jit\._script",
        "Detectron2 scripts helper functions at import; TorchScript export still works and "
        "is what Detectron2's deployment uses.",
    ),
    KnownWarning(
        FutureWarning,
        r"`torch\.jit\.(trace|trace_method|save|load)` is deprecated",
        r"torch\.jit\.",
        "TorchScript is what Detectron2's deployment exports; tools/export_model.py uses it.",
    ),
    KnownWarning(
        TracerWarning,
        r"",
        r"(detectron2\.|torchvision\.|torch$|torch\.nn\.functional$)",
        "Detectron2's structures and heads (and the torch / torchvision functions they call) "
        "convert tensors to Python values while traced; its TracingAdapter is built for that, "
        "and the exported models are checked against eager.",
    ),
    KnownWarning(
        UserWarning,
        r"Exporting aten..index operator of advanced indexing",
        r"torch\.onnx\.",
        "The ONNX exporter's general caveat about negative indices; the exported models are "
        "checked against eager with onnxruntime.",
    ),
    KnownWarning(
        DeprecationWarning,
        r"The feature will be removed",
        r"torch\.onnx\.",
        "An internal of the TorchScript-based ONNX exporter, which Detectron2's TracingAdapter "
        "needs (nl_detectron.export).",
    ),
    KnownWarning(
        UserWarning,
        r"torch\.meshgrid. in an upcoming release, it will be required to pass the indexing",
        r"torch\.functional",
        "Detectron2 v0.6's anchor generator calls torch.meshgrid without indexing= (its "
        "result is the default 'ij' indexing it relies on).",
    ),
    KnownWarning(
        UserWarning,
        r"Creating a tensor from a list of numpy\.ndarrays is extremely slow",
        r"detectron2\.structures\.keypoints",
        "Detectron2 builds the Keypoints of an image from one array per instance (a few).",
    ),
    KnownWarning(
        UserWarning,
        r"pkg_resources is deprecated as an API",
        r"detectron2\.",
        "Detectron2 main's model_zoo imports pkg_resources (setuptools 81, the last with it, is "
        "pinned for that).",
    ),
    KnownWarning(
        DeprecationWarning,
        r"__array__ implementation doesn't accept a copy keyword",
        r"(pycocotools\.mask|detectron2\.evaluation\.coco_evaluation)",
        "pycocotools' compiled mask API predates NumPy 2's copy keyword; the arrays are the same.",
    ),
)


# Loggers of the stack that log known-harmless messages at WARNING: raised to ERROR by the tools.
KNOWN_NOISY_LOGGERS = {
    # "No CUDA runtime is found, using CUDA_HOME=...": logged on import when Detectron2 collects
    # its environment information on a machine without a GPU.
    "torch.utils.cpp_extension": "CUDA_HOME on a CPU-only machine",
    # "is_fx_tracing will return true for both fx.symbolic_trace and torch.export": logged when
    # torch.jit.trace runs modules that ask whether they are traced.
    "torch.fx._symbolic_trace": "a notice about torch.fx.is_fx_tracing while exporting",
}


def ignore_known_third_party_warnings() -> None:
    """Ignore the :data:`KNOWN_THIRD_PARTY_WARNINGS` from now on, and raise the
    :data:`KNOWN_NOISY_LOGGERS` to ERROR (for entry points)."""
    for name in KNOWN_NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for known in KNOWN_THIRD_PARTY_WARNINGS:
        warnings.filterwarnings(
            "ignore", message=known.message, category=known.category, module=known.module
        )


@contextlib.contextmanager
def quiet_third_party_imports() -> Iterator[None]:
    """Ignore the known warnings inside the block only, leaving the caller's filters as they
    were (for the package's own import of Detectron2)."""
    with warnings.catch_warnings():
        ignore_known_third_party_warnings()
        yield
