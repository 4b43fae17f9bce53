"""vaelab: deep latent-variable models trained by the ELBO, with log-likelihood estimates you can trust."""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers (nothing is imported at run time)
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
    from vaelab.train import TrainConfig, load_run

# Everything is loaded on first use, so that `import vaelab` (which `python -m vaelab` does before the command line
# runs) does not import torch: the command line then answers Ctrl-C during that import itself, without a traceback.
_LAZY = {
    "keep_freed_memory": "vaelab._malloc",
    **dict.fromkeys(
        "ElboParts LogMarginal PosteriorGap elbo elbo_integrands elbo_parts iwae_bound log_marginal log_weights "
        "posterior_gap".split(),
        "vaelab.estimators",
    ),
    **dict.fromkeys(("VAE", "LinearGaussian"), "vaelab.models"),
    **dict.fromkeys(("load_run", "TrainConfig"), "vaelab.train"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
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
