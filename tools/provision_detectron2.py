#!/usr/bin/env python3
"""Make sure the running Python environment has a usable Detectron2 (>= 0.6).

1. If a Detectron2 >= 0.6 is installed whose ``modeling``, ``data``, ``evaluation`` and ``engine``
   packages import (for example one built from the official source, the recommended install on
   GPU machines), it is used as it is and nothing is changed.
2. Otherwise Detectron2 v0.6's Python sources are taken from the registry sdist
   ``pb1-detectron2==0.6``, verified against a pinned sha256 *before anything from it is built
   or run*, patched with the few compatibility fixes the pinned stack needs (each listed in
   ``PATCHES`` with the reason), and installed as a pure-Python package under the distribution
   name ``detectron2``. Features that need the C++/CUDA extension fail when used, with a message.

3. With ``--source PATH`` (``DETECTRON2_SOURCE``), the official Detectron2 is built from that
   source tree or ``git archive`` tarball (e.g. a clone of its main branch), with its C++/CUDA
   extension, by its own ``setup.py``: replacing any Detectron2 installed before. A source older
   than the pinned stack (the v0.6 tag, main before mid-2023) gets the registry build's fixes for
   what the stack removed, each only where the source and the environment need it
   (``SOURCE_FIXES``); ``--no-source-fixes`` (``DETECTRON2_SOURCE_FIXES=0``) builds it as it is.

Any failure (download, hash mismatch, patch not applying, build, import check) stops with an
error and exit status 1, and leaves no half-installed Detectron2 behind. An import that fails is
reported with the module, the exception and its last frames, and the fix where it is known.

Offline: set ``DETECTRON2_SDIST=/path/to/pb1-detectron2-0.6.tar.gz`` (the same file, same hash).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# Version recorded for the installed distribution: v0.6, marked as the pure-Python build, with
# the revision of PATCHES (bumped when they change, so that an older build is replaced).
INSTALLED_VERSION = "0.6+purepython.2"
REQUIRED_SUBPACKAGES = ("modeling", "data", "evaluation", "engine")
OFFICIAL_INSTALL = (
    "python -m pip install --no-build-isolation "
    "'git+https://github.com/facebookresearch/detectron2.git'"
)


class ProvisionError(Exception):
    """A failure with a message meant for the user (printed without a traceback)."""


# ---------------------------------------------------------------------------------------------
# Compatibility fixes. Each is (file, old text, new text, why); `old` must occur exactly `count`
# times, so a different source tree makes the build stop instead of being patched wrongly.
# ---------------------------------------------------------------------------------------------

_C_PLACEHOLDER = '''\
"""Stand-in for Detectron2's compiled extension ``detectron2._C``.

