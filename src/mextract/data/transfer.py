"""Out-of-domain attacker pools: other datasets and natural-image patches, conformed to a victim.

Knockoff Nets (Orekondy et al., CVPR 2019) steal a victim with *transfer sets* drawn
from a distribution other than the victim's training data. This module brings any
image batch to a victim's input shape and offers two sources of such pools that need
no download:

* every dataset of :data:`mextract.data.DATASETS` (``digits`` upscaled to 28×28 for an
  MNIST victim, ``mnist`` downscaled to 8×8 for a digits victim, ``cifar10`` from the
  user's copy), with its **own** labels and class names kept — the adaptive Knockoff
  policy samples by pool-side class and never needs the victim-side truth;
* ``font_glyphs``: letters and symbols — never a digit — rendered from the DejaVu fonts
  that ship with matplotlib, in random fonts, sizes, rotations, positions and both
  polarities; each glyph's class is its character;
* ``natural_patches``: random square crops of the two photographs that ship with
  scikit-learn (:func:`sklearn.datasets.load_sample_images`, "china" and "flower").
  Each patch's class is ``<photo>/c<j>``, the photo it came from and its k-means
  cluster (on the conformed pixels) within that photo, so that class-driven policies
  have more than two arms.

Conforming (:func:`conform_images`): bilinear resizing with
:func:`torch.nn.functional.interpolate` (antialiased when shrinking, so that a 128-pixel
crop becomes a faithful 28×28 thumbnail instead of an aliased one), then channel
mapping: RGB → grey by ITU-R BT.601 luminance ``0.299 R + 0.587 G + 0.114 B``, grey → RGB
by repeating the channel. Values are clamped to [0, 1] afterwards (bilinear
interpolation cannot leave the range; the clamp only guards rounding).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mextract.data.base import Dataset
from mextract.errors import DataError, InputError, UnknownNameError

logger = logging.getLogger(__name__)

NATURAL_PATCHES = "natural_patches"
#: Default number of natural patches, and the crop sizes (pixels of the 427×640 photos).
NATURAL_PATCHES_SIZE = 5000
PATCH_SIDE_RANGE = (24, 160)
#: k-means clusters per photo for the patch classes (2 photos × 5 = 10 pool classes).
PATCH_CLUSTERS_PER_PHOTO = 5

FONT_GLYPHS = "font_glyphs"
#: enough for the 10,000-query budgets of the sources (rendering takes ~0.6 ms a glyph)
FONT_GLYPHS_SIZE = 20000
#: Latin letters and common symbols: no digit, so that a digit victim's pool holds none of its task
GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+-=<>#%&@$?!*/\\()[]{}~^|:;"
#: the canvas glyphs are drawn on before conforming (an MNIST-like 28-pixel victim gets a 2.3× downscale)
GLYPH_CANVAS = 64

_LUMA = (0.299, 0.587, 0.114)


def _image_shape(input_shape: Sequence[int], what: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"{what}: expected an image input shape (C, H, W), got {shape}")
    if shape[0] not in (1, 3):
        raise InputError(f"{what}: expected 1 (grey) or 3 (RGB) channels, got {shape[0]}")
    return (shape[0], shape[1], shape[2])


def conform_images(x: torch.Tensor, input_shape: Sequence[int]) -> torch.Tensor:
    """Resize and channel-map a batch of images ``(N, C, H, W)`` to ``input_shape``.

    Args:
        x: float images in [0, 1] with 1 or 3 channels.
        input_shape: the victim's ``(C', H', W')``, with ``C'`` 1 or 3.

    Returns:
        A float32 tensor ``(N, C', H', W')`` in [0, 1] (``x`` itself, as float32, when it
        already has that shape).
    """
    c, h, w = _image_shape(input_shape, "input_shape")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"images: expected a tensor (N, C, H, W), got {shape}")
    if x.shape[1] not in (1, 3):
        raise InputError(f"images: expected 1 or 3 channels, got {x.shape[1]}")
    x = x.float()
    if tuple(x.shape[1:]) == (c, h, w):
        return x
    if len(x) == 0:
        return x.new_zeros(0, c, h, w)
    # channel mapping first when it shrinks the data (cheaper to resize one channel)
    if x.shape[1] == 3 and c == 1:
        luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x * luma).sum(1, keepdim=True)
    if tuple(x.shape[2:]) != (h, w):
        shrinking = h < x.shape[2] or w < x.shape[3]
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrinking)
    if x.shape[1] == 1 and c == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    return x.clamp_(0.0, 1.0)


def kmeans(
    x: torch.Tensor, k: int, *, generator: torch.Generator, iterations: int = 25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding on rows of ``x`` (flattened), batched.

    Returns ``(labels (N,), centres (k, D))``. Empty clusters are re-seeded at the point
    farthest from its centre. All randomness comes from ``generator``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k: expected a positive integer, got {k!r}")
    flat = x.reshape(len(x), -1).float()
    n = len(flat)
    if n < k:
        raise InputError(f"k-means: expected at least k={k} points, got {n}")
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [flat[first]]
    d2 = ((flat - flat[first]) ** 2).sum(1)
    for _ in range(1, k):  # k-means++: next centre with probability ∝ squared distance
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        centres.append(flat[nxt])
        d2 = torch.minimum(d2, ((flat - flat[nxt]) ** 2).sum(1))
    c = torch.stack(centres)
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        dist = torch.cdist(flat, c)
        new = dist.argmin(1)
        counts = torch.bincount(new, minlength=k)
        for j in torch.nonzero(counts == 0).flatten().tolist():  # re-seed empty clusters
            far = int(dist.gather(1, new[:, None]).squeeze(1).argmax())
            new[far] = j
        counts = torch.bincount(new, minlength=k)
        c = torch.zeros_like(c).index_add_(0, new, flat) / counts[:, None].clamp_min(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels, c


def _photos() -> list[tuple[str, torch.Tensor]]:
    try:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
    except (ImportError, OSError) as exc:  # pillow missing or files absent
        raise DataError(f"{NATURAL_PATCHES}: cannot read scikit-learn's sample images: {exc}") from exc
    out = []
    for path, img in zip(bunch.filenames, bunch.images, strict=True):
        t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float() / 255.0
        out.append((Path(path).stem, t))
    return out


def natural_patches(
    input_shape: Sequence[int],
    *,
    size: int = NATURAL_PATCHES_SIZE,
    seed: int = 0,
    side_range: tuple[int, int] = PATCH_SIDE_RANGE,
    clusters_per_photo: int = PATCH_CLUSTERS_PER_PHOTO,
) -> Dataset:
    """Random square crops of scikit-learn's two sample photos, conformed to ``input_shape``.

    Each patch: a photo chosen uniformly, a side drawn uniformly from ``side_range``
    pixels, a uniformly placed crop, a horizontal flip with probability 1/2, then
    :func:`conform_images`. Classes are ``<photo>/c<j>``: the photo and the patch's
    k-means cluster (``clusters_per_photo`` per photo) on its conformed pixels.
    Everything is drawn from a generator seeded with ``seed``.
    """
    shape = _image_shape(input_shape, NATURAL_PATCHES)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"{NATURAL_PATCHES}: size: expected a positive integer, got {size!r}")
    lo, hi = side_range
    if not 1 <= lo <= hi:
        raise InputError(f"{NATURAL_PATCHES}: side_range: expected 1 <= low <= high, got {side_range}")
    k = clusters_per_photo
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"{NATURAL_PATCHES}: clusters_per_photo: expected a positive integer, got {k!r}")
    photos = _photos()
    g = torch.Generator().manual_seed(seed)
    photo_idx = torch.randint(len(photos), (size,), generator=g)
    sides = torch.randint(lo, hi + 1, (size,), generator=g)
    u = torch.rand(size, 2, generator=g)
    flips = torch.rand(size, generator=g) < 0.5
    patches = torch.empty(size, *shape)
    for p, (_, img) in enumerate(photos):
        idx = torch.nonzero(photo_idx == p).flatten()
        hh, ww = img.shape[1:]
        for s_val in torch.unique(sides[idx]).tolist():  # one batched resize per crop side
            sel = idx[sides[idx] == s_val]
            s = min(int(s_val), hh, ww)
            top = (u[sel, 0] * (hh - s + 1)).long().clamp_max(hh - s)
            left = (u[sel, 1] * (ww - s + 1)).long().clamp_max(ww - s)
            rows = top[:, None] + torch.arange(s)  # (n, s)
            cols = left[:, None] + torch.arange(s)
            crops = img[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)  # (n, 3, s, s)
            crops = torch.where(flips[sel].view(-1, 1, 1, 1), crops.flip(3), crops)
            patches[sel] = conform_images(crops, shape)
    labels = torch.empty(size, dtype=torch.long)
    classes: list[str] = []
    for p, (stem, _) in enumerate(photos):
        idx = torch.nonzero(photo_idx == p).flatten()
        k_p = max(1, min(k, len(idx)))
        if len(idx):
            lab, _ = kmeans(patches[idx], k_p, generator=g)
            labels[idx] = lab + len(classes)
        classes += [f"{stem}/c{j}" for j in range(k_p)]
    logger.info("natural patches: %d crops of %d photos conformed to %s", size, len(photos), shape)
    return Dataset(patches, labels, tuple(classes), NATURAL_PATCHES)


def _font_files() -> list[Path]:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise DataError(f"{FONT_GLYPHS}: needs matplotlib's fonts: {exc}") from exc
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    files = sorted(p for p in folder.glob("DejaVu*.ttf") if "Display" not in p.name)
    if not files:
        raise DataError(f"{FONT_GLYPHS}: no DejaVu fonts in {folder}")
    return files


def font_glyphs(
    input_shape: Sequence[int],
    *,
    size: int = FONT_GLYPHS_SIZE,
    seed: int = 0,
    glyphs: str = GLYPHS,
) -> Dataset:
    """Letters and symbols rendered from matplotlib's DejaVu fonts, conformed to ``input_shape``.

    Each image: a character of ``glyphs`` and one of the DejaVu fonts (sans, serif, mono;
    regular, bold, oblique) drawn uniformly; a glyph height of 45–85% of the canvas; a
    rotation in ±20°; a shift of up to 15% of the canvas; light strokes on a dark ground or
    the reverse with probability 1/2 each (a pool that does not know the victim's
    convention); then :func:`conform_images`. Its class is its character. Nothing is
    downloaded: the fonts ship with matplotlib. The default glyphs hold no digit, so a digit
    victim's pool holds nothing of its task (some letters resemble digits — O, l, S, Z, B —
    as they would in any text an attacker finds).
    """
    from PIL import Image, ImageDraw, ImageFont

    shape = _image_shape(input_shape, FONT_GLYPHS)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"{FONT_GLYPHS}: size: expected a positive integer, got {size!r}")
    chars = list(dict.fromkeys(glyphs))
    if not chars:
        raise InputError(f"{FONT_GLYPHS}: glyphs: expected at least one character")
    files = _font_files()
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(len(chars), (size,), generator=g).tolist()
    fonts = torch.randint(len(files), (size,), generator=g).tolist()
    heights = (0.45 + 0.40 * torch.rand(size, generator=g)).tolist()
    angles = ((torch.rand(size, generator=g) - 0.5) * 40).tolist()
    shifts = ((torch.rand(size, 2, generator=g) - 0.5) * 0.3 * GLYPH_CANVAS).tolist()
    dark = (torch.rand(size, generator=g) < 0.5).tolist()
    loaded: dict[tuple[int, int], Any] = {}
    canvas = torch.empty(size, 1, GLYPH_CANVAS, GLYPH_CANVAS)
    for i in range(size):
        px = max(8, round(heights[i] * GLYPH_CANVAS))
        key = (fonts[i], px)
        if key not in loaded:
            loaded[key] = ImageFont.truetype(str(files[fonts[i]]), px)
        img = Image.new("L", (GLYPH_CANVAS, GLYPH_CANVAS), 0)
        draw = ImageDraw.Draw(img)
        centre = (GLYPH_CANVAS / 2 + shifts[i][0], GLYPH_CANVAS / 2 + shifts[i][1])
        draw.text(centre, chars[which[i]], fill=255, font=loaded[key], anchor="mm")
        img = img.rotate(angles[i], resample=Image.Resampling.BILINEAR)
        t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        canvas[i, 0] = t if dark[i] else 1.0 - t
    x = conform_images(canvas, shape)
    logger.info("font glyphs: %d images of %d characters in %d fonts, conformed to %s", size, len(chars),
                len(files), shape)  # fmt: skip
    return Dataset(x, torch.tensor(which, dtype=torch.long), tuple(chars), FONT_GLYPHS)


def pool_names() -> tuple[str, ...]:
    """Every name :func:`load_pool` accepts."""
    from mextract.data.registry import DATASETS

    return (*DATASETS, NATURAL_PATCHES, FONT_GLYPHS)


def check_pool(name: str, input_shape: Sequence[int], root: str | Path | None = None) -> None:
    """Check, without loading it, that :func:`load_pool` can conform pool ``name`` to a victim
    of ``input_shape``: a known name, images for an image victim, the same features for a
    tabular one."""
    from mextract.data.registry import dataset_info

    shape = tuple(int(s) for s in input_shape)
    if name in (NATURAL_PATCHES, FONT_GLYPHS):
        _image_shape(shape, f"pool {name!r}")
        return
    if name not in pool_names():
        raise UnknownNameError("pool", name, pool_names())
    info = dataset_info(name, root)
    if len(info.input_shape) == 3:
        _image_shape(shape, f"pool {name!r} (images)")
    elif info.input_shape != shape:
        raise InputError(
            f"pool {name!r}: tabular features of shape {info.input_shape} cannot be conformed to a "
            f"victim input of shape {shape}; expected the same features"
        )


def load_pool(
    name: str,
    input_shape: Sequence[int],
    *,
    seed: int = 0,
    size: int | None = None,
    root: str | Path | None = None,
) -> Dataset:
    """A whole named dataset conformed to a victim's input shape, as an attacker pool.

    Args:
        name: a dataset of :data:`mextract.data.DATASETS` (all of it: its victim-train,
            pool and test splits together, since none of it is the victim's), or
            ``"natural_patches"`` or ``"font_glyphs"``.
        input_shape: the victim's input shape.
        seed: seeds the random subset (``size``) and the natural patches.
        size: keep this many samples (a seeded uniform subset without replacement; for
            ``natural_patches`` the number of patches, 5,000 by default; ``font_glyphs`` 20,000).
            ``None``: all.
        root: data location for datasets that are not bundled (``cifar10``).

    Returns:
        A :class:`Dataset` whose ``y`` and ``classes`` are the pool's *own* labels (not
        the victim's), for class-driven sampling policies such as adaptive Knockoff.
    """
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise InputError(f"size: expected a positive integer or None, got {size!r}")
    shape = tuple(int(s) for s in input_shape)
    if name == NATURAL_PATCHES:
        return natural_patches(shape, size=NATURAL_PATCHES_SIZE if size is None else size, seed=seed)
    if name == FONT_GLYPHS:
        return font_glyphs(shape, size=FONT_GLYPHS_SIZE if size is None else size, seed=seed)
    from mextract.data.registry import DATASETS, load_splits

    if name not in DATASETS:
        raise UnknownNameError("pool", name, pool_names())
    splits = load_splits(name, seed=seed, root=root)
    parts = (splits.victim_train, splits.pool, splits.test)
    x = torch.cat([p.x for p in parts])
    y = torch.cat([p.y for p in parts if p.y is not None]) if all(p.y is not None for p in parts) else None
    if x.dim() == 4:
        _image_shape(shape, f"pool {name!r}")
        x = conform_images(x, shape)
    elif tuple(x.shape[1:]) != shape:
        raise DataError(
            f"pool {name!r}: tabular features of shape {tuple(x.shape[1:])} cannot be conformed to a "
            f"victim input of shape {shape}; expected the same features"
        )
    if size is not None:
        if size > len(x):
            raise InputError(f"pool {name!r}: size: expected at most {len(x)} samples, got {size}")
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size]
        x, y = x[idx], None if y is None else y[idx]
    logger.info("pool %s: %d samples conformed to %s", name, len(x), shape)
    return Dataset(x.contiguous(), y, splits.test.classes, name)
