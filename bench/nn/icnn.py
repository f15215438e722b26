"""Input-convex neural networks (Amos, Xu and Kolter, ICML 2017) as OT-ICNN uses them.

The layout is Makkuva et al.'s (ICML 2020) "LastInp_Quadratic" network, a scalar function of a
flattened input x in R^D:

    z_1     = act(A_1 x + b_1)^2
    z_{k+1} = act(W_k z_k + A_{k+1} x + b_{k+1})          k = 1 .. depth-1
    f(x)    = w^T z_depth + (a^T x + b)^2

``act`` is a leaky ReLU (slope 0.2): convex and non-decreasing.  f is convex in x as long as
every hidden-to-hidden weight W_k and the output weight w are non-negative (a non-negative sum
of convex functions, composed with a convex non-decreasing activation, is convex); the
A (input skip) weights are unconstrained.  :meth:`ICNN.convex_weights` lists the constrained
weights; :meth:`ICNN.clamp_` projects them onto [0, inf) (the authors do this to f after every
update) and :meth:`ICNN.negativity` is the penalty sum relu(-W)^2 (their relaxation for g).

Initialisation follows the authors (truncated normal in +-1/sqrt(fan_in)), except that the
constrained weights start at their absolute values, so the network is convex from the start.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

SLOPE = 0.2


def input_gradient(net, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """grad_x of the scalar network ``net`` (summed over the batch) at ``x``, shaped like ``x``.

    ``create_graph`` keeps the graph, so a loss of the gradient can be trained through it (OT-ICNN's
    map grad g, W2GAN's Brenier maps x - grad u(x), OTM's gradient-optimality penalty)."""
    with torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(net(x).sum(), x, create_graph=create_graph)
    return grad


def _truncated_normal_(t: torch.Tensor, bound: float) -> torch.Tensor:
    with torch.no_grad():
        return nn.init.trunc_normal_(t, mean=0.0, std=1.0, a=-bound, b=bound)


class ICNN(nn.Module):
    """A convex scalar potential on (N, D) inputs; ``forward`` returns (N,)."""

    def __init__(self, dim: int, hidden: int = 1024, depth: int = 3):
        super().__init__()
        if depth < 1:
            raise ValueError(f"ICNN needs depth >= 1, got {depth}")
        self.dim, self.hidden, self.depth = int(dim), int(hidden), int(depth)
        self.skips = nn.ModuleList([nn.Linear(dim, hidden) for _ in range(depth)])          # A_k x + b_k
        self.convex = nn.ModuleList([nn.Linear(hidden, hidden, bias=False) for _ in range(depth - 1)])
        self.out = nn.Linear(hidden, 1, bias=False)                                            # w >= 0
        self.quadratic = nn.Linear(dim, 1)                                                     # (a^T x + b)^2
        for p in self.parameters():
            fan_in = p.shape[1] if p.dim() > 1 else p.shape[0]
            _truncated_normal_(p, 1.0 / math.sqrt(fan_in))
        with torch.no_grad():
            for w in self.convex_weights():
                w.abs_()

    def convex_weights(self) -> list[nn.Parameter]:
        """The weights that must stay non-negative for the network to be convex."""
        return [layer.weight for layer in self.convex] + [self.out.weight]

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project the constrained weights onto the non-negative orthant."""
        for w in self.convex_weights():
            w.clamp_(min=0)

    def negativity(self) -> torch.Tensor:
        """sum over the constrained weights of relu(-W)^2 (0 exactly when the network is convex)."""
        return sum(F.relu(-w).pow(2).sum() for w in self.convex_weights())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        z = F.leaky_relu(self.skips[0](x), SLOPE).pow(2)
        for convex, skip in zip(self.convex, self.skips[1:]):
            z = F.leaky_relu(convex(z) + skip(x), SLOPE)
        return (self.out(z) + self.quadratic(x).pow(2)).squeeze(1)

    def gradient(self, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """grad_x f(x) by autograd, shaped like ``x``; ``create_graph`` to train through it."""
        return input_gradient(self, x, create_graph)
