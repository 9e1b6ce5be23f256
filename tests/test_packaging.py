"""Packaging and user-facing text: the version has one source, setup.py explains a missing torch and
build_backend.py missing build tools in one line, and README.md / docs/ name only things a user of the repository
can follow (links that resolve, no issue numbers, no paths outside the repository). The pip install itself is
checked in CI by .ci/install_check.sh (it needs the package index and compiles the extension twice)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bnfused
from bnfused import _version

REPO = Path(__file__).resolve().parent.parent
USER_TEXT = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_version_has_one_source():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" in meta["project"]["dynamic"] and "version" not in meta["project"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "bnfused._version.__version__"}
    assert bnfused.__version__ == _version.__version__
    assert "version=" not in (REPO / "setup.py").read_text()


def test_build_does_not_pull_torch_into_an_isolated_build():
    """An isolated build would download a torch of several GB and build against it instead of the installed one;
    without torch in build-system.requires it stops at once with setup.py's message."""
    tomllib = pytest.importorskip("tomllib")
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not any(re.match(r"torch\b", r) for r in requires), requires
    assert "torch" in " ".join(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])


def test_setup_without_torch_says_what_to_do():
    # setup.py run by an interpreter where `import torch` fails, as in an isolated build or a torch-less venv.
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-build-isolation" in lines[0] and "torch" in lines[0], proc.stderr


@pytest.mark.parametrize("missing", ["setuptools", "wheel"])
def test_build_without_the_build_tools_says_what_to_install(missing):
    """pip without build isolation installs no build tools: a Python 3.12+ venv has no setuptools, a 3.11 one
    setuptools 65 without wheel (before, a traceback, or "invalid command 'bdist_wheel'" after the metadata)."""
    hide = ("sys.modules['setuptools'] = None" if missing == "setuptools" else
            "import setuptools; setuptools.__version__ = '65.5.0'; sys.modules['wheel'] = None")
    code = f"import sys; {hide}; import build_backend; build_backend.prepare_metadata_for_build_wheel('.')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{missing} is not installed" in lines[0], proc.stderr
    assert 'pip install "setuptools>=64" wheel' in lines[0] and "pip install --no-build-isolation ." in lines[0]


def test_build_backend_is_setuptools_behind_the_check():
    tomllib = pytest.importorskip("tomllib")
    build_system = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    assert (build_system["build-backend"], build_system["backend-path"]) == ("build_backend", ["."])
    code = ("import build_backend, setuptools.build_meta as sb; "
            "print(sorted(h for h in sb.__all__ if not h.startswith('_') and h[0].islower() "
            "and not hasattr(build_backend, h)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    assert "include build_backend.py" in (REPO / "MANIFEST.in").read_text()


@pytest.mark.parametrize("path", USER_TEXT, ids=lambda p: p.name)
def test_user_text_names_nothing_outside_the_repository(path):
    text = path.read_text()
    assert not re.search(r"\bissues?\b", text, re.IGNORECASE), "issue numbers mean nothing to a user"
    assert "../" not in text and "/work/" not in text and "shared/" not in text
    assert not re.search(r"\bsessions?\b|\bthe team\b|\bfrozen\b", text, re.IGNORECASE)


@pytest.mark.parametrize("path", USER_TEXT, ids=lambda p: p.name)
def test_user_text_links_resolve(path):
    """Every relative markdown link, and every path of the repository's folders named in backquotes, exists."""
    text = path.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{path.name} links {target}, which does not exist"
    tops = r"(?:csrc|bnfused|tests|benchmarks|docs|examples|\.ci)"
    for name in re.findall(rf"`({tops}/[A-Za-z0-9_.\-/]*)`", text):
        if name.rstrip("/").endswith("/local"):
            continue  # the bench's untracked output folder, made by the first run
        assert (REPO / name).exists(), f"{path.name} names `{name}`, which is not in the repository"


def test_public_surface_for_memory_and_testing():
    """The CPU output cache is released through a public call; the unfused reference lives in bnfused.testing and
    its old module path still imports, with a DeprecationWarning."""
    x = torch.randn(64, 64, 32, 32)  # 16 MiB: its output comes from the cache's block size
    bnfused.bn_relu_dropout(x, None, None, training=True, p=0.0)
    assert isinstance(bnfused.empty_cache(), int) and bnfused.empty_cache() == 0  # the second call finds nothing
    code = ("import warnings; warnings.simplefilter('error'); import bnfused.reference")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "DeprecationWarning: bnfused.reference is deprecated" in proc.stderr, proc.stderr
    from bnfused.testing import reference_bn_relu_dropout
    assert reference_bn_relu_dropout is bnfused.testing.reference_bn_relu_dropout
