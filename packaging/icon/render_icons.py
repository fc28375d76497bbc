"""Render the PNG sizes of the app icon from kimi-desktop.svg (QtSvg, offscreen: no display needed), and copy
the SVG into the package (ui/icons/), where the app takes its window icon from.

    python packaging/icon/render_icons.py        # any environment with PySide6; rewrites the PNGs

Run it after editing the SVG and commit what it writes; packaging/build.py checks the copy is current.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SVG = HERE / "kimi-desktop.svg"
PACKAGE_COPY = HERE.parents[1] / "ui" / "icons" / "kimi-desktop.svg"
SIZES = (16, 24, 32, 48, 64, 128, 256, 512)      # the hicolor theme's usual sizes


def png_path(size: int) -> Path:
    return HERE / f"kimi-desktop-{size}.png"


def render(svg: Path = SVG, sizes=SIZES) -> list[Path]:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QGuiApplication, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])   # noqa: F841 - QPainter needs one
    renderer = QSvgRenderer(str(svg))
    if not renderer.isValid():
        raise SystemExit(f"error: {svg}: not a valid SVG")
    out = []
    for size in sizes:
        img = QImage(size, size, QImage.Format_ARGB32_Premultiplied)
        img.fill(Qt.transparent)
        p = QPainter(img)
        p.setRenderHint(QPainter.Antialiasing)
        p.setRenderHint(QPainter.SmoothPixmapTransform)
        renderer.render(p)
        p.end()
        if not img.save(str(png_path(size)), "PNG"):
            raise SystemExit(f"error: could not write {png_path(size)}")
        out.append(png_path(size))
    return out


def main() -> int:
    for path in render():
        print(path)
    PACKAGE_COPY.parent.mkdir(exist_ok=True)
    shutil.copyfile(SVG, PACKAGE_COPY)
    print(PACKAGE_COPY)
    return 0


if __name__ == "__main__":
    sys.exit(main())
