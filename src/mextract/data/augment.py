"""Batched image augmentations on tensors ``(N, C, H, W)`` in [0, 1].

torchvision (whose ``TrivialAugmentWide`` the sources use) has no CPU build on the
machines this lab targets, and its transforms work one image at a time; these are
written by hand as whole-batch tensor operations, each sample drawing its own op and
magnitude from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_BINS = 31
# TrivialAugmentWide (Müller & Hutter, ICCV 2021), "wide" magnitude ranges.
_OPS = (
    "identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
    "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize",
)  # fmt: skip


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``b + factor·(a − b)``: factor 1 keeps ``a``, 0 gives ``b`` (PIL's ImageEnhance)."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp(0, 1)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    q = (x * 255).round().long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float("inf"))).amin(1, keepdim=True)
    lut = ((cdf - cdf_min) / (h * w - cdf_min).clamp_min(1)).clamp(0, 1)
    return lut.gather(1, q).view(n, c, h, w).to(x.dtype)


def trivial_augment_wide(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """TrivialAugmentWide: one op per image, chosen uniformly, at a uniform random magnitude.

    Geometric ops fill uncovered pixels with 0, as torchvision does by default.
    """
    n, _, h, w = x.shape
    # every random draw on the CPU generator (the same draws on every device), then moved
    op = torch.randint(len(_OPS), (n,), generator=generator)
    mag = torch.randint(_BINS, (n,), generator=generator).float() / (_BINS - 1)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    out = x.clone()
    opn = {name: op == i for i, name in enumerate(_OPS)}  # CPU masks: the affine parameters

    # geometric ops: one affine grid for the batch (identity rows for everything else)
    theta = torch.eye(2, 3).repeat(n, 1, 1)
    s = 0.99 * mag * sign
    theta[opn["shear_x"], 0, 1] = s[opn["shear_x"]]
    theta[opn["shear_y"], 1, 0] = s[opn["shear_y"]]
    t = 32.0 * mag * sign  # pixels; normalised coordinates span 2 over the image
    theta[opn["translate_x"], 0, 2] = (t * 2 / w)[opn["translate_x"]]
    theta[opn["translate_y"], 1, 2] = (t * 2 / h)[opn["translate_y"]]
    a = math.radians(135.0) * mag * sign
    rot = opn["rotate"]
    theta[rot, 0, 0], theta[rot, 0, 1] = torch.cos(a[rot]), -torch.sin(a[rot])
    theta[rot, 1, 0], theta[rot, 1, 1] = torch.sin(a[rot]), torch.cos(a[rot])
    geo = opn["shear_x"] | opn["shear_y"] | opn["translate_x"] | opn["translate_y"] | rot
    if geo.any():
        grid = F.affine_grid(theta[geo].to(x), [int(geo.sum()), *x.shape[1:]], align_corners=False)
        g = geo.to(x.device)
        out[g] = F.grid_sample(x[g], grid, padding_mode="zeros", align_corners=False)

    # the pixel ops on the images' device
    mag, sign = mag.to(x.device), sign.to(x.device)
    opn = {name: mask.to(x.device) for name, mask in opn.items()}

    factor = 1.0 + 0.99 * mag * sign
    if (m := opn["brightness"]).any():
        out[m] = _blend(x[m], torch.zeros_like(x[m]), factor[m])
    if (m := opn["color"]).any():
        out[m] = _blend(x[m], _gray(x[m]).expand_as(x[m]), factor[m])
    if (m := opn["contrast"]).any():
        mean = _gray(x[m]).mean(dim=(1, 2, 3), keepdim=True)
        out[m] = _blend(x[m], mean.expand_as(x[m]), factor[m])
    if (m := opn["sharpness"]).any():
        c = x.shape[1]
        k = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype) / 13
        blur = F.conv2d(x[m], k.view(1, 1, 3, 3).repeat(c, 1, 1, 1).to(x.device), padding=1, groups=c)
        blur[..., 0, :], blur[..., -1, :] = x[m][..., 0, :], x[m][..., -1, :]
        blur[..., :, 0], blur[..., :, -1] = x[m][..., :, 0], x[m][..., :, -1]
        out[m] = _blend(x[m], blur, factor[m])
    if (m := opn["posterize"]).any():
        bits = (8 - (mag[m] * 6).round()).view(-1, 1, 1, 1)  # 8 .. 2 bits kept
        step = 2.0 ** (8 - bits)
        out[m] = torch.floor(x[m] * 255 / step) * step / 255
    if (m := opn["solarize"]).any():
        thr = (1.0 - mag[m]).view(-1, 1, 1, 1)
        out[m] = torch.where(x[m] >= thr, 1.0 - x[m], x[m])
    if (m := opn["autocontrast"]).any():
        lo = x[m].amin(dim=(2, 3), keepdim=True)
        hi = x[m].amax(dim=(2, 3), keepdim=True)
        out[m] = torch.where(hi > lo, (x[m] - lo) / (hi - lo).clamp_min(1e-8), x[m])
    if (m := opn["equalize"]).any():
        out[m] = _equalize(x[m])
    return out.clamp_(0, 1)


def flip_crop(
    x: torch.Tensor, generator: torch.Generator, *, pad: int = 4, flip: bool = True
) -> torch.Tensor:
    """Random horizontal flip (p = 0.5) and random crop after zero padding by ``pad`` pixels."""
    n, _, h, w = x.shape
    if flip:
        f = torch.rand(n, generator=generator) < 0.5
        x = torch.where(f.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(-1, 1) + torch.arange(h)).to(x.device)
    cols = (dx.view(-1, 1) + torch.arange(w)).to(x.device)
    idx_n = torch.arange(n, device=x.device).view(-1, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()


def random_erasing(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float = 0.0,
) -> torch.Tensor:
    """Random Erasing (Zhong et al., AAAI 2020), torchvision's defaults: with probability
    ``p`` an image gets one rectangle of area ``scale`` × image and aspect ratio drawn
    log-uniformly from ``ratio`` set to ``value``. Rectangles are clipped to the image
    (torchvision retries up to 10 times instead; clipping keeps the batch vectorised)."""
    n, _, h, w = x.shape
    erase = torch.rand(n, generator=generator) < p
    area = h * w * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(lo + (hi - lo) * torch.rand(n, generator=generator))
    eh = torch.sqrt(area * r).round().clamp(1, h).long()
    ew = torch.sqrt(area / r).round().clamp(1, w).long()
    top = (torch.rand(n, generator=generator) * (h - eh + 1)).long()
    left = (torch.rand(n, generator=generator) * (w - ew + 1)).long()
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    mask = (
        (rows >= top.view(-1, 1, 1))
        & (rows < (top + eh).view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1))
        & (cols < (left + ew).view(-1, 1, 1))
        & erase.view(-1, 1, 1)
    )
    return torch.where(mask.unsqueeze(1).to(x.device), torch.full_like(x, value), x)


def random_rotation(x: torch.Tensor, generator: torch.Generator, *, degrees: float = 15.0) -> torch.Tensor:
    """Rotate each image by an angle drawn uniformly from ``[-degrees, degrees]`` (zero fill)."""
    n = x.shape[0]
    a = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), -torch.sin(a)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
