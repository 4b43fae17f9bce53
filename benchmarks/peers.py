"""The peers' models built around vaelab's networks (same weights, same q and p(x|z)), shared by the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def pythae_vae(encoder: nn.Module, decoder: nn.Module, *, data_shape: Sequence[int], latent_dim: int, min_scale: float):
    """A pythae ``VAE(VAEConfig(reconstruction_loss="bce"))`` whose encoder and decoder are the given networks.

    ``encoder`` outputs (loc, raw scale) as vaelab's ``DiagonalGaussian`` reads them (scale = softplus(raw) +
    ``min_scale``), handed to pythae as (mean, log-variance); ``decoder`` outputs Bernoulli logits, handed to pythae
    as probabilities (its "bce" loss takes probabilities). pythae must be importable.
    """
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x):
            loc, raw = self.net(x).chunk(2, dim=-1)
            return ModelOutput(embedding=loc, log_covariance=2 * torch.log(F.softplus(raw) + min_scale))

    class Decoder(BaseDecoder):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

    config = VAEConfig(input_dim=tuple(data_shape), latent_dim=latent_dim, reconstruction_loss="bce")
    return VAE(config, encoder=Encoder(encoder), decoder=Decoder(decoder))
