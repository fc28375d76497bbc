"""Light and dark themes: a Fusion palette, a small style sheet, and the colours the chat HTML uses.
The app follows the system's colour scheme (QStyleHints.colorScheme, Qt >= 6.5) and switches live."""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication

__all__ = ["Theme", "LIGHT", "DARK", "system_theme", "apply_theme"]


@dataclass(frozen=True)
class Theme:
    name: str
    dark: bool
    window: str          # window and panels
    base: str            # chat background, text fields
    text: str
    muted: str           # secondary text: reasoning, headers, captions
    accent: str
    user_bg: str         # the user's messages
    card_bg: str         # tool calls, reasoning, code
    card_border: str
    code_bg: str
    error: str
    chart_tok: str       # status chart: tokens/s line
    chart_hit: str       # status chart: cache hit rate line
    pygments_style: str


LIGHT = Theme("light", False, window="#f3f4f6", base="#ffffff", text="#1f2328", muted="#656d76",
              accent="#2563eb", user_bg="#e8f0fe", card_bg="#f6f8fa", card_border="#d0d7de",
              code_bg="#f6f8fa", error="#cf222e", chart_tok="#2563eb", chart_hit="#1a7f37",
              pygments_style="friendly")
DARK = Theme("dark", True, window="#1b1d21", base="#23262b", text="#e6e6e6", muted="#9aa3ad",
             accent="#6ea8fe", user_bg="#2d3b55", card_bg="#2b2f36", card_border="#3d434c",
             code_bg="#1e2126", error="#ff7b72", chart_tok="#6ea8fe", chart_hit="#56d364",
             pygments_style="monokai")


def system_theme(app: QApplication | None = None) -> Theme:
    app = app or QApplication.instance()
    try:
        dark = app.styleHints().colorScheme() == Qt.ColorScheme.Dark
    except AttributeError:                          # Qt < 6.5: judge by the palette
        dark = app.palette().color(QPalette.Window).lightness() < 128
    return DARK if dark else LIGHT


def apply_theme(app: QApplication, theme: Theme) -> None:
    app.setStyle("Fusion")
    p = QPalette()
    c = QColor
    for role, colour in ((QPalette.Window, theme.window), (QPalette.WindowText, theme.text),
                         (QPalette.Base, theme.base), (QPalette.AlternateBase, theme.card_bg),
                         (QPalette.Text, theme.text), (QPalette.Button, theme.card_bg),
                         (QPalette.ButtonText, theme.text), (QPalette.ToolTipBase, theme.card_bg),
                         (QPalette.ToolTipText, theme.text), (QPalette.Highlight, theme.accent),
                         (QPalette.HighlightedText, "#ffffff"), (QPalette.Link, theme.accent),
                         (QPalette.PlaceholderText, theme.muted), (QPalette.Mid, theme.card_border)):
        p.setColor(role, c(colour))
    p.setColor(QPalette.Disabled, QPalette.Text, c(theme.muted))
    p.setColor(QPalette.Disabled, QPalette.ButtonText, c(theme.muted))
    app.setPalette(p)
    app.setStyleSheet(f"""
        QScrollArea#chatArea, QWidget#chatInner {{ background: {theme.base}; }}
        QFrame#userMessage {{ background: {theme.user_bg}; border-radius: 10px; }}
        QFrame#assistantMessage {{ background: transparent; }}
        QFrame#toolCard {{ background: {theme.card_bg}; border: 1px solid {theme.card_border}; border-radius: 8px; }}
        QFrame#toolCard[error="true"] {{ border: 1px solid {theme.error}; }}
        QLabel#muted, QToolButton#reasoningToggle {{ color: {theme.muted}; }}
        QLabel#chartTok {{ color: {theme.chart_tok}; }}
        QLabel#chartHit {{ color: {theme.chart_hit}; }}
        QLabel#roleLabel {{ color: {theme.muted}; font-weight: 600; }}
        QLabel#errorLabel {{ color: {theme.error}; }}
        QFrame#composer {{ background: {theme.base}; border: 1px solid {theme.card_border}; border-radius: 10px; }}
        QPlainTextEdit#messageBox {{ background: transparent; border: none; }}
        QListWidget#conversationList {{ background: {theme.window}; border: none; }}
        QListWidget#conversationList::item {{ padding: 6px 8px; border-radius: 6px; }}
        QListWidget#conversationList::item:selected {{ background: {theme.user_bg}; color: {theme.text}; }}
        QToolButton {{ border: none; padding: 3px 6px; border-radius: 5px; }}
        QToolButton:hover {{ background: {theme.card_bg}; }}
        QTextBrowser {{ background: transparent; border: none; }}
    """)
    app.setProperty("kimi_theme", theme.name)
