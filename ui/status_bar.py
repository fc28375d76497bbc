"""The row no other app has: what streaming a 1T model from disk costs, live. Figures from
Controller.statusChanged (kimi_desktop.live_stats) and a small chart of tokens/s and expert-cache hit
rate over the last samples (QPainter, no chart library)."""

from __future__ import annotations

from collections import deque

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QPainter, QPainterPath, QPen
from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QSizePolicy, QWidget

from kimi_desktop import kv_store

from .theme import LIGHT, Theme

__all__ = ["StatusPanel", "LiveChart", "format_status", "CHART_SAMPLES"]

CHART_SAMPLES = 60


def _mb(n) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def format_status(s: dict) -> dict[str, str]:
    """The status row's texts from a live_stats snapshot; "n/a" where the engine cannot tell."""
    def num(v, fmt):
        return "n/a" if v is None else fmt.format(v)
    ctx_used, ctx = s.get("context_used"), s.get("context_size")
    return {
        "tok_s": num(s.get("tok_s"), "{:.1f} tok/s"),
        "ttft": num(s.get("ttft_s"), "TTFT {:.2f} s") if s.get("ttft_s") is not None else "TTFT n/a",
        "hit": "cache hits n/a" if s.get("hit_rate") is None else f"cache hits {100 * s['hit_rate']:.0f}%",
        "disk": num(s.get("disk_mb_s"), "disk {:.1f} MB/s") if s.get("disk_mb_s") is not None else "disk n/a",
        "ram": f"RAM {_mb(s.get('ram_bytes'))}",
        "ctx": f"context {ctx_used or 0:,} / {ctx:,}" if ctx else "context n/a",
        "kv": (f"KV {s['kv_sessions']} conv, RAM {_mb(s.get('kv_ram_bytes'))}, disk {_mb(s.get('kv_disk_bytes'))}"
               if s.get("kv_sessions") is not None else ""),
    }


class LiveChart(QWidget):
    """Two lines over the last CHART_SAMPLES samples: tokens/s (scaled to its own maximum) and the
    expert-cache hit rate (0..100%)."""

    def __init__(self, theme: Theme = LIGHT, parent: QWidget | None = None):
        super().__init__(parent)
        self.theme = theme
        self.tok_s: deque[float] = deque(maxlen=CHART_SAMPLES)
        self.hit: deque[float | None] = deque(maxlen=CHART_SAMPLES)
        self.setFixedSize(180, 30)
        self.setToolTip("tokens/s (blue) and expert-cache hit rate (green), last samples")

    def add(self, tok_s: float | None, hit_rate: float | None) -> None:
        self.tok_s.append(float(tok_s or 0.0))
        self.hit.append(hit_rate)
        self.update()

    def paintEvent(self, _):
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        r = QRectF(self.rect()).adjusted(1, 2, -1, -2)
        p.setPen(QPen(QColor(self.theme.card_border), 1))
        p.setBrush(QColor(self.theme.card_bg))
        p.drawRoundedRect(r, 4, 4)
        top = 1.3 * max(self.tok_s, default=0.0) or 1.0       # headroom: the two lines rarely overlap
        self._line(p, r, [v / top for v in self.tok_s], self.theme.chart_tok)
        self._line(p, r, list(self.hit), self.theme.chart_hit)
        p.end()

    def _line(self, p: QPainter, r: QRectF, values, colour: str) -> None:
        step = r.width() / max(CHART_SAMPLES - 1, 1)
        x0 = r.right() - step * (len(values) - 1)
        path, started = QPainterPath(), False
        for i, v in enumerate(values):
            if v is None:
                started = False
                continue
            pt = QPointF(x0 + i * step, r.bottom() - 2 - (r.height() - 4) * max(0.0, min(1.0, v)))
            if started:
                path.lineTo(pt)
            else:
                path.moveTo(pt)
                started = True
        p.setPen(QPen(QColor(colour), 1.5))
        p.setBrush(Qt.NoBrush)
        p.drawPath(path)


class StatusPanel(QWidget):
    def __init__(self, theme: Theme = LIGHT, parent: QWidget | None = None):
        super().__init__(parent)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(8, 2, 8, 2)
        lay.setSpacing(14)
        self.model = QLabel("no model")
        self.model.setObjectName("roleLabel")
        lay.addWidget(self.model)
        self.labels: dict[str, QLabel] = {}
        for key in ("tok_s", "ttft", "hit", "disk", "ram", "ctx", "kv"):
            lab = QLabel()
            lab.setObjectName({"tok_s": "chartTok", "hit": "chartHit"}.get(key, "muted"))   # the chart's legend
            lab.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Fixed)
            self.labels[key] = lab
            lay.addWidget(lab)
        self.chart = LiveChart(theme)
        lay.addWidget(self.chart)
        self.prefill = QProgressBar()           # shown only while a long prompt is being read
        self.prefill.setFixedWidth(320)
        self.prefill.setFormat("Reading the prompt: %v / %m tokens")
        self.prefill.hide()
        lay.addWidget(self.prefill)
        lay.addStretch(1)
        self.clear_kv = QPushButton("Clear saved KV cache")
        self.clear_kv.setToolTip("delete the conversations' saved KV files (they are rebuilt when needed)")
        self.clear_kv.clicked.connect(self.clear_saved_kv)
        lay.addWidget(self.clear_kv)
        self.kv_message = QLabel()
        self.kv_message.setObjectName("muted")
        lay.addWidget(self.kv_message)
        self.show_status({})

    def show_prefill(self, done: int, total: int) -> None:
        """(done, total) prompt tokens; total 0 hides the bar (first text, finish, error, cancel)."""
        if total <= 0:
            self.prefill.hide()
            return
        self.prefill.setRange(0, total)
        self.prefill.setValue(min(done, total))
        self.prefill.show()

    def clear_saved_kv(self) -> None:
        try:
            freed = kv_store.clear_kv_cache()
        except OSError as e:                    # a locked or vanished file: say so, keep the app up
            self.kv_message.setText(f"Could not clear the KV cache: {e}")
            return
        self.kv_message.setText(f"Freed {freed / 2**20:.1f} MiB")

    def set_theme(self, theme: Theme) -> None:
        self.chart.theme = theme
        self.chart.update()

    def show_status(self, s: dict) -> None:
        for key, text in format_status(s).items():
            self.labels[key].setText(text)
        self.labels["kv"].setVisible(bool(self.labels["kv"].text()))
        label = s.get("model_label")
        self.model.setText(label or "no model")
        mode = s.get("expert_cache_mode")
        self.labels["hit"].setToolTip(f"routed experts: {mode}" if mode else "")
        if s.get("generating"):                 # idle: the chart keeps the last answer's curve
            self.chart.add(s.get("tok_s"), s.get("hit_rate"))
