"""The op rules: one per op family, found through one registry keyed by op type (:mod:`.base`).

Importing this package registers every rule; adding an op is adding one rule class to one of
the rule modules (and its test). :mod:`.ops` holds the op facts the passes read beyond channel
spaces; the weight-axis table and the ops the IR acts on itself sit lower, in ``ir.weights`` and
``ir.ops``.
"""

from . import elementwise, layers, structure  # noqa: F401  (each registers its rules)
from .base import RULES, Compensation, Rule, register

__all__ = ["RULES", "Compensation", "Rule", "register"]
