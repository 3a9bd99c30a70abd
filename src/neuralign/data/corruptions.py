"""CIFAR-10-C style corruptions for grey-scale images (Fashion-MNIST-C), 5 severities.

``corrupt(images, name, severity, seed=...)`` takes float images in [0, 1] of shape
``(N, H, W)`` or ``(N, 1, H, W)`` and returns a new tensor of the same shape in [0, 1].

The families and severity constants follow Hendrycks & Dietterich's CIFAR-10-C code, rewritten
for one channel and vectorised over the batch in torch. Where the original needs ImageMagick or
stored photographs, the grey-scale stand-ins are: motion blur with a Gaussian-weighted line kernel
at a random angle per image; frost from a procedural ice texture (thresholded multi-scale noise,
streaked); snow and spatter from blurred, thresholded noise layers as in the original; JPEG via
Pillow. Kernel sizes are scaled from 32 to the image size.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from neuralign.errors import DataError

CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
    "gaussian_blur", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "spatter", "pixelate", "jpeg_compression", "contrast", "brightness",
)


def _gauss_kernel(sigma: float, radius: int | None = None) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma)) if radius is None else radius
    ax = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-ax ** 2 / (2 * max(sigma, 1e-6) ** 2))
    k2 = torch.outer(k, k)
    return k2 / k2.sum()


def _conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``x (N,1,H,W)`` convolved with one kernel ``(k,k)`` or per-image kernels ``(N,k,k)``."""
    k = kernel.shape[-1]
    pad = k // 2
    xp = F.pad(x, (pad, k - 1 - pad, pad, k - 1 - pad), mode="reflect" if pad < x.shape[-1]
               else "replicate")
    if kernel.dim() == 2:
        return F.conv2d(xp, kernel[None, None])
    n = x.shape[0]
    return F.conv2d(xp.reshape(1, n, *xp.shape[-2:]), kernel[:, None], groups=n).reshape_as(x)


def _blur(x, sigma):
    return _conv(x, _gauss_kernel(sigma))


def _disk(radius: float, alias_sigma: float) -> torch.Tensor:
    r = max(1, math.ceil(radius))
    ax = torch.arange(-r, r + 1, dtype=torch.float32)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    k = ((xx ** 2 + yy ** 2) <= radius ** 2).float()
    k = k / k.sum()
    return _conv(k[None, None], _gauss_kernel(alias_sigma, 1))[0, 0] if alias_sigma > 0 else k


