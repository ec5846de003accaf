"""Test-suite configuration: the known-harmless third-party warnings are ignored, by the same
narrow filters as the command-line tools use (nl_detectron.third_party_warnings)."""

from nl_detectron.third_party_warnings import KNOWN_THIRD_PARTY_WARNINGS


def pytest_configure(config):
    for known in KNOWN_THIRD_PARTY_WARNINGS:
        config.addinivalue_line("filterwarnings", known.pytest_filter())
