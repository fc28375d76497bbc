"""Draw the demo model's loss curve (train.py's log.jsonl) as docs/demo-loss.png with Qt (offscreen).

    QT_QPA_PLATFORM=offscreen python tools/demo_model/plot.py build/demo_model/log.jsonl docs/demo-loss.png

Training loss per step (thin, and a 25-step running mean), held-out loss at each evaluation, the
held-out loss of the exported INT4 checkpoint through the runtime (results.json, if there), and the
unigram baseline as a dashed line. Loss in nats per token.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

W, H, M = 900, 520, (70, 20, 60, 50)            # size; margins left, top, right, bottom


def read_log(path: Path):
    lines = [json.loads(s) for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    head, rows = lines[0], lines[1:]
    train = [(r["step"], r["train"]) for r in rows]
    held = [(r["step"], r["heldout"]) for r in rows if "heldout" in r]
    return head, train, held


def running_mean(points, n=25):
    out, acc = [], []
    for s, v in points:
        acc.append(v)
        acc = acc[-n:]
        out.append((s, sum(acc) / len(acc)))
    return out


def _draw_axes(p, pt, box, steps: int, hi: float) -> None:
    """Grid lines and labels: loss on the left, training steps below."""
    from PySide6.QtCore import QRectF, Qt
    from PySide6.QtGui import QColor, QPen

    x0, y0, x1, y1 = box
    p.setPen(QPen(QColor("#999"), 1))
    for k in range(int(hi) + 1):
        p.drawLine(pt(0, k), pt(steps, k))
        p.drawText(QRectF(0, pt(0, k).y() - 8, x0 - 8, 16), Qt.AlignmentFlag.AlignRight, f"{k}")
    for k in range(0, steps + 1, max(100, steps // 6 // 100 * 100)):
        p.drawText(QRectF(pt(k, 0).x() - 30, y1 + 4, 60, 16), Qt.AlignmentFlag.AlignCenter, str(k))
    p.drawText(QRectF(x0, H - 24, x1 - x0, 20), Qt.AlignmentFlag.AlignCenter, "training step")
    p.save()
    p.translate(16, (y0 + y1) / 2)
    p.rotate(-90)
    p.drawText(QRectF(-100, -10, 200, 20), Qt.AlignmentFlag.AlignCenter, "loss (nats / token)")
    p.restore()


def _draw_legend(p, legend: list[tuple[str, str]], x1: float, y0: float) -> None:
    from PySide6.QtCore import QPointF
    from PySide6.QtGui import QColor, QPen

    for i, (color, text) in enumerate(legend):
        y = y0 + 14 + 20 * i
        p.setPen(QPen(QColor(color), 3))
        p.drawLine(QPointF(x1 - 440, y), QPointF(x1 - 410, y))
        p.setPen(QColor("#222"))
        p.drawText(QPointF(x1 - 402, y + 4), text)


def draw(log: Path, png: Path, results: dict | None) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QPointF, Qt
    from PySide6.QtGui import QColor, QFont, QGuiApplication, QImage, QPainter, QPen

    _app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])   # an empty argv crashes at exit
    head, train, held = read_log(log)
    base = head["unigram_baseline"]
    steps = max(s for s, _ in train) + 1
    lo, hi = 0.0, max(base + 1.0, min(9.0, max(v for _, v in train)))
    img = QImage(W, H, QImage.Format.Format_ARGB32)
    img.fill(QColor("white"))
    p = QPainter(img)
    p.setRenderHint(QPainter.RenderHint.Antialiasing)
    p.setFont(QFont("DejaVu Sans", 10))
    x0, y0, x1, y1 = M[0], M[1], W - M[2], H - M[3]

    def pt(step, v):
        return QPointF(x0 + (x1 - x0) * step / steps, y1 - (y1 - y0) * (min(v, hi) - lo) / (hi - lo))

    _draw_axes(p, pt, (x0, y0, x1, y1), steps, hi)

    def line(points, color, width, dash=False):
        pen = QPen(QColor(color), width)
        if dash:
            pen.setStyle(Qt.PenStyle.DashLine)
        p.setPen(pen)
        for a, b in zip(points, points[1:]):
            p.drawLine(pt(*a), pt(*b))

    line(train, "#c9d7ee", 1)
    line(running_mean(train), "#2a5db0", 2)
    line(held, "#d0661b", 2.5)
    line([(0, base), (steps, base)], "#555", 1.5, dash=True)
    legend = [("#c9d7ee", "training loss (each step)"), ("#2a5db0", "training loss (25-step mean)"),
              ("#d0661b", f"held-out loss (final {held[-1][1]:.2f})"),
              ("#555", f"unigram baseline on held-out ({base:.2f})")]
    if results:
        r = results["heldout_loss"]["runtime_int4"]
        p.setPen(QPen(QColor("#178a3c"), 2))
        p.setBrush(QColor("#178a3c"))
        p.drawEllipse(pt(steps - 1, r), 5, 5)
        legend.append(("#178a3c", f"held-out, exported INT4 checkpoint via the runtime ({r:.2f})"))
    _draw_legend(p, legend, x1, y0)
    p.end()
    png.parent.mkdir(parents=True, exist_ok=True)
    if not img.save(str(png)):
        raise OSError(f"{png}: could not write the PNG")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    results_path = Path(__file__).resolve().parent / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else None
    draw(Path(argv[0]), Path(argv[1]), results)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)      # skip interpreter finalization: PySide6 aborts there (none_dealloc) after QPainter use
