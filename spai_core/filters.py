"""The official FFT low/high-pass split of a 224-px tile (spec section 1.2)."""
from __future__ import annotations

import torch


def frequency_mask(size: int = 224, radius: int = 16) -> torch.Tensor:
    """Circular low-pass mask on a centred ``size x size`` spectrum, exactly as the official code builds it.

    The per-axis coordinates are ``[size/2-1, ..., 1, 0, 0, 1, ..., size/2-1]``, so the mask is centred
    half a bin before the DC bin of ``fftshift`` (index ``size/2``). It is therefore not Hermitian-
    symmetric and the filtered images are complex; the official model keeps the real part. Radius is
    in frequency bins and the comparison is strict (``< radius``): 856 bins for 224/16.
    """
    if size % 2:
        raise ValueError(f"tile size must be even, got {size}")
    half = size // 2
    coords = torch.cat([torch.arange(half - 1, -1, -1), torch.arange(half)]).float()
    dist = torch.sqrt(coords[:, None] ** 2 + coords[None, :] ** 2)
    return dist < radius


def split_frequencies(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low- and high-pass images of ``x`` (``... x N x N`` in [0, 1]), each clamped to [0, 1].

    The FFT runs in float32 whatever the input dtype (as in the official model under AMP); outputs are
    cast back to the input dtype. Clamping zeroes the negative half of the zero-mean high-pass image,
    which is what the official model sees.
    """
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))
    keep = mask.to(device=x.device, dtype=spectrum.real.dtype)
    both = torch.stack([spectrum * keep, spectrum * (1 - keep)])
    low, high = torch.fft.ifft2(torch.fft.ifftshift(both, dim=(-2, -1))).real.clamp(0, 1).to(x.dtype)
    return low, high
