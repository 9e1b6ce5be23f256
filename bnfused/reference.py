"""Deprecated alias of :mod:`bnfused.testing` (the unfused reference moved there)."""
import warnings

from .testing import KeyedDropout, reference_bn_add_relu_dropout, reference_block, reference_bn_relu_dropout  # noqa: F401

warnings.warn("bnfused.reference is deprecated: import from bnfused.testing", DeprecationWarning, stacklevel=2)
