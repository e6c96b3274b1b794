"""Sequential fine-tuning: train on each task in turn, nothing else (the lower bound)."""

from mcit.methods import register
from mcit.methods.base import Method


@register
class SeqFT(Method):
    name = "seqft"
    summary = "Sequential fine-tuning on each task in turn (lower bound; a.k.a. DirectFT, LoRA-FT)."
