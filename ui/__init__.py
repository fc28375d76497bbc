"""The desktop app (PySide6): the only package that imports Qt."""

import sys

# PySide6 6.12 on CPython 3.11 drops a reference to None in every Qt call that returns None
# (setHtml, setPlainText, setText, ...: -1 per call, measured). None is not immortal before 3.12, so a
# long session reaches zero and the interpreter aborts ("none_dealloc"; ~5,000 calls from a fresh
# start). None is never legitimately freed, so it gets a reference count no session can spend.
if sys.version_info < (3, 12) and sys.implementation.name == "cpython":
    import ctypes
    ctypes.c_ssize_t.from_address(id(None)).value += 1 << 48
