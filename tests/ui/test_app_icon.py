"""The window icon: the project's SVG, shipped in the package, the same file packaging/ renders its PNGs from."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_app_icon_is_the_packaging_svg_and_renders(qtbot):
    from kimi_desktop.ui.app import window_icon

    shipped = resources.files("kimi_desktop.ui") / "icons" / "kimi-desktop.svg"
    assert shipped.read_bytes() == (REPO / "packaging" / "icon" / "kimi-desktop.svg").read_bytes()
    icon = window_icon()
    assert not icon.isNull()
    for size in (16, 256):
        img = icon.pixmap(size, size).toImage()
        assert (img.width(), img.height()) == (size, size)
        corner, centre = img.pixelColor(0, 0), img.pixelColor(size // 2, size // 2)
        assert corner.alpha() == 0 and centre.alpha() == 255        # drawn: a tile on a clear ground
