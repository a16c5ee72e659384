#!/usr/bin/env python3
"""Render an HTML report in headless Chromium and check that a reader would see it.

Two runs of the system's Chromium (Debian's ``chromium``; this script never downloads a
browser), each with a fresh temporary profile and no network (the page is opened as a
``file://`` URL; host names resolve nowhere and any other request goes to a dead proxy):

1. ``--dump-dom`` after a virtual-time budget, so the report's load handler has run: it reads
   ``data-images-ok="N/M"`` (images decoded / images on the page, set by the report's inline
   script) and ``data-page-height``;
2. ``--screenshot`` of the whole page height at 1280 px wide, whose pixels must not be blank.

Usage::

    python scripts/check_report.py runs/audit/report.html --screenshot /tmp/report.png

Exits 0 when every image loaded and the screenshot is not blank, 1 when a check failed, 2
when no browser is installed. ``--json`` prints the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser")
WIDTH = 1280
#: the screenshot's height: the page's, within these bounds
MIN_HEIGHT, MAX_HEIGHT = 800, 16000
#: a screenshot is blank when its grey levels (0..255) vary less than this (standard deviation) ...
MIN_STD = 2.0
#: ... or when fewer than this share of its pixels differ from the most common one
MIN_INK = 0.002
VIRTUAL_TIME_MS = 10_000


class ReportCheckError(RuntimeError):
    """The check could not run (no browser, no file, the browser failed or hung)."""


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise ReportCheckError(
        "no Chromium found: neither 'chromium' nor 'chromium-browser' is on PATH; install the "
        "distribution's package (Debian/Ubuntu: apt-get install chromium). This script never "
        "downloads a browser."
    )


def _flags(profile: str) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-domain-reliability",
        "--metrics-recording-only",
        "--mute-audio",
        "--hide-scrollbars",
        # no network: names resolve nowhere, anything else goes to a closed port
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=http://127.0.0.1:9",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
    ]


def _run(cmd: list[str], timeout: float) -> str:
    """Run the browser in its own process group; on timeout, end that group."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ReportCheckError(
            f"the browser did not finish within {timeout:g} s: {' '.join(cmd[:2])} ..."
        ) from None
    if proc.returncode != 0:
        tail = "\n".join(err.strip().splitlines()[-5:])
        raise ReportCheckError(f"the browser exited with status {proc.returncode}:\n{tail}")
    return out


def _pixels(path: Path) -> tuple[tuple[int, int], float, float]:
    """(width, height), the grey levels' standard deviation, and the share of pixels that differ
    from the most common grey level by more than 8."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        size = im.size
        grey = np.asarray(im.convert("L"), dtype=np.float64)
    counts = np.bincount(grey.astype(np.int64).ravel(), minlength=256)
    background = int(counts.argmax())
    ink = float((np.abs(grey - background) > 8).mean())
    return (int(size[0]), int(size[1])), float(grey.std()), ink


def check_report(
    html_path: str | Path,
    screenshot_path: str | Path | None = None,
    timeout: float = 60,
    *,
    min_images: int = 0,
) -> dict[str, Any]:
    """Render ``html_path`` in headless Chromium; returns what was seen.

    Keys: ``ok`` (every image loaded, at least ``min_images`` of them, and the screenshot is not
    blank), ``errors`` (why not), ``images_ok``/``images_total``, ``page_height``,
    ``screenshot`` (the PNG's path, None when ``screenshot_path`` was None: then it is taken in a
    temporary folder and removed), ``screenshot_size``, ``pixel_std``, ``ink``, ``browser``,
    ``seconds``. Raises :class:`ReportCheckError` when the check cannot run (no browser, no
    file, the browser failed or hung for ``timeout`` seconds per run).
    """
    start = time.monotonic()
    html_file = Path(html_path).resolve()
    if not html_file.is_file():
        raise ReportCheckError(f"{html_file}: no such file")
    browser = find_browser()
    url = html_file.as_uri()
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="check-report-", ignore_cleanup_errors=True) as tmp:
        # the same width as the screenshot, so that the page height read here is the screenshot's
        dom = _run(
            [
                browser,
                *_flags(str(Path(tmp) / "profile-dom")),
                f"--window-size={WIDTH},1000",
                "--dump-dom",
                url,
            ],
            timeout,
        )
        found = re.search(r'data-images-ok="(\d+)/(\d+)"', dom)
        if found is None:
            errors.append("the page's load handler did not run (no data-images-ok attribute on <body>)")
            images_ok = images_total = 0
        else:
            images_ok, images_total = int(found.group(1)), int(found.group(2))
            if images_ok != images_total:
                errors.append(f"only {images_ok} of {images_total} images loaded")
        if images_total < min_images:
            errors.append(f"{images_total} images on the page, expected at least {min_images}")
        height_match = re.search(r'data-page-height="(\d+)"', dom)
        page_height = int(height_match.group(1)) if height_match else None
        height = min(max((page_height or 4000) + 40, MIN_HEIGHT), MAX_HEIGHT)
        shot = Path(screenshot_path).resolve() if screenshot_path is not None else Path(tmp) / "report.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        shot.unlink(missing_ok=True)
        _run(
            [
                browser,
                *_flags(str(Path(tmp) / "profile-shot")),
                f"--window-size={WIDTH},{height}",
                f"--screenshot={shot}",
                url,
            ],
            timeout,
        )
        if not shot.is_file():
            raise ReportCheckError(f"the browser wrote no screenshot to {shot}")
        size, std, ink = _pixels(shot)
        if std < MIN_STD or ink < MIN_INK:
            errors.append(f"the screenshot looks blank (grey-level std {std:.2f}, {100 * ink:.2f}% ink)")
    return {
        "ok": not errors,
        "errors": errors,
        "html": str(html_file),
        "browser": browser,
        "images_ok": images_ok,
        "images_total": images_total,
        "page_height": page_height,
        "screenshot": None if screenshot_path is None else str(shot),
        "screenshot_size": list(size),
        "pixel_std": round(std, 3),
        "ink": round(ink, 5),
        "seconds": round(time.monotonic() - start, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("html", type=Path, help="the report's HTML file")
    parser.add_argument("--screenshot", type=Path, default=None, help="where to keep the PNG screenshot")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per browser run (default 60)")
    parser.add_argument("--min-images", type=int, default=0, help="fail with fewer images on the page")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        result = check_report(args.html, args.screenshot, args.timeout, min_images=args.min_images)
    except ReportCheckError as exc:
        print(f"check_report: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        w, h = result["screenshot_size"]
        print(
            f"{result['html']}: {result['images_ok']}/{result['images_total']} images loaded; "
            f"screenshot {w}×{h} (grey std {result['pixel_std']:.1f}, {100 * result['ink']:.1f}% ink)"
            + (f" at {result['screenshot']}" if result["screenshot"] else "")
            + f"; {result['seconds']:.1f} s"
        )
        for err in result["errors"]:
            print(f"FAILED: {err}")
        print("OK" if result["ok"] else "FAILED")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
