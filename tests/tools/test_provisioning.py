"""Detectron2 provisioning refuses what it cannot verify and never leaves a half-install."""

import importlib.util
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from training_runs import REPO

ROOT = REPO
SCRIPT = ROOT / "tools" / "provision_detectron2.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("provision_detectron2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args, env_extra=None, **kw):
    import os

    env = dict(os.environ)
    # Only what a test passes: `make test-main` builds its environment with DETECTRON2_SOURCE.
    for name in ("DETECTRON2_SOURCE", "DETECTRON2_SDIST"):
        env.pop(name, None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, **kw
    )


def _detectron2_still_imports():
    proc = subprocess.run(
        [sys.executable, "-c", "import detectron2.modeling, detectron2.engine"],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0


@pytest.mark.slow
def test_existing_detectron2_is_kept():
    proc = _run()
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout


@pytest.mark.slow
def test_tampered_sdist_is_refused_before_anything_is_built(tmp_path):
    fake = tmp_path / "pb1-detectron2-0.6.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        payload = b"raise SystemExit('this must never run')\n"
        info = tarfile.TarInfo("pb1-detectron2-0.6/setup.py")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    proc = _run("--force", env_extra={"DETECTRON2_SDIST": str(fake)})
    assert proc.returncode == 1
    assert "does not match" in proc.stderr or "but the pinned sha256 is" in proc.stderr
    assert "Refusing to build" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _detectron2_still_imports(), "a refused sdist must not touch the installed Detectron2"


@pytest.mark.slow
def test_missing_local_sdist_is_reported(tmp_path):
    missing = tmp_path / "nope.tar.gz"
    proc = _run("--force", env_extra={"DETECTRON2_SDIST": str(missing)})
    assert proc.returncode == 1
    assert f"DETECTRON2_SDIST={missing} does not exist" in proc.stderr
    assert _detectron2_still_imports()


@pytest.mark.slow
def test_wrong_pin_is_refused_by_the_download(tmp_path):
    """The pinned hash is enforced on the real download path (pip --require-hashes)."""
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "pb1-detectron2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        pytest.skip("the package index is unreachable")
    proc = _run("--force", "--sha256", "0" * 64, timeout=300)
    assert proc.returncode == 1
    assert "does not have the pinned sha256" in proc.stderr
    assert "Refusing to build" in proc.stderr
    assert _detectron2_still_imports()


@pytest.mark.parametrize("kind", ["missing", "not a tarball", "not detectron2"])
def test_a_bad_detectron2_source_is_refused_before_anything_is_built(kind, tmp_path):
    source = tmp_path / "detectron2.tar.gz"
    if kind == "not a tarball":
        source.write_text("hello")
    elif kind == "not detectron2":
        with tarfile.open(source, "w:gz") as tar:
            payload = b"print('some other project')\n"
            info = tarfile.TarInfo("other-1.0/setup.py")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    script = _load_script()
    messages = {
        "missing": "does not exist. Point it at a Detectron2 source tree",
        "not a tarball": "is not a readable tarball",
        "not detectron2": "is not a Detectron2 source tree: it has no setup.py and detectron2",
    }
    with pytest.raises(script.ProvisionError, match=messages[kind]):
        script.stage_official_source(source, tmp_path / "work")


def test_patches_refuse_an_unexpected_source_tree(tmp_path):
    """A tree where a fix does not apply exactly stops the build instead of half-patching."""
    script = _load_script()
    pkg = tmp_path / "detectron2"
    for rel, *_ in script.PATCHES:
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text("# nothing to patch here\n")
    with pytest.raises(script.ProvisionError, match="expected 1 occurrence"):
        script.apply_patches(pkg)


def test_numpy_alias_fix_is_exact():
    script = _load_script()
    src = "a = np.int\nb = np.int64\nc = np.float(x)\nd = np.int_\ne = np.bool\nf = np.str.x\n"
    out = script.NUMPY_ALIAS.sub(r"\1", src)
    assert out == "a = int\nb = np.int64\nc = float(x)\nd = np.int_\ne = bool\nf = np.str.x\n"


def test_installed_build_has_the_fixes():
    import detectron2
    from detectron2 import _C

    if not getattr(_C, "PURE_PYTHON_BUILD", False):
        pytest.skip("the registry v0.6 build only (its _C stand-in); this Detectron2 is compiled")
    root = Path(detectron2.__file__).parent
    assert "Image.LINEAR" not in (root / "data/transforms/transform.py").read_text()
    assert "pkg_resources" not in (root / "model_zoo/model_zoo.py").read_text()
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml")
    assert Path(path).is_file()