def _motion_kernels(n: int, length: float, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Per-image line kernels of ``length`` pixels at random angles, Gaussian-weighted."""
    r = max(1, math.ceil(length))
    ax = torch.arange(-r, r + 1, dtype=torch.float32)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    theta = (torch.rand(n, generator=gen) * 2 - 1) * math.pi / 4
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    along = xx * cos + yy * sin  # one-sided blur as ImageMagick's -motion-blur
    across = -xx * sin + yy * cos
    k = torch.exp(-along ** 2 / (2 * sigma ** 2)) * (across.abs() < 0.5) * (along >= 0)
    k = k * (along <= length)
    k[:, r, r] += 1e-6
    return k / k.sum((1, 2), keepdim=True)


def _zoom(x: torch.Tensor, z: float) -> torch.Tensor:
    """Zoom in by ``z`` about the centre, keeping the size."""
    h, w = x.shape[-2:]
    ch, cw = max(1, math.ceil(h / z)), max(1, math.ceil(w / z))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)


def _frost_texture(n, h, w, gen):
    """Procedural ice: streaked, thresholded multi-scale noise in [0, 1]."""
    tex = torch.zeros(n, 1, h, w)
    for scale, weight in ((1, 0.5), (2, 0.3), (4, 0.2)):
        noise = torch.rand(n, 1, max(1, h // scale), max(1, w // scale), generator=gen)
        tex += weight * F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)
    tex = _conv(tex, _motion_kernels(n, 2.0, 1.0, gen))
    tex = ((tex - 0.45) / 0.25).clamp(0, 1)
    return tex ** 1.5


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    arr = (x[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    out = np.empty_like(arr)
    for i, im in enumerate(arr):  # Pillow encodes one image at a time
        buf = io.BytesIO()
        Image.fromarray(im, mode="L").save(buf, "JPEG", quality=quality)
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("L"))
    return torch.from_numpy(out).float()[:, None] / 255.0


def _apply(x: torch.Tensor, name: str, s: int, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    scale = h / 32.0
    if name == "gaussian_noise":
        c = [0.04, 0.06, 0.08, 0.09, 0.10][s]
        return x + torch.randn(x.shape, generator=gen) * c
    if name == "shot_noise":
        c = [500, 250, 100, 75, 50][s]
        return torch.poisson(x * c, generator=gen) / c
    if name == "impulse_noise":
        c = [0.01, 0.02, 0.03, 0.05, 0.07][s]
        u = torch.rand(x.shape, generator=gen)
        salt = torch.rand(x.shape, generator=gen) < 0.5
        return torch.where(u < c, salt.float(), x)
    if name == "speckle_noise":
        c = [0.06, 0.1, 0.12, 0.16, 0.2][s]
        return x + x * torch.randn(x.shape, generator=gen) * c
    if name == "gaussian_blur":
        return _blur(x, [0.4, 0.6, 0.7, 0.8, 1.0][s] * scale)
    if name == "defocus_blur":
        r, a = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s]
        return _conv(x, _disk(max(r * scale, 0.5), a))
    if name == "glass_blur":
        sigma, delta, iters = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2),
                               (0.4, 1, 2)][s]
        y = _blur(x, sigma * scale).reshape(n, h * w).clone()
        rows = torch.arange(n)
        for _ in range(iters):  # the original's local pixel shuffling, batched over images
            for i in range(h - delta, delta, -1):
                for j in range(w - delta, delta, -1):
                    d = torch.randint(-delta, delta, (2, n), generator=gen)  # per image
                    a, b = i * w + j, (i + d[1]) * w + (j + d[0])
                    y[rows, a], y[rows, b] = y[rows, b].clone(), y[rows, a].clone()
        return _blur(y.reshape(n, 1, h, w), sigma * scale)
    if name == "motion_blur":
        r, sig = [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)][s]
        return _conv(x, _motion_kernels(n, r * scale * 0.5, sig * scale, gen))
    if name == "zoom_blur":
        top = [1.06, 1.11, 1.16, 1.21, 1.26][s]
        zs = torch.arange(1.0, top, 0.01).tolist()
        return (x + sum(_zoom(x, z) for z in zs)) / (len(zs) + 1)
    if name == "snow":
        loc, sc, zoom, thr, rad, sig, blend = [
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][s]
        layer = torch.randn(x.shape, generator=gen) * sc + loc
        layer = _zoom(layer, zoom)
        layer = torch.where(layer < thr, torch.zeros_like(layer), layer)
        layer = _conv(layer.clamp(0, 1), _motion_kernels(n, rad * scale * 0.5, sig * scale, gen))
        x = blend * x + (1 - blend) * torch.maximum(x, x * 1.5 + 0.5)
        return x + layer + torch.rot90(layer, 2, dims=(-2, -1))
    if name == "frost":
        a, b = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][s]
        return a * x + b * _frost_texture(n, h, w, gen)
    if name == "spatter":
        sig, cover, inten = [(4, 0.06, 0.6), (3, 0.08, 0.6), (2, 0.1, 0.7), (1.5, 0.12, 0.8),
                             (1, 0.15, 0.9)][s]
        liquid = _blur(torch.randn(x.shape, generator=gen), sig * scale).reshape(n, -1)
        thr = torch.quantile(liquid, 1 - cover, dim=1, keepdim=True)
        drops = (liquid >= thr).float().reshape(x.shape)
        mask = _blur(drops, 0.5 * scale).clamp(0, 1) * inten
        return x * (1 - mask) + mask * 0.6  # light-grey water drops over a fraction `cover`
    if name == "pixelate":
        c = [0.95, 0.9, 0.85, 0.75, 0.65][s]
        small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
        return F.interpolate(small, size=(h, w), mode="nearest")
    if name == "jpeg_compression":
        return _jpeg(x, [80, 65, 58, 50, 40][s])
    if name == "contrast":
        c = [0.75, 0.5, 0.4, 0.3, 0.15][s]
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - m) * c + m
    if name == "brightness":
        return x + [0.05, 0.1, 0.15, 0.2, 0.3][s]
    raise DataError(f"unknown corruption {name!r}; available: {', '.join(CORRUPTIONS)}")


def corrupt(images: torch.Tensor, name: str, severity: int = 5, *, seed: int = 0) -> torch.Tensor:
    """A corrupted copy of ``images`` (float in [0, 1], ``(N, H, W)`` or ``(N, 1, H, W)``)."""
    if name not in CORRUPTIONS:
        raise DataError(f"unknown corruption {name!r}; available: {', '.join(CORRUPTIONS)}")
    if not 1 <= int(severity) <= 5:
        raise DataError(f"severity must be 1..5, got {severity}")
    x = torch.as_tensor(images)
    if not x.is_floating_point():
        raise DataError("corrupt expects float images in [0, 1]; divide uint8 images by 255")
    squeeze = x.dim() == 3
    if squeeze:
        x = x[:, None]
    if x.dim() != 4 or x.shape[1] != 1:
        raise DataError(f"corrupt expects (N, H, W) or (N, 1, H, W) grey images, "
                        f"got shape {tuple(images.shape)}")
    gen = torch.Generator().manual_seed(int(seed))
    out = _apply(x.detach().float().cpu(), name, int(severity) - 1, gen).clamp(0, 1)
    return out[:, 0] if squeeze else out
