"""Where checkpoints of converted models saved by bnfused 0.1 find the rewritten forward's helpers: their pickles
name bnfused.graph_sites._restore_rewritten, and the forward source they store imports bn_add_relu_site from here.
convert()'s internals live in _graph_sites.py and _rewritten_forward.py."""
from ._rewritten_forward import _restore_rewritten, bn_add_relu_site  # noqa: F401
