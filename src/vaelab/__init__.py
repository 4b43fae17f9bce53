"""vaelab: deep latent-variable models trained by the ELBO, with log-likelihood estimates you can trust."""

from vaelab.estimators import (
    ElboParts,
    LogMarginal,
    PosteriorGap,
    elbo,
    elbo_parts,
    iwae_bound,
    log_marginal,
    log_weights,
    posterior_gap,
)
from vaelab.models import VAE, LinearGaussian

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "ElboParts",
    "LinearGaussian",
    "LogMarginal",
    "PosteriorGap",
    "__version__",
    "elbo",
    "elbo_parts",
    "iwae_bound",
    "log_marginal",
    "log_weights",
    "posterior_gap",
]
