"""Gradient projection memory for Fwd-Prompt: orthonormal bases of input subspaces (GPM) and
the projection of prompt gradients off the old tasks' subspace and onto the pre-trained one."""

from __future__ import annotations

import torch


def extend_basis(basis: torch.Tensor | None, rows: torch.Tensor, energy: float) -> torch.Tensor:
    """GPM: add to the orthonormal ``basis`` (d x r) the fewest singular directions of ``rows``
    (n x d) beyond it so that the basis captures ``energy`` of the rows' squared norm."""
    rows = rows.double()
    d = rows.shape[1]
    total = float((rows**2).sum())
    if basis is None or basis.shape[1] == 0:
        basis = rows.new_zeros(d, 0)
    basis = basis.double()
    inside = rows @ basis
    captured = float((inside**2).sum())
    residual = rows - inside @ basis.T
    need = energy * total - captured
    if need <= 0 or basis.shape[1] >= d:
        return basis
    _, s, vh = torch.linalg.svd(residual, full_matrices=False)
    cum = torch.cumsum(s**2, 0)
    r = min(int(torch.searchsorted(cum, torch.tensor(need, dtype=cum.dtype)).item()) + 1, d - basis.shape[1], len(s))
    q, _ = torch.linalg.qr(torch.cat([basis, vh[:r].T], dim=1))
    return q


def project(grad: torch.Tensor, old: torch.Tensor | None, pre: torch.Tensor | None, residual: bool,
            pretrained: float) -> torch.Tensor:
    """Fwd-Prompt's projection of prompt gradients (rows in the embedding space), see the module doc."""
    shape, g = grad.shape, grad.reshape(-1, grad.shape[-1]).double()

    def off_old(x):
        return x - (x @ old) @ old.T if old is not None and old.shape[1] else x

    g = off_old(g) if residual else g
    if pretrained and pre is not None and pre.shape[1]:
        g = g + pretrained * (g @ pre) @ pre.T
        g = off_old(g) if residual else g
    return g.to(grad.dtype).reshape(shape)
