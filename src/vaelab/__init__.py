"""vaelab: deep latent-variable models trained by the ELBO, with log-likelihood estimates you can trust."""

from vaelab._malloc import keep_freed_memory
from vaelab.estimators import (
    ElboParts,
    LogMarginal,
    PosteriorGap,
    elbo,
    elbo_integrands,
    elbo_parts,
    iwae_bound,
    log_marginal,
    log_weights,
    posterior_gap,
)
from vaelab.models import VAE, LinearGaussian

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import vaelab` stays light: the training stack loads on first use.
    if name in ("load_run", "TrainConfig"):
        import importlib

        return getattr(importlib.import_module("vaelab.train"), name)
    raise AttributeError(f"module 'vaelab' has no attribute {name!r}")


__all__ = [
    "VAE",
    "ElboParts",
    "LinearGaussian",
    "LogMarginal",
    "PosteriorGap",
    "TrainConfig",
    "__version__",
    "elbo",
    "elbo_integrands",
    "elbo_parts",
    "iwae_bound",
    "keep_freed_memory",
    "load_run",
    "log_marginal",
    "log_weights",
    "posterior_gap",
]
