"""Per-conversation settings: the system prompt and the sampling fields people change."""

from __future__ import annotations

from PySide6.QtWidgets import (QCheckBox, QDialog, QDialogButtonBox, QDoubleSpinBox, QFormLayout, QLabel,
                               QPlainTextEdit, QSpinBox, QVBoxLayout, QWidget)

__all__ = ["ConversationSettingsDialog"]


class ConversationSettingsDialog(QDialog):
    def __init__(self, system_prompt: str, sampling: dict, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Conversation settings")
        lay = QVBoxLayout(self)
        lay.addWidget(QLabel("System prompt"))
        self.system = QPlainTextEdit(system_prompt)
        self.system.setPlaceholderText("(the model's default)")
        lay.addWidget(self.system)
        form = QFormLayout()
        self.temperature = self._double(sampling.get("temperature", 1.0), 0.0, 2.0, 0.05)
        self.top_p = self._double(sampling.get("top_p", 1.0), 0.01, 1.0, 0.05)
        self.min_p = self._double(sampling.get("min_p", 0.0), 0.0, 1.0, 0.01)
        self.top_k = QSpinBox()
        self.top_k.setRange(0, 1000)
        self.top_k.setValue(int(sampling.get("top_k", 0)))
        self.top_k.setSpecialValueText("off")
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(0, 1 << 20)
        self.max_tokens.setValue(int(sampling.get("max_tokens") or 0))
        self.max_tokens.setSpecialValueText("until the context is full")
        self.seeded = QCheckBox("fixed seed")
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seeded.setChecked(sampling.get("seed") is not None)
        self.seed.setValue(int(sampling.get("seed") or 0))
        for label, w in (("Temperature", self.temperature), ("Top p", self.top_p), ("Min p", self.min_p),
                         ("Top k", self.top_k), ("Max tokens", self.max_tokens), (self.seeded, self.seed)):
            form.addRow(label, w)
        lay.addLayout(form)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay.addWidget(buttons)

    @staticmethod
    def _double(value: float, lo: float, hi: float, step: float) -> QDoubleSpinBox:
        b = QDoubleSpinBox()
        b.setRange(lo, hi)
        b.setSingleStep(step)
        b.setDecimals(2)
        b.setValue(float(value))
        return b

    def values(self) -> tuple[str, dict]:
        s = {"temperature": self.temperature.value(), "top_p": self.top_p.value(), "min_p": self.min_p.value(),
             "top_k": self.top_k.value()}
        if self.max_tokens.value():
            s["max_tokens"] = self.max_tokens.value()
        if self.seeded.isChecked():
            s["seed"] = self.seed.value()
        return self.system.toPlainText(), s
