"""Detectron2 provisioning refuses what it cannot verify and never leaves a half-install."""

import importlib.util
import io
import shutil
import subprocess
import sys
import tarfile
import traceback
from pathlib import Path

import pytest
from training_runs import REPO

ROOT = REPO
SCRIPT = ROOT / "tools" / "provision_detectron2.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("provision_detectron2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being made
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


# ---------------------------------------------------------------------------------------------
# Official sources older than the pinned stack: fixes where needed, and failures with their cause

# Lines as the official sources have them (v0.6 and main b2948fb; main fixed each later).
_OLD_LINES = {
    "data/transforms/transform.py": (
        "from PIL import Image\n\n\nclass ExtentTransform:\n"
        "    def __init__(self, src_rect, output_size, interp=Image.LINEAR, fill=0):\n"
        "        self.interp = interp\n"
    ),
    "data/build.py": (
        "import numpy as np\n\n\ndef histogram(n):\n    return np.zeros((n,), dtype=np.int)\n"
    ),
    "export/__init__.py": "from .api import *\nfrom .flatten import TracingAdapter\n",
}
_NEW_LINES = {
    "data/transforms/transform.py": _OLD_LINES["data/transforms/transform.py"].replace(
        "Image.LINEAR", "Image.BILINEAR"
    ),
    "data/build.py": _OLD_LINES["data/build.py"].replace("np.int", "int"),
    "export/__init__.py": (
        "try:\n    from caffe2.proto import caffe2_pb2 as _tmp\nexcept ImportError:\n    pass\n"
        "else:\n    from .api import *\n"
    ),
}


def _stub_source(root: Path, lines: dict[str, str]) -> Path:
    """A Detectron2 source tree in miniature: version 0.6, the subpackages the probe imports, a
    compiled-looking ``_C``, and ``lines``; ``export/api.py`` would need caffe2."""
    pkg = root / "detectron2"
    files = {
        "__init__.py": '__version__ = "0.6"\n',
        "_C.py": "",
        "layers/__init__.py": "",
        "modeling/__init__.py": "",
        "evaluation/__init__.py": "",
        "engine/__init__.py": "",
        "data/__init__.py": "from .transforms import transform  # noqa: F401\n",
        "data/transforms/__init__.py": "",
        "export/api.py": "from caffe2.proto import caffe2_pb2  # noqa: F401\n",
        "export/flatten.py": "TracingAdapter = object\n",
        **lines,
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    (root / "setup.py").write_text("raise SystemExit('the tests never build this')\n")
    return root


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    """build_official on this interpreter, with pip replaced: "installing" copies the staged
    package to a directory that PYTHONPATH puts before the real Detectron2, and the build
    marker goes to tmp_path instead of the environment."""
    script = _load_script()
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(site))
    calls = []

    def install(python, project, source):
        calls.append("install")
        shutil.copytree(project / "detectron2", site / "detectron2")

    def uninstall(python):
        calls.append("uninstall")
        shutil.rmtree(site / "detectron2", ignore_errors=True)

    monkeypatch.setattr(script, "install_source", install)
    monkeypatch.setattr(script, "uninstall", uninstall)
    monkeypatch.setattr(script, "_environment_prefix", lambda python: tmp_path)
    return script, site, calls


def test_a_failing_import_names_module_exception_frames_and_fix(tmp_path, monkeypatch):
    script = _load_script()
    _stub_source(tmp_path / "site", _OLD_LINES)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    found = script.probe_detectron2(sys.executable)
    assert not found.usable
    assert found.module == "detectron2.data"
    assert found.origin == "detectron2.data.transforms.transform"
    assert found.exception == "AttributeError: module 'PIL.Image' has no attribute 'LINEAR'"
    assert found.frames[-1][0].endswith("data/transforms/transform.py")
    assert "interp=Image.LINEAR" in found.frames[-1][3]
    problem = found.problem(source_fixes=False)
    for fix in ("ff53992b", "DETECTRON2_SOURCE_FIXES=0", "pillow<10"):
        assert fix in problem, problem


