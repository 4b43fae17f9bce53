"""vaelab: deep latent-variable models trained by the ELBO, with log-likelihood estimates you can trust."""

__version__ = "0.1.0"

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


def __getattr__(name: str):
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
