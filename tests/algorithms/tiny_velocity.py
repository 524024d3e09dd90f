"""A tiny velocity model for the SDE baselines' loss tests: v(x, s, label) on a 1x3x3 latent."""

from __future__ import annotations

import math

import torch
from torch import nn

LATENT = (1, 3, 3)


class TinyVelocity(nn.Module):
    """v(x, s, label): a small MLP on the flattened latent, the flow time and an embedded label."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        dim = math.prod(LATENT)
        self.inp = nn.Linear(dim + 1, hidden)
        self.label = nn.Embedding(3, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x, s, cond):
        s = torch.as_tensor(s, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        h = torch.tanh(self.inp(torch.cat([x.flatten(1), s[:, None]], 1)) + self.label(cond))
        return self.out(h).view_as(x)