def test_an_old_source_built_as_it_is_fails_with_the_real_cause(fake_env, tmp_path, capsys):
    script, site, calls = fake_env
    source = _stub_source(tmp_path / "src", _OLD_LINES)
    with pytest.raises(script.ProvisionError) as e:
        script.build_official(sys.executable, source, source_fixes=False)
    message = str(e.value)
    assert "compiled and installed, but it cannot be used" in message
    assert "detectron2.data does not import, in detectron2.data.transforms.transform" in message
    assert "AttributeError: module 'PIL.Image' has no attribute 'LINEAR'" in message
    assert "transform.py" in message and "Fix it in one of these ways" in message
    assert calls == ["uninstall", "install", "uninstall"], "a failed build is removed again"
    assert not (tmp_path / script.BUILT_FROM).exists()
    assert "fixed" not in capsys.readouterr().out


def test_an_old_source_gets_the_fixes_it_needs(fake_env, tmp_path, capsys):
    script, site, calls = fake_env
    source = _stub_source(tmp_path / "src", _OLD_LINES)
    found = script.build_official(sys.executable, source)
    assert "detectron2 0.6 (compiled)" in found
    for rel, text in _OLD_LINES.items():
        assert (source / "detectron2" / rel).read_text() == text, "the user's tree is untouched"
    installed = site / "detectron2"
    assert "interp=Image.BILINEAR" in (installed / "data/transforms/transform.py").read_text()
    assert "dtype=int)" in (installed / "data/build.py").read_text()
    assert "except ImportError" in (installed / "export/__init__.py").read_text()
    out = capsys.readouterr().out
    for fix in script.SOURCE_FIXES:
        assert f"fixed {fix.name}" in out and fix.upstream in out
    built = (tmp_path / script.BUILT_FROM).read_text()
    assert "Pillow Image.LINEAR, NumPy aliases, caffe2 exporter import" in built


def test_a_source_that_needs_no_fix_is_built_as_it_is(fake_env, tmp_path, capsys):
    script, site, calls = fake_env
    source = _stub_source(tmp_path / "src", _NEW_LINES)
    script.build_official(sys.executable, source)
    for path in (source / "detectron2").rglob("*.py"):
        rel = path.relative_to(source)
        assert (site / rel).read_bytes() == path.read_bytes(), rel
    assert "needs none of the compatibility fixes" in capsys.readouterr().out


def test_a_fix_is_planned_only_where_the_environment_lacks_what_the_source_uses(
    tmp_path, monkeypatch
):
    script = _load_script()
    pkg = _stub_source(tmp_path, _OLD_LINES) / "detectron2"
    names = [fix.name for fix in script.SOURCE_FIXES]
    planned = script.plan_source_fixes(sys.executable, pkg)  # the pinned stack lacks all three
    assert [p.fix.name for p in planned] == names
    assert [str(f) for p in planned for f in p.files] == list(_OLD_LINES)
    # An environment that still has them (an older Pillow, say) needs none of them.
    monkeypatch.setattr(script, "_lacking_in_environment", lambda python: dict.fromkeys(names, []))
    assert script.plan_source_fixes(sys.executable, pkg) == []


def _exception_line(code: str) -> str:
    try:
        exec(code, {})
    except Exception as e:
        return "".join(traceback.format_exception_only(type(e), e)).strip()
    pytest.fail(f"{code!r} raised nothing: the pinned stack is not what this test expects")


def test_each_fix_names_its_upstream_commit_and_recognizes_the_real_exception():
    """Each fix's symptom matches the exception the pinned stack really raises, so a source
    built without the fix fails with the fix's name, its upstream commit and the ways out."""
    script = _load_script()
    raised = {
        "Pillow Image.LINEAR": "import PIL.Image; PIL.Image.LINEAR",
        "NumPy aliases": "import numpy as np; np.float",
        "caffe2 exporter import": "import caffe2",
    }
    assert set(raised) == {fix.name for fix in script.SOURCE_FIXES}
    for fix in script.SOURCE_FIXES:
        advice = "\n".join(script._known_fix(_exception_line(raised[fix.name]), None))
        assert fix.why in advice and fix.upstream in advice, fix.name
        assert "DETECTRON2_SOURCE_FIXES=0" in advice


def test_a_probe_or_uninstall_that_cannot_run_says_so():
    script = _load_script()
    with pytest.raises(script.ProvisionError, match="exit status 1"):
        script.probe_detectron2("/bin/false")
    with pytest.raises(script.ProvisionError, match="pip could not uninstall"):
        script.uninstall("/bin/false")
    assert script._remove_again("/bin/false").startswith("Removing it again failed too")
