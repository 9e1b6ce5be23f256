"""The bnfused version, written in this one place: pyproject.toml reads it (setuptools dynamic version) and
bnfused.__version__ re-exports it."""
__version__ = "0.1.0"
