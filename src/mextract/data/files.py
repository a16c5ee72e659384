"""Reading user data: ``.npz`` arrays, image folders (or tar archives of them), CIFAR-10.

Everything returns uint8 or float arrays that :mod:`mextract.data.registry` turns into a
:class:`~mextract.data.base.Dataset`. Failures are :class:`~mextract.errors.DataError`
naming the path and what was expected there.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mextract.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def cache_dir() -> Path:
    """Where decoded arrays are cached: ``$MEXTRACT_CACHE`` or ``~/.cache/mextract``."""
    return Path(os.environ.get("MEXTRACT_CACHE", Path.home() / ".cache" / "mextract"))


# --------------------------------------------------------------------------- npz


def read_npz(path: str | Path, *, require_labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``x`` (and ``y``) from an ``.npz`` file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file (expected an .npz with an 'x' array)")
    try:
        with np.load(p, allow_pickle=False) as z:
            if "x" not in z.files:
                raise DataError(f"{p}: expected an array named 'x', found {sorted(z.files)}")
            x = z["x"]
            y = z["y"] if "y" in z.files else None
    except (ValueError, OSError) as exc:
        raise DataError(f"{p}: not a readable .npz file ({exc})") from exc
    if require_labels and y is None:
        raise DataError(f"{p}: expected a label array 'y' beside 'x' (this split needs labels)")
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise DataError(f"{p}: expected 'y' of shape ({len(x)},), got {y.shape}")
    if y is not None and not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{p}: expected integer labels in 'y', got dtype {y.dtype}")
    return x, y


# --------------------------------------------------------------------------- images


def _decode(data: bytes | Path, size: tuple[int, int] | None, channels: int | None) -> np.ndarray:
    img: Image.Image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    mode = {1: "L", 3: "RGB"}.get(channels or 0, "RGB" if img.mode not in ("L", "1") else "L")
    img = img.convert(mode)
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _stack(images: list[np.ndarray], where: str) -> np.ndarray:
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DataError(f"{where}: images have different sizes {sorted(shapes)[:4]}; give a target size")
    return np.stack(images).transpose(0, 3, 1, 2)  # (N, C, H, W)


def _labelled_entries(names: Iterable[str], where: str) -> list[tuple[str, str | None]]:
    """Pair each image path with its class folder (``None`` for a flat folder)."""
    out: list[tuple[str, str | None]] = []
    for n in names:
        if not n.lower().endswith(IMAGE_SUFFIXES):
            continue
        parts = Path(n).parts
        out.append((n, parts[-2] if len(parts) >= 2 else None))
    if not out:
        raise DataError(f"{where}: expected image files ({', '.join(IMAGE_SUFFIXES)}), found none")
    return out


def read_image_folder(
    path: str | Path,
    *,
    size: tuple[int, int] | None = None,
    channels: int | None = None,
    classes: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...]]:
    """Read a folder of images: ``<class>/<image>`` subfolders give labels; a flat folder none.

    Images are converted to ``channels`` (1: grey, 3: RGB) and resized to ``size`` (H, W)
    when given. With ``classes``, folder names must be among them and map to their index.
    Returns ``(x uint8 (N, C, H, W), y or None, class names)``.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (expected images, optionally in <class>/ subfolders)")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    entries = _labelled_entries(files, str(root))
    flat = all(Path(n).parent == Path(".") for n, _ in entries)
    images = [_decode(root / n, size, channels) for n, _ in entries]
    x = _stack(images, str(root))
    if flat:
        return x, None, tuple(classes or ())
    names = [c or "" for _, c in entries]
    return (x, *_class_indices(names, classes, str(root)))


def _class_indices(
    names: list[str], classes: Sequence[str] | None, where: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    found = sorted(set(names))
    if classes is None:
        classes = found
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(f"{where}: class folders {unknown} are not among the classes {list(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[n] for n in names], dtype=np.int64), tuple(classes)


# --------------------------------------------------------------------------- CIFAR-10


def _cifar_batches(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The standard python release. Its batches are pickles by design of the format, so they
    are read with ``pickle`` here, and only here: load only a copy you trust."""
    out = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        xs, ys = [], []
        for n in names:
            f = root / n
            if not f.is_file():
                raise DataError(f"{root}: expected the file {n} of the cifar-10-batches-py release")
            with f.open("rb") as fh:
                try:
                    batch = pickle.load(fh, encoding="bytes")
                    xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                    ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
                except Exception as exc:
                    raise DataError(f"{f}: not a CIFAR-10 batch ({exc})") from exc
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return out


def _cifar_images(entries: list[tuple[str, bytes]], where: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images laid out ``[prefix/]{train,test}/<class>/*.jpg``."""
    groups: dict[str, tuple[list[np.ndarray], list[str]]] = {"train": ([], []), "test": ([], [])}
    for name, data in entries:
        parts = Path(name).parts
        if len(parts) < 3 or parts[-3] not in groups:
            continue
        groups[parts[-3]][0].append(_decode(data, (32, 32), 3))
        groups[parts[-3]][1].append(parts[-2])
    out = {}
    for split, (images, labels) in groups.items():
        if not images:
            raise DataError(f"{where}: expected images under {split}/<class>/, found none")
        y, _ = _class_indices(labels, CIFAR10_CLASSES, where)
        out[split] = (_stack(images, where), y)
    return out


def _source_key(p: Path) -> str:
    st = p.stat()
    return hashlib.sha1(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def read_cifar10(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CIFAR-10 from a ``cifar-10-batches-py`` folder, an image folder, or a tar(.gz) of one.

    Decoded once and cached as ``.npz`` (uint8) under :func:`cache_dir`.
    Returns ``{"train": (x, y), "test": (x, y)}`` with ``x`` uint8 ``(N, 3, 32, 32)``.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"{p}: no such path (expected a cifar-10-batches-py folder, an image folder with "
            "train/<class>/ and test/<class>/, or a .tar/.tar.gz of one)"
        )
    cache = cache_dir() / f"cifar10-{_source_key(p)}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return {s: (z[f"{s}_x"], z[f"{s}_y"]) for s in ("train", "test")}
    logger.info("decoding CIFAR-10 from %s (once; cached at %s)", p, cache)
    if p.is_dir() and (p / "data_batch_1").is_file():
        data = _cifar_batches(p)
    elif p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        data = _cifar_images([(str(f.relative_to(p)), f.read_bytes()) for f in files], str(p))
    elif tarfile.is_tarfile(p):
        with tarfile.open(p) as tar:
            entries = []
            for m in tar.getmembers():
                f = tar.extractfile(m) if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES) else None
                if f is not None:
                    entries.append((m.name, f.read()))
        data = _cifar_images(entries, str(p))
    else:
        raise DataError(f"{p}: expected a folder or a .tar/.tar.gz archive of CIFAR-10")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    arrays: dict[str, Any] = {f"{s}_{k}": v for s, (x, y) in data.items() for k, v in (("x", x), ("y", y))}
    np.savez(tmp, **arrays)
    tmp.replace(cache)
    return data
