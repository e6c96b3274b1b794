"""Zero-shot: evaluate the starting model on every task, no training."""

from mcit.methods import register
from mcit.methods.base import Method


@register
class ZeroShot(Method):
    name = "zeroshot"
    walk = "none"
    summary = "Evaluate the starting model on every task without training (row 0 of every matrix)."
