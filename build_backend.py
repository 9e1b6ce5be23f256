"""The build backend pip runs for `pip install --no-build-isolation .` (pyproject.toml): setuptools' own, once the
build tools are found. Without build isolation pip installs none of build-system.requires, and a new virtual
environment may lack them (Python 3.12 and newer create it without setuptools; Python 3.11's setuptools 65 makes
wheels only with the wheel package): the build then stops with one line saying what to install, instead of a
traceback or setuptools' "invalid command 'bdist_wheel'"."""
import importlib.util
import re
import sys

_INSTALL = ('install them first: pip install "setuptools>=64" wheel, then build again with '
            "pip install --no-build-isolation .")


def _stop(why: str) -> None:
    sys.exit(f"bnfused: building needs setuptools >= 64 and wheel in this Python environment, and {why}; {_INSTALL}")


def _setuptools_version() -> tuple[int, ...]:
    try:
        import setuptools
    except ImportError:
        _stop("setuptools is not installed")
    return tuple(int(part) for part in re.findall(r"\d+", setuptools.__version__)[:2])


def _require_wheel_tools() -> None:
    """setuptools >= 70.1 makes wheels itself (bdist_wheel); older ones need the wheel package."""
    if _setuptools_version() < (70, 1) and importlib.util.find_spec("wheel") is None:
        _stop("wheel is not installed (this setuptools needs it to make wheels)")


_version = _setuptools_version()
if _version < (64,):  # editable installs (PEP 660) need 64
    _stop(f"this setuptools is {'.'.join(map(str, _version))}")

from setuptools import build_meta as _setuptools  # noqa: E402
from setuptools.build_meta import build_sdist, get_requires_for_build_sdist  # noqa: E402,F401


def _wheel_hook(name: str):
    hook = getattr(_setuptools, name)

    def checked(*args, **kwargs):
        _require_wheel_tools()
        return hook(*args, **kwargs)

    checked.__name__ = name
    return checked


get_requires_for_build_wheel = _wheel_hook("get_requires_for_build_wheel")
prepare_metadata_for_build_wheel = _wheel_hook("prepare_metadata_for_build_wheel")
build_wheel = _wheel_hook("build_wheel")
get_requires_for_build_editable = _wheel_hook("get_requires_for_build_editable")
prepare_metadata_for_build_editable = _wheel_hook("prepare_metadata_for_build_editable")
build_editable = _wheel_hook("build_editable")
