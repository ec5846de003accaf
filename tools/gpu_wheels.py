#!/usr/bin/env python
"""Wheels of what a GPU machine without a package index lacks to run this project, for its own
Python and PyTorch: ``make gpu-wheels`` (into ``.gpu/wheels``, git-ignored).

    python tools/gpu_wheels.py --output .gpu/wheels [--python-version 3.12]

Such a machine (a cluster node, a lent cloud GPU) typically has Python, PyTorch with CUDA,
torchvision, NumPy, Pillow, OpenCV, matplotlib, pytest... but not Detectron2 and the rest of its
stack. This script fetches, at the versions of ``requirements/constraints.txt``:

- binary wheels for the target Python (manylinux, x86-64) of the compiled packages (pycocotools,
  faster-coco-eval);
- pure-Python wheels of the pure packages; those published only as source distributions
  (fvcore, antlr4-python3-runtime) are built here with ``pip wheel --no-deps``;
- Detectron2 v0.6 built as a pure-Python wheel from the verified registry sdist, with the
  compatibility fixes of ``tools/provision_detectron2.py`` (the same build as ``make``'s).

On the GPU machine (``make gpu-check`` does this):

    python3 -m pip install --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 tools/gpu_check.py --output output/gpu_check

A failure names the package and pip's own message.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "requirements" / "constraints.txt"
# What the GPU machine lacks, by how it is obtained.
BINARY = ("pycocotools", "faster-coco-eval")
PURE = (
    "fvcore",
    "iopath",
    "yacs",
    "termcolor",
    "omegaconf",
    "hydra-core",
    "antlr4-python3-runtime",
)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
MAX_MB = 60  # what travels to a lent GPU machine is limited


class WheelError(Exception):
    pass


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def _pip(*args: str, what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
        raise WheelError(f"{what} failed; pip said:\n{tail}")


def binary_wheel(name: str, version: str, python_version: str, dest: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    _pip(
        "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
        "--implementation", "cp", *platforms, "-d", str(dest), f"{name}=={version}",
        what=f"downloading the Python {python_version} wheel of {name}=={version}",
    )  # fmt: skip


def pure_wheel(name: str, version: str, dest: Path) -> None:
    # A published wheel if there is one, else one built from the source distribution; either
    # way py3-none-any (checked by the caller).
    _pip(
        "wheel", "--no-deps", "-w", str(dest), f"{name}=={version}",
        what=f"building a pure-Python wheel of {name}=={version}",
    )  # fmt: skip


def detectron2_wheel(dest: Path) -> None:
    """Detectron2 v0.6 as ``make`` provisions it (verified sdist, compatibility fixes, no C++
    extension), as a wheel."""
    sys.path.insert(0, str(REPO / "tools"))
    import provision_detectron2 as provision

    with tempfile.TemporaryDirectory(prefix="nl-detectron2-wheel-") as tmp:
        workdir = Path(tmp)
        try:
            sdist = provision.fetch_sdist(sys.executable, workdir, provision.SDIST_SHA256)
            project = provision.stage_sources(sdist, workdir)
            provision.apply_patches(project / "detectron2")
            provision.write_build_files(project)
        except provision.ProvisionError as e:
            raise WheelError(f"preparing Detectron2: {e}") from None
        _pip(
            "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), str(project),
            what="building the pure-Python Detectron2 wheel",
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPO / ".gpu" / "wheels")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    args = parser.parse_args(argv)
    pins = pinned_versions()
    staging = args.output.with_name(args.output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for name in BINARY:
            print(f"[gpu-wheels] {name}=={pins[name]} (Python {args.python_version} wheel)")
            binary_wheel(name, pins[name], args.python_version, staging)
        for name in PURE:
            print(f"[gpu-wheels] {name}=={pins[name]} (pure Python)")
            pure_wheel(name, pins[name], staging)
        print("[gpu-wheels] detectron2 0.6 (pure-Python build of the verified registry sdist)")
        detectron2_wheel(staging)
        not_pure = [w.name for w in staging.glob("*.whl") if not _fits(w.name, args.python_version)]
        if not_pure:
            raise WheelError(
                f"wheels that will not install on Python {args.python_version}: {not_pure}"
            )
    except WheelError as e:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"gpu-wheels: error: {e}", file=sys.stderr)
        return 1
    size = sum(w.stat().st_size for w in staging.glob("*.whl")) / 2**20
    if size > MAX_MB:
        print(
            f"gpu-wheels: warning: {size:.1f} MB of wheels (more than {MAX_MB} MB)", file=sys.stderr
        )
    shutil.rmtree(args.output, ignore_errors=True)
    staging.rename(args.output)  # all or nothing
    for wheel in sorted(args.output.glob("*.whl")):
        print(f"  {wheel.name} ({wheel.stat().st_size / 2**20:.2f} MB)")
    print(f"[gpu-wheels] {size:.1f} MB in {args.output}")
    return 0


def _fits(wheel: str, python_version: str) -> bool:
    """Whether a wheel file name installs on CPython ``python_version`` on x86-64 Linux."""
    tag = "cp" + python_version.replace(".", "")
    python_tag, abi_tag, platform_tag = wheel[:-4].split("-")[-3:]
    if platform_tag == "any":
        return python_tag.startswith("py3") or tag in python_tag.split(".")
    return tag in python_tag.split(".") and "x86_64" in platform_tag


if __name__ == "__main__":
    sys.exit(main())
