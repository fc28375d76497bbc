"""Markdown -> the HTML subset QTextDocument renders: markdown-it-py (CommonMark + tables, raw HTML
off), code blocks highlighted by Pygments with inline styles, each with a "Copy" link
(href "copy:N"; N indexes RenderedMarkdown.code_blocks). Works on partial text while it streams:
an unclosed fence renders as code to the end."""

from __future__ import annotations

import html
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from markdown_it import MarkdownIt
from pygments import highlight as pygments_highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

from .theme import Theme

__all__ = ["RenderedMarkdown", "render_markdown", "split_blocks", "prepare_lexers", "wait_highlighted",
           "COPY_SCHEME"]

COPY_SCHEME = "copy"


@dataclass
class RenderedMarkdown:
    html: str
    code_blocks: list[str] = field(default_factory=list)
    pending: bool = False            # a code block is plain until its highlighting is ready


_formatters: dict[str, HtmlFormatter] = {}


def _formatter(style: str) -> HtmlFormatter:
    f = _formatters.get(style)
    if f is None:
        f = _formatters[style] = HtmlFormatter(style=style, noclasses=True, nowrap=True)
    return f


# Pygments is pure Python (a 30-line block takes ~20 ms, a language's first use ~0.1-1 s to compile
# its regexes): it runs on a background thread, never in the UI thread. A block renders plain until
# its highlighted HTML is ready (RenderedMarkdown.pending asks the caller to render again).
_cache: OrderedDict[tuple, str | None] = OrderedDict()
_queued: set[tuple] = set()
_lock = threading.Lock()
_jobs: queue.Queue[tuple] = queue.Queue()
_worker: threading.Thread | None = None
CACHE_BLOCKS = 512
COMMON_LANGUAGES = ("python", "bash", "json", "javascript", "c", "cpp", "rust")


def _highlight_now(key: tuple) -> str | None:
    lang, style, code = key
    try:
        lexer = get_lexer_by_name(lang)
    except ClassNotFound:
        return None                                 # unknown language: plain
    return pygments_highlight(code, lexer, _formatter(style)).rstrip("\n")


def _work() -> None:
    while True:
        key = _jobs.get()
        try:
            out = _highlight_now(key)
        except Exception:                           # a lexer bug must not kill the highlighter
            out = None
        with _lock:
            _cache[key] = out
            _queued.discard(key)
            while len(_cache) > CACHE_BLOCKS:
                _cache.popitem(last=False)
        _jobs.task_done()


def _submit(key: tuple) -> None:
    global _worker
    with _lock:
        if key in _queued:
            return
        _queued.add(key)
        if _worker is None:
            _worker = threading.Thread(target=_work, name="kimi-ui-highlight", daemon=True)
            _worker.start()
    _jobs.put(key)


def prepare_lexers(langs=COMMON_LANGUAGES, style: str = "friendly") -> None:
    """Compile the lexers of common languages in the background, before the first answer needs them."""
    for lang in langs:
        _submit((lang, style, ""))


def wait_highlighted(timeout: float = 10.0) -> bool:
    """Block until every queued block is highlighted (tests, screenshots)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with _lock:
            if not _queued:
                return True
        time.sleep(0.01)
    return False


def _code_html(code: str, lang: str, theme: Theme, env: dict) -> str:
    if lang and env["highlight"]:
        key = (lang.lower(), theme.pygments_style, code)
        with _lock:
            hit = key in _cache
            out = _cache.get(key)
            if hit:
                _cache.move_to_end(key)
        if out is not None:
            return out
        if not hit:
            _submit(key)
            env["out"].pending = True
    return html.escape(code)


def _fence(self, tokens, idx, options, env):
    tok, out, theme = tokens[idx], env["out"], env["theme"]
    lang = (tok.info or "").strip().split(" ")[0]
    code = tok.content.rstrip("\n")
    n = len(out.code_blocks)
    out.code_blocks.append(code)
    label = html.escape(lang) if lang else "code"
    return (f'<table width="100%" cellspacing="0" cellpadding="8" bgcolor="{theme.code_bg}" '
            f'style="border: 1px solid {theme.card_border}; margin-top: 4px; margin-bottom: 4px;">'
            f'<tr><td><span style="color: {theme.muted}; font-size: small;">{label}</span>'
            f'&nbsp;&nbsp;<a href="{COPY_SCHEME}:{n}" style="color: {theme.accent}; font-size: small; '
            f'text-decoration: none;">Copy</a>'
            f'<pre style="font-family: monospace; white-space: pre-wrap; margin: 4px 0 0 0;">'
            f'{_code_html(code, lang, theme, env)}</pre></td></tr></table>')


def _code_inline(self, tokens, idx, options, env):
    return (f'<code style="font-family: monospace; background-color: {env["theme"].code_bg};">'
            f'{html.escape(tokens[idx].content)}</code>')


_md = MarkdownIt("commonmark", {"html": False}).enable("table")
_md.add_render_rule("fence", _fence)
_md.add_render_rule("code_block", _fence)
_md.add_render_rule("code_inline", _code_inline)


def render_markdown(text: str, theme: Theme, highlight: bool = True) -> RenderedMarkdown:
    """highlight=False: code stays plain (the block still streaming: it changes with every token)."""
    out = RenderedMarkdown("")
    out.html = _md.render(text, {"out": out, "theme": theme, "highlight": highlight}).strip()  # no trailing space
    return out


def _is_fence(line: str) -> str | None:
    s = line.lstrip(" ")
    if len(line) - len(s) > 3:
        return None
    for mark in ("```", "~~~"):
        if s.startswith(mark):
            return mark
    return None


def split_blocks(text: str) -> list[str]:
    """Text cut at blank lines outside code fences where the next line is not indented (so list
    items keep their continuations): the pieces render alone as they would together, and a streaming
    answer re-renders only its last piece. "".join(pieces) == text."""
    lines = text.splitlines(keepends=True)
    out, cur, fence = [], "", None
    for i, line in enumerate(lines):
        cur += line
        mark = _is_fence(line)
        if fence is None and mark:
            fence = mark
        elif fence is not None and mark == fence and line.strip() == fence:
            fence = None
        if fence is None and not line.strip() and cur.strip():
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if nxt and not nxt[0].isspace():
                out.append(cur)
                cur = ""
    if cur:
        out.append(cur)
    return out
