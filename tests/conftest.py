"""Test-suite configuration: the known-harmless third-party warnings are ignored, by the same
narrow filters as the command-line tools use (nl_detectron.third_party_warnings)."""

import sys
from pathlib import Path

from nl_detectron.third_party_warnings import KNOWN_THIRD_PARTY_WARNINGS


def pytest_configure(config):
    for known in KNOWN_THIRD_PARTY_WARNINGS:
        config.addinivalue_line("filterwarnings", known.pytest_filter())


# The suite's helpers (training_runs, tiny_detectors) live in tests/, next to this file, and are
# imported by the tests of every subdirectory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