This Detectron2 was installed from its Python sources only (nl_detectron's registry build), so
the C++/CUDA operators are not available. Everything that Mask R-CNN and Keypoint R-CNN with
standard (axis-aligned) boxes need is pure Python or provided by torchvision and works.
What needs the extension fails when it is used, with this message:
rotated boxes (IoU, NMS, ROIAlignRotated: RRPN, rotated heads), deformable convolution, and the
C++ fast COCOeval (COCOEvaluator falls back to the official pycocotools COCOeval instead).
"""

PURE_PYTHON_BUILD = True


class MissingCppExtensionError(RuntimeError):
    pass


def get_compiler_version():
    return "not built (pure-Python Detectron2: no C++/CUDA extension)"


def get_cuda_version():
    return "not built (pure-Python Detectron2: no C++/CUDA extension)"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise MissingCppExtensionError(
        f"detectron2._C.{name} is a C++/CUDA operator, and this Detectron2 is the pure-Python "
        "build that nl_detectron installs when no compiled Detectron2 is present. Rotated-box "
        "ops, deformable convolution and the C++ COCOeval need the extension. Install the "
        "official Detectron2 from source into this environment, then re-run `make`: "
        "python -m pip install --no-build-isolation "
        "'git+https://github.com/facebookresearch/detectron2.git'"
    )
'''

_FAST_IMPL_CHECK = """

def _fast_impl_available():
    # nl_detectron pure-Python build: the fast COCOeval (COCOeval_opt) needs the C++ extension.
    # Without it, fall back to the official pycocotools COCOeval (same numbers, slower).
    from detectron2 import _C

    return not getattr(_C, "PURE_PYTHON_BUILD", False)
"""

PATCHES: list[tuple[str, str, str, str, int]] = [
    (
        "data/transforms/transform.py",
        "interp=Image.LINEAR",
        "interp=Image.BILINEAR",
        "Pillow >= 10 removed the alias Image.LINEAR (same filter as Image.BILINEAR); it is a "
        "default argument, so `import detectron2.data` fails without this.",
        1,
    ),
    (
        "model_zoo/model_zoo.py",
        "import pkg_resources\n",
        "from importlib import resources as _resources\n",
        "setuptools >= 82 no longer ships pkg_resources; importlib.resources replaces it.",
        1,
    ),
    (
        "model_zoo/model_zoo.py",
        'cfg_file = pkg_resources.resource_filename(\n        "detectron2.model_zoo", '
        'os.path.join("configs", config_path)\n    )',
        'cfg_file = str(_resources.files("detectron2.model_zoo").joinpath("configs", config_path))',
        "Same pkg_resources removal: resolve the bundled config file with importlib.resources.",
        1,
    ),
    (
        "evaluation/coco_evaluation.py",
        "from detectron2.evaluation.fast_eval_api import COCOeval_opt\n",
        "from detectron2.evaluation.fast_eval_api import COCOeval_opt\n" + _FAST_IMPL_CHECK,
        "The C++ fast COCOeval is unavailable without the extension: add a check for it.",
        1,
    ),
    (
        "evaluation/coco_evaluation.py",
        "self._use_fast_impl = use_fast_impl\n",
        "self._use_fast_impl = use_fast_impl and _fast_impl_available()\n",
        "COCOEvaluator(use_fast_impl=True) is the default: fall back to pycocotools' COCOeval.",
        1,
    ),
    (
        "evaluation/coco_evaluation.py",
        "(COCOeval_opt if use_fast_impl else COCOeval)",
        "(COCOeval_opt if use_fast_impl and _fast_impl_available() else COCOeval)",
        "The module-level helper _evaluate_predictions_on_coco takes the same fallback.",
        1,
    ),
    (
        "export/__init__.py",
        "from .api import *\n",
        "try:  # the caffe2 exporter: caffe2 is not part of PyTorch 2\n"
        "    from caffe2.proto import caffe2_pb2 as _caffe2_pb2  # noqa: F401\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    from .api import *\n",
        "detectron2.export imports the caffe2 exporter at its top, and caffe2 is gone from "
        "PyTorch 2: guard it as Detectron2 main does, so TorchScript and ONNX export import.",
        1,
    ),
    (
        "layers/nms.py",
        "    return torch.ops.detectron2.nms_rotated(boxes, scores, iou_threshold)\n",
        "    from detectron2 import _C  # pure-Python build: raises the missing-extension error\n\n"
        "    return _C.nms_rotated(boxes, scores, iou_threshold)\n",
        "nms_rotated is registered as torch.ops.detectron2 by the C++ extension; without it torch "
        "raises a bare AttributeError. Route it to the _C stand-in, whose error says what to do.",
        1,
    ),
]

# NumPy 1.24 removed the aliases np.int / np.float / np.str (np.bool came back in NumPy 2 as the
# NumPy bool type); each was exactly the Python builtin, so the builtin is the faithful fix.
NUMPY_ALIAS = re.compile(r"\bnp\.(int|float|str|bool|object)\b(?![\w.])")
NUMPY_ALIAS_WHY = "NumPy >= 1.24 removed np.int/np.float/np.str/np.bool aliases of builtins."


# ---------------------------------------------------------------------------------------------
# Compatibility fixes for official sources older than the pinned stack (``--source``): the
# registry build's fixes for what the stack removed. (Its fixes for the missing extension, the _C
# stand-in, the COCOeval fallback and nms_rotated, do not apply to a compiled build; pkg_resources
# is kept by the pinned setuptools, because official main needs it too.) A fix is applied only
# where the environment lacks what the source uses (``lacking``) *and* the source uses it
# (``pattern``): a source that does not need it is built byte for byte as it is.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFix:
    name: str
    # Python expression run in the target environment (PIL.Image, numpy and importlib.util
    # imported): the names the installed stack lacks; empty: the fix is not needed there.
    lacking: str
    # Regex for a use of them in the source, ``{names}`` standing for the lacking names joined
    # with "|", in the files under detectron2/ that ``files`` (a glob) matches.
    pattern: str
    replacement: str
    files: str
    why: str
    # Regex for the exception that importing the unfixed source raises, to name the fix.
    symptom: str
    # What made the fix unnecessary upstream: a source at or after it does not match `pattern`.
    upstream: str
    # A way out for a user who builds the source as it is (None: none with the pinned stack).
    pin: str | None = None


_EXPORT_GUARD = (
    "try:  # the caffe2 exporter: caffe2 is not part of PyTorch 2\n"
    "    from caffe2.proto import caffe2_pb2 as _caffe2_pb2  # noqa: F401\n"
    "except ImportError:\n"
    "    pass\n"
    "else:\n"
    "    from .api import *\n"
)

SOURCE_FIXES: tuple[SourceFix, ...] = (
    SourceFix(
        name="Pillow Image.LINEAR",
        lacking="[n for n in ('LINEAR',) if not hasattr(PIL.Image, n)]",
        pattern=r"\bImage\.(?:{names})\b",
        replacement="Image.BILINEAR",
        files="**/*.py",
        why="Pillow >= 10 removed the alias Image.LINEAR (the same filter as Image.BILINEAR); "
        "ExtentTransform uses it as a default argument, so `import detectron2.data` fails.",
        symptom=r"module 'PIL\.Image' has no attribute 'LINEAR'",
        upstream="ff53992b (2023-07-06)",
        pin="pin an older Pillow (pillow<10 in requirements/constraints.txt)",
    ),
    SourceFix(
        name="NumPy aliases",
        lacking="[n for n in ('int', 'float', 'str', 'bool', 'object') if not hasattr(numpy, n)]",
        pattern=r"\bnp\.({names})\b(?![\w.])",
        replacement=r"\1",
        files="**/*.py",
        why="NumPy >= 1.24 removed the aliases np.int/np.float/np.str/np.object (and np.bool "
        "until NumPy 2); each was exactly the Python builtin, which replaces it.",
        symptom=r"module 'numpy' has no attribute '(int|float|str|bool|object)'",
        upstream="facebookresearch/detectron2#4975, merged after b2948fb (2023-06-09)",
    ),
    SourceFix(
        name="caffe2 exporter import",
        lacking="[] if importlib.util.find_spec('caffe2') else ['caffe2']",
        pattern=r"(?m)^from \.api import \*\n",
        replacement=_EXPORT_GUARD,
        files="export/__init__.py",
        why="detectron2.export imports the caffe2 exporter unguarded at its top, and caffe2 is "
        "gone from PyTorch 2: guard it as later Detectron2 does, so TorchScript/ONNX export "
        "import.",
        symptom=r"No module named 'caffe2'",
        upstream="a commit after v0.6, before b2948fb (2023-06-09)",
    ),
)
# Part of a build's identity: a change to SOURCE_FIXES rebuilds an environment built before it.
SOURCE_FIXES_REVISION = 1


@dataclass(frozen=True)
class PlannedFix:
    fix: SourceFix
    names: tuple[str, ...]  # what the environment lacks
    files: tuple[Path, ...]  # where the source uses it, relative to the package directory

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.fix.pattern.format(names="|".join(map(re.escape, self.names))))


def plan_source_fixes(python: str, package_dir: Path) -> list[PlannedFix]:
    """The fixes this source needs in this environment: what the environment lacks, in the files
    of the source that use it."""
    lacking = _lacking_in_environment(python)
    planned = []
    for fix in SOURCE_FIXES:
        if not lacking[fix.name]:
            continue
        plan = PlannedFix(fix, tuple(lacking[fix.name]), ())
        files = tuple(
            path.relative_to(package_dir)
            for path in sorted(package_dir.glob(fix.files))
            if path.is_file() and plan.regex.search(path.read_text(encoding="utf-8"))
        )
        if files:
            planned.append(PlannedFix(fix, plan.names, files))
    return planned


def apply_source_fixes(package_dir: Path, planned: list[PlannedFix]) -> None:
    for plan in planned:
        count = 0
        for rel in plan.files:
            path = package_dir / rel
            text, n = plan.regex.subn(plan.fix.replacement, path.read_text(encoding="utf-8"))
            path.write_text(text, encoding="utf-8")
            count += n
        where = ", ".join(f"detectron2/{rel}" for rel in plan.files)
        log(
            f"fixed {plan.fix.name} ({count}x in {where}): {plan.fix.why} "
            f"Upstream fixed this in {plan.fix.upstream}."
        )


def _lacking_in_environment(python: str) -> dict[str, list[str]]:
    entries = ", ".join(f"{fix.name!r}: {fix.lacking}" for fix in SOURCE_FIXES)
    probe = f"import importlib.util, json, numpy, PIL.Image\nprint(json.dumps({{{entries}}}))"
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ProvisionError(
            "could not check which compatibility fixes this environment needs (numpy and "
            f"Pillow should be installed by now).\nPython said:\n{_tail(proc.stderr)}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def log(msg: str) -> None:
    print(f"[provision-detectron2] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Detection of an existing installation
# ---------------------------------------------------------------------------------------------

# Run in the target environment: imports Detectron2 as the project needs it and prints one JSON
# line after _PROBE_MARK: what is installed, or which module failed to import, how and where.
_PROBE_MARK = "@@detectron2-probe@@"
_PROBE_FRAMES = 3
_PROBE = textwrap.dedent(
    f"""
    import importlib, importlib.util, json, os, sys, traceback
    if sys.path and sys.path[0] == "":
        del sys.path[0]  # a detectron2/ source tree in the working directory would shadow it

    def report(**fields):
        print({_PROBE_MARK!r} + json.dumps(fields), flush=True)
        sys.exit(0)

    def failed(module, error):
        frames = [
            (f.filename, f.lineno, f.name, f.line or "")
            for f in traceback.extract_tb(error.__traceback__)
            if not f.filename.startswith("<frozen")
        ]
        exception = "".join(traceback.format_exception_only(type(error), error)).strip()
        # The module of Detectron2's that raised it (importing `module` imports many others).
        spec = importlib.util.find_spec("detectron2")
        root = os.path.dirname(spec.origin) if spec and spec.origin else None
        origin = module
        for filename, *_ in reversed(frames):
            if root and filename.startswith(root + os.sep) and filename.endswith(".py"):
                parts = os.path.relpath(filename[:-3], root).split(os.sep)
                origin = ".".join(["detectron2"] + [p for p in parts if p != "__init__"])
                break
        report(module=module, origin=origin, exception=exception, frames=frames[-{_PROBE_FRAMES}:])

    try:
        import detectron2
    except ModuleNotFoundError as e:
        if e.name == "detectron2":
            report(missing=True)
        failed("detectron2", e)
    except Exception as e:
        failed("detectron2", e)
    for name in {REQUIRED_SUBPACKAGES!r}:
        try:
            importlib.import_module("detectron2." + name)
        except Exception as e:
            failed("detectron2." + name, e)
    try:
        from detectron2 import _C
    except Exception as e:
        failed("detectron2._C", e)
    report(
        version=detectron2.__version__,
        path=os.path.dirname(detectron2.__file__),
        compiled=not getattr(_C, "PURE_PYTHON_BUILD", False),
    )
    """
)

# Causes of an import failure other than those of SOURCE_FIXES: (regex on the exception, cause,
# fix).
_KNOWN_FAILURES: tuple[tuple[str, str, str], ...] = (
    (
        r"No module named 'pkg_resources'",
        "setuptools >= 82 no longer ships pkg_resources, which Detectron2's model_zoo imports.",
        "install setuptools<82 into this environment (the pinned stack has 81).",
    ),
    (
        r"undefined symbol|DLL load failed|incompatible architecture",
        "Detectron2's C++ extension was built against another PyTorch than the one installed.",
        "rebuild Detectron2 from source in this environment (`make env DETECTRON2_SOURCE=...`).",
    ),
    (
        r"cannot import name '_C'|No module named 'detectron2\._C'",
        "this Detectron2 has no C++ extension: its build skipped it, or a source tree without "
        "one shadows the installed package.",
        "rebuild Detectron2 from source in this environment (`make env DETECTRON2_SOURCE=...`).",
    ),
)


@dataclass(frozen=True)
class Detectron2Probe:
    """What importing Detectron2 in an environment found."""

    missing: bool = False
    version: str = ""
    path: str = ""
    compiled: bool = False
    module: str = ""  # the module that failed to import ("" if none did)
    origin: str = ""  # Detectron2's module that raised (innermost), e.g. one `module` imports
    exception: str = ""  # its exception, as the last line of a traceback shows it
    frames: tuple[tuple[str, int, str, str], ...] = ()  # its last frames, innermost last

    @property
    def usable(self) -> bool:
        return not self.missing and not self.module and _version_at_least(self.version, (0, 6))

    def describe(self) -> str:
        kind = "compiled" if self.compiled else "pure-Python build"
        return f"detectron2 {self.version} ({kind}) at {self.path}"

    def problem(self, source_fixes: bool | None = None) -> str:
        """Why this Detectron2 cannot be used, with the fix where it is known. ``source_fixes``:
        whether SOURCE_FIXES were on for the build (None: not a build from source)."""
        if self.missing:
            return "Detectron2 is not installed."
        if not self.module:
            return f"{self.describe()} is older than 0.6."
        where = f", in {self.origin}" if self.origin and self.origin != self.module else ""
        lines = [f"{self.module} does not import{where}:", f"    {self.exception}"]
        if self.frames:
            lines.append("  last frames:")
            for filename, lineno, name, line in self.frames:
                lines.append(f'    File "{filename}", line {lineno}, in {name}')
                if line:
                    lines.append(f"      {line}")
        return "\n".join(lines + _known_fix(self.exception, source_fixes))


def _known_fix(exception: str, source_fixes: bool | None) -> list[str]:
    for fix in SOURCE_FIXES:
        if re.search(fix.symptom, exception):
            if source_fixes:
                ours = (
                    f"nl_detectron's fix for it ({fix.name}) was on but did not match this "
                    "source: please report it, with the source's commit"
                )
            else:
                ours = (
                    "let nl_detectron apply its known compatibility fixes: build the source with "
                    "`make env DETECTRON2_SOURCE=...` without DETECTRON2_SOURCE_FIXES=0 (or "
                    "tools/provision_detectron2.py --source without --no-source-fixes)"
                )
            ways = [f"update the Detectron2 source: upstream fixed this in {fix.upstream}", ours]
            ways += [fix.pin] if fix.pin else []
            listed = [f"    - {way};" for way in ways[:-1]] + [f"    - {ways[-1]}."]
            return [f"  Cause: {fix.why}", "  Fix it in one of these ways:", *listed]
    for pattern, cause, fix_text in _KNOWN_FAILURES:
        if re.search(pattern, exception):
            return [f"  Cause: {cause}", f"  Fix: {fix_text}"]
    return []


def probe_detectron2(python: str) -> Detectron2Probe:
    """Import Detectron2, the subpackages the project needs and ``_C`` in ``python``."""
    proc = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True)
    found = [line for line in proc.stdout.splitlines() if line.startswith(_PROBE_MARK)]
    if proc.returncode != 0 or not found:
        # What the probe cannot catch: the interpreter itself, a crash in an extension module.
        raise ProvisionError(
            f"could not check the Detectron2 of {python}: importing it ended with exit status "
            f"{proc.returncode}.\nPython said:\n{_tail(proc.stdout + proc.stderr)}"
        )
    fields = json.loads(found[-1][len(_PROBE_MARK) :])
    fields["frames"] = tuple(tuple(f) for f in fields.get("frames", ()))
    return Detectron2Probe(**fields)


# Earlier revisions of this script's registry build, which a run of it replaces.
_OLDER_BUILDS = ("0.6+purepython",)


def _installed_distribution_version(python: str) -> str:
    """The version of the installed ``detectron2`` distribution ("" if none)."""
    probe = textwrap.dedent(
        """
        import importlib.metadata as m
        try:
            print(m.version("detectron2"))
        except m.PackageNotFoundError:
            print()
        """
    )
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ProvisionError(
            f"could not read the version of the installed detectron2 distribution with {python}."
            f"\nPython said:\n{_tail(proc.stderr)}"
        )
    return proc.stdout.strip()


def _version_at_least(version: str, minimum: tuple[int, ...]) -> bool:
    nums = []
    for part in re.split(r"[.+]", version):
        if not part.isdigit():
            break
        nums.append(int(part))
    return tuple(nums) >= minimum


# ---------------------------------------------------------------------------------------------
# Fetch and verify
# ---------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(python: str, workdir: Path, expected_sha256: str) -> Path:
    """Download (or take from $DETECTRON2_SDIST) the sdist and verify its hash; return its path."""
    local = os.environ.get("DETECTRON2_SDIST")
    if local:
        path = Path(local)
        if not path.is_file():
            raise ProvisionError(
                f"DETECTRON2_SDIST={local} does not exist. Point it at a downloaded "
                f"{SDIST_FILE}, or unset it to download from the package index."
            )
        log(f"using {path} from DETECTRON2_SDIST")
    else:
        reqs = workdir / "sdist-requirements.txt"
        # --require-hashes: pip checks the hash right after the download, before it runs the
        # sdist's setup.py to read metadata; nothing from an unverified archive is executed.
        reqs.write_text(f"{SDIST_NAME}=={SDIST_VERSION} --hash=sha256:{expected_sha256}\n")
        dest = workdir / "download"
        cmd = [
            python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--no-build-isolation", "--require-hashes", "-r", str(reqs), "-d", str(dest),
        ]  # fmt: skip
        log(f"downloading {SDIST_NAME}=={SDIST_VERSION} (sha256 {expected_sha256[:12]}...)")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).strip()
            if "DO NOT MATCH THE HASHES" in out:
                raise ProvisionError(
                    f"the downloaded {SDIST_FILE} does not have the pinned sha256 "
                    f"{expected_sha256}. Refusing to build it. If the pin in "
                    "tools/provision_detectron2.py was edited, restore it; otherwise the "
                    f"package index serves a different file.\npip said:\n{_tail(out)}"
                )
            raise ProvisionError(
                f"could not download {SDIST_NAME}=={SDIST_VERSION} from the package index "
                "(no network, or the index does not serve it). Either install the official "
                f"Detectron2 into this environment ({OFFICIAL_INSTALL}), or download "
                f"{SDIST_FILE} elsewhere and set DETECTRON2_SDIST=/path/to/it.\n"
                f"pip said:\n{_tail(out)}"
            )
        found = sorted(dest.glob(f"{SDIST_NAME}-*.tar.gz"))
        if len(found) != 1:
            raise ProvisionError(f"pip download produced {found}, expected one {SDIST_FILE}")
        path = found[0]
    digest = sha256_of(path)
    if digest != expected_sha256:
        raise ProvisionError(
            f"{path} has sha256 {digest}, but the pinned sha256 is {expected_sha256}. Refusing "
            f"to build it: use the genuine {SDIST_FILE}, or restore the pin in "
            "tools/provision_detectron2.py if it was edited."
        )
    log(f"sha256 verified: {digest}")
    return path


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# Stage, patch, build, install
# ---------------------------------------------------------------------------------------------


def stage_sources(sdist: Path, workdir: Path) -> Path:
    """Extract only the ``detectron2/`` package into a fresh pure-Python project directory."""
    project = workdir / "detectron2-purepython"
    prefix = f"{SDIST_NAME}-{SDIST_VERSION}/detectron2/"
    with tarfile.open(sdist, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise ProvisionError(f"{sdist} has no {prefix} directory: not the expected sdist")
        for m in members:
            if not (m.isfile() or m.isdir()):
                raise ProvisionError(f"{sdist}: unexpected member type for {m.name}")
            m.name = m.name[len(f"{SDIST_NAME}-{SDIST_VERSION}/") :]
        tar.extractall(project, members=members, filter="data")
    return project


def apply_patches(package_dir: Path) -> None:
    for rel, old, new, why, count in PATCHES:
        path = package_dir / rel
        text = path.read_text()
        found = text.count(old)
        if found != count:
            raise ProvisionError(
                f"compatibility fix for detectron2/{rel} expected {count} occurrence(s) of "
                f"{old!r}, found {found}: the sdist is not the expected v0.6 tree."
            )
        path.write_text(text.replace(old, new))
        log(f"patched detectron2/{rel}: {why}")
    n_alias = 0
    for path in sorted(package_dir.rglob("*.py")):
        text = path.read_text()
        new, n = NUMPY_ALIAS.subn(r"\1", text)
        if n:
            path.write_text(new)
            n_alias += n
    log(f"replaced {n_alias} NumPy aliases: {NUMPY_ALIAS_WHY}")
    if (package_dir / "_C.py").exists() or list(package_dir.glob("_C.*.so")):
        raise ProvisionError("the sdist unexpectedly contains detectron2/_C; refusing to patch")
    (package_dir / "_C.py").write_text(_C_PLACEHOLDER)
    log("added detectron2/_C.py: the C++ extension is absent; ops that need it fail when used")


def write_build_files(project: Path) -> None:
    (project / "setup.py").write_text(
        textwrap.dedent(
            f"""\
            # Pure-Python build of Detectron2 v0.6 (no C++/CUDA extension), made by
            # nl_detectron's tools/provision_detectron2.py from the verified registry sdist.
            from setuptools import find_packages, setup

            setup(
                name="detectron2",
                version="{INSTALLED_VERSION}",
                description="Detectron2 v0.6 Python sources (no C++/CUDA extension)",
                license="Apache-2.0",
                python_requires=">=3.8",
                packages=find_packages(include=["detectron2", "detectron2.*"]),
                package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
                install_requires=[
                    "Pillow>=7.1",
                    "matplotlib",
                    "pycocotools>=2.0.2",
                    "termcolor>=1.1",
                    "yacs>=0.1.8",
                    "tabulate",
                    "cloudpickle",
                    "tqdm>4.29.0",
                    "tensorboard",
                    "fvcore>=0.1.5,<0.1.6",
                    "iopath>=0.1.7,<0.1.10",
                    "omegaconf>=2.1",
                    "hydra-core>=1.1",
                ],
            )
            """
        )
    )


def pip_install(python: str, project: Path) -> None:
    cmd = [
        python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-cache-dir",
        "--quiet", str(project),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ProvisionError(
            "building/installing the pure-Python Detectron2 failed. "
            f"{_remove_again(python)}\npip said:\n{_tail(proc.stdout + proc.stderr)}"
        )


def uninstall(python: str) -> None:
    """Uninstall the ``detectron2`` distribution (nothing if none is installed)."""
    proc = subprocess.run(
        [python, "-m", "pip", "uninstall", "--yes", "--quiet", "detectron2"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise ProvisionError(
            "pip could not uninstall the installed detectron2; remove it by hand "
            f"({python} -m pip uninstall detectron2).\npip said:\n"
            f"{_tail(proc.stdout + proc.stderr)}"
        )


def _remove_again(python: str) -> str:
    """After a failed install: uninstall what there is, and say how that went."""
    try:
        uninstall(python)
    except ProvisionError as e:
        return f"Removing it again failed too: {e}"
    return "No detectron2 is left installed."


# ---------------------------------------------------------------------------------------------
# Official Detectron2 from a source tree or tarball
# ---------------------------------------------------------------------------------------------


def stage_official_source(source: Path, workdir: Path) -> Path:
    """A private copy of the official source tree (``source``: a directory or a tarball such as
    ``git archive`` makes), so that the build leaves the user's tree untouched."""
    if not source.exists():
        raise ProvisionError(
            f"DETECTRON2_SOURCE={source} does not exist. Point it at a Detectron2 source tree "
            "(a clone of https://github.com/facebookresearch/detectron2) or a tarball of one."
        )
    staged = workdir / "detectron2-source"
    if source.is_dir():
        shutil.copytree(source, staged, ignore=shutil.ignore_patterns(".git", "build", "*.so"))
    else:
        try:
            with tarfile.open(source) as tar:
                tar.extractall(staged, filter="data")
        except (tarfile.TarError, OSError) as e:
            raise ProvisionError(
                f"DETECTRON2_SOURCE={source} is not a readable tarball: {e}"
            ) from None
        entries = list(staged.iterdir())
        if len(entries) == 1 and entries[0].is_dir():  # git archive --prefix=name/
            staged = entries[0]
    if not (staged / "setup.py").is_file() or not (staged / "detectron2" / "layers").is_dir():
        raise ProvisionError(
            f"DETECTRON2_SOURCE={source} is not a Detectron2 source tree: it has no setup.py "
            "and detectron2/layers at its top."
        )
    return staged


def _source_id(source: Path, fixes: str) -> str:
    """What identifies a build from source: the path, the sha256 of a tarball, and the fixes."""
    return f"{source}\n{sha256_of(source) if source.is_file() else 'directory'}\n{fixes}\n"


def _environment_prefix(python: str) -> Path:
    """``sys.prefix`` of ``python``: the environment's own directory (a venv's python is often a
    symlink to the base interpreter, so its resolved path leads elsewhere)."""
    proc = subprocess.run(
        [python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise ProvisionError(f"{python} does not run.\nIt said:\n{_tail(proc.stderr)}")
    return Path(proc.stdout.strip())


BUILT_FROM = "detectron2-built-from.txt"


def install_source(python: str, project: Path, source: Path) -> None:
    """Build and install the staged official source tree ``project`` with its own setup.py."""
    cmd = [
        python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-cache-dir",
        "--quiet", str(project),
    ]  # fmt: skip
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise ProvisionError(
            f"building Detectron2 from {source} failed (it needs a C++ compiler, and torch "
            f"installed first). {_remove_again(python)}\n"
            f"pip said:\n{_tail(proc.stdout + proc.stderr)}"
        )


def build_official(python: str, source: Path, source_fixes: bool = True) -> str:
    """Build and install the official Detectron2 from ``source`` with its C++ extension (unless
    the environment already holds a working build of that same source). With ``source_fixes``,
    the fixes of SOURCE_FIXES that this source needs in this environment are applied first."""
    marker = _environment_prefix(python) / BUILT_FROM
    with tempfile.TemporaryDirectory(prefix="nl-detectron2-src-") as tmp:
        project = stage_official_source(source, Path(tmp))
        planned = plan_source_fixes(python, project / "detectron2") if source_fixes else []
        fixes = (
            f"fixes r{SOURCE_FIXES_REVISION}: " + ", ".join(p.fix.name for p in planned)
            if source_fixes
            else "fixes: off"
        )
        build_id = _source_id(source, fixes)
        if source.is_file() and marker.is_file() and marker.read_text() == build_id:
            found = probe_detectron2(python)
            if found.usable and found.compiled:
                log(f"using the installed {found.describe()}, built from {source}; nothing to do")
                return found.describe()
            log(f"rebuilding: the Detectron2 built from {source} fails.\n{found.problem()}")
        marker.unlink(missing_ok=True)
        if not source_fixes:
            log("compatibility fixes off (DETECTRON2_SOURCE_FIXES=0): building the source as it is")
        elif not planned:
            log("this source needs none of the compatibility fixes in this environment")
        apply_source_fixes(project / "detectron2", planned)
        log(f"building Detectron2 from {source} with its C++ extension (a few minutes on 2 cores)")
        uninstall(python)  # the registry build would shadow it
        install_source(python, project, source)
    found = probe_detectron2(python)
    if not found.usable or not found.compiled:
        problem = (
            found.problem(source_fixes)
            if not found.usable
            else f"{found.describe()} has no C++ extension (its build skipped it)."
        )
        raise ProvisionError(
            f"Detectron2 built from {source} compiled and installed, but it cannot be used. "
            f"{_remove_again(python)}\n{problem}"
        )
    marker.write_text(build_id)
    log(f"installed {found.describe()}")
    return found.describe()


def provision(python: str, expected_sha256: str, keep_existing: bool = True) -> str:
    if keep_existing:
        found = probe_detectron2(python)
        outdated = _installed_distribution_version(python)
        if found.usable and outdated not in _OLDER_BUILDS:
            log(f"using the installed {found.describe()}; nothing to do")
            return found.describe()
        if found.usable:
            log(f"replacing the registry build {outdated}: its fixes are older than these")
        elif not found.missing:
            log(
                "the installed Detectron2 cannot be used; installing the registry build instead."
                f"\n{found.problem()}"
            )
    with tempfile.TemporaryDirectory(prefix="nl-detectron2-") as tmp:
        workdir = Path(tmp)
        sdist = fetch_sdist(python, workdir, expected_sha256)
        project = stage_sources(sdist, workdir)
        apply_patches(project / "detectron2")
        write_build_files(project)
        uninstall(python)  # a broken or older detectron2 would shadow the new one
        pip_install(python, project)
    found = probe_detectron2(python)
    if not found.usable:
        raise ProvisionError(
            "the pure-Python Detectron2 was installed but cannot be used. "
            f"{_remove_again(python)}\n{found.problem()}"
        )
    log(f"installed {found.describe()}")
    return found.describe()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter of the target environment"
    )
    parser.add_argument(
        "--sha256",
        default=os.environ.get("DETECTRON2_SDIST_SHA256", SDIST_SHA256),
        help="expected sha256 of the sdist (default: the pinned value)",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if a usable Detectron2 is installed"
    )
    parser.add_argument(
        "--source",
        default=os.environ.get("DETECTRON2_SOURCE") or None,
        help="build the official Detectron2 from this source tree or tarball instead "
        "(default: $DETECTRON2_SOURCE)",
    )
    parser.add_argument(
        "--no-source-fixes",
        dest="source_fixes",
        action="store_false",
        default=os.environ.get("DETECTRON2_SOURCE_FIXES", "1") != "0",
        help="with --source: build it as it is, without the compatibility fixes an older source "
        "needs on the pinned stack (default: on; DETECTRON2_SOURCE_FIXES=0 turns them off)",
    )
    args = parser.parse_args(argv)
    try:
        if args.source:
            source = Path(args.source).expanduser().resolve()
            build_official(args.python, source, source_fixes=args.source_fixes)
        else:
            provision(args.python, args.sha256.lower(), keep_existing=not args.force)
    except ProvisionError as e:
        print(f"\n[provision-detectron2] ERROR: {e}\n", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
