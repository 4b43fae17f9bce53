"""Pictures: image grids of samples and reconstructions (PNG via matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def _as_images(x: torch.Tensor, data_shape) -> np.ndarray:
    """``[N, *data_shape]`` -> ``[N, H, W, C]`` floats in [0, 1] (flat 784-vectors become 28x28)."""
    x = x.detach().float().cpu().clamp(0, 1)
    shape = tuple(data_shape)
    if len(shape) == 3:  # (C, H, W)
        images = x.reshape(-1, *shape).permute(0, 2, 3, 1)
    elif len(shape) == 2:
        images = x.reshape(-1, *shape, 1)
    else:
        side = math.isqrt(shape[0])
        if side * side != shape[0]:
            raise ValueError(f"cannot show data of shape {shape} as images")
        images = x.reshape(-1, side, side, 1)
    return images.numpy()


def image_grid(x: torch.Tensor, data_shape, *, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``[N, *data_shape]`` images into one ``[H, W, 3]`` array in [0, 1], ``ncol`` per row."""
    images = _as_images(x, data_shape)
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = image if c == 3 else np.repeat(image, 3, axis=-1)
    return grid


def save_grid(path: str | Path, x: torch.Tensor, data_shape, *, ncol: int | None = None) -> Path:
    """Write an image grid as PNG (written to a temporary name, then renamed)."""
    from matplotlib.image import imsave

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    imsave(tmp, image_grid(x, data_shape, ncol=ncol))
    tmp.replace(path)
    return path


def decoded_mean(model, z: torch.Tensor) -> torch.Tensor:
    """E[x | z] under the decoder (pixel probabilities for Bernoulli, the mean for Gaussians)."""
    return model.decode(z).mean


@torch.no_grad()
def sample_images(model, n: int) -> torch.Tensor:
    """``n`` draws z ~ p(z), shown as E[x|z]: ``[n, *data_shape]``."""
    z = model.prior.sample((n,))
    return decoded_mean(model, z)


@torch.no_grad()
def reconstruction_pairs(model, x: torch.Tensor) -> torch.Tensor:
    """Inputs and their reconstructions E[x | z = E_q[z]] interleaved row by row: ``[2N, *data_shape]``.

    With ``ncol = N`` the first row holds the inputs and the second their reconstructions.
    """
    recon = decoded_mean(model, model.encode(x).mean)
    return torch.cat([x, recon.to(x.dtype)])
