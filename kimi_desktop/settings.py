"""The app's settings: one JSON file in the platformdirs config dir, owner-only (it holds API keys).

    s = Settings.load()            # default path: config_dir() / "settings.json"; Settings.load(path)
    s.allow_always("files"); s.remember_model(choice); s.save()
    kind, path, opts = model_open_args(s.last_model)     # for kimi_desktop.engines.open_engine

Fields (the JSON keys are the field names):
    last_model        None, or {"kind": "native" | "llama.cpp" | "remote", "path" (native, llama.cpp)
                      or "url" (remote), "expert_cache_gb" (native; None = sized to this machine),
                      "api_key" (remote, optional)}; ui/model_dialog.py returns this shape
    remote_endpoints  [{"name", "base_url", "api_key"}]
    mcp_always_allow  MCP server names whose tool calls run without asking
    tool_timeout_s    seconds one MCP tool call may take (30)
    max_tool_rounds   tool rounds per turn before the loop stops (16)
    theme             "system" | "light" | "dark"
    local_api         {"port": 8000, "api_key": None}: the in-app server toggle

The file is written atomically (a temp file in the same folder, fsync, rename) with mode 0600 in a
0700 folder. A file that is not valid JSON (or not an object) is logged once, moved aside to
settings.json.bad, and the defaults are used; a field of the wrong type is logged and gets its
default; keys this version does not know are kept and written back. Loading never raises.

The config dir is platformdirs.user_config_dir("kimi-desktop"), or $KIMI_DESKTOP_CONFIG_DIR when
set (tests and portable installs). mcp.json lives beside settings.json.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kimi_desktop.notices import log

__all__ = ["Settings", "config_dir", "default_settings_path", "model_open_args", "write_private"]

CONFIG_DIR_ENV = "KIMI_DESKTOP_CONFIG_DIR"
MODEL_KINDS = ("native", "llama.cpp", "remote")
THEMES = ("system", "light", "dark")
_warned: set[str] = set()


def config_dir() -> Path:
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        return Path(env)
    import platformdirs
    return Path(platformdirs.user_config_dir("kimi-desktop"))


def default_settings_path() -> Path:
    return config_dir() / "settings.json"


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, owner-only (file 0600, its folder 0700 when we create it)."""
    path = Path(path)
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _default_local_api() -> dict:
    return {"port": 8000, "api_key": None}


@dataclass
class Settings:
    last_model: dict | None = None
    remote_endpoints: list = field(default_factory=list)
    mcp_always_allow: list = field(default_factory=list)
    tool_timeout_s: float = 30.0
    max_tool_rounds: int = 16
    theme: str = "system"
    local_api: dict = field(default_factory=_default_local_api)
    path: Path | None = field(default=None, repr=False, compare=False)        # not saved
    extra: dict = field(default_factory=dict, repr=False, compare=False)      # unknown keys, kept

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Settings:
        """The settings at `path` (default: default_settings_path()); defaults where the file is
        missing, unreadable or corrupt (see the module docstring). Never raises."""
        p = Path(path) if path is not None else default_settings_path()
        s = cls(path=p)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            return s
        except OSError as e:
            if str(p) not in _warned:           # once per file: the app may reload often
                _warned.add(str(p))
                log.warning("settings: cannot read %s (%s); using the defaults", p, e)
            return s
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        except ValueError as e:
            bad = p.with_name(p.name + ".bad")
            try:
                os.replace(p, bad)
                kept = f"; the file was moved to {bad}"
            except OSError:
                kept = ""
            log.warning("settings: %s is not valid settings JSON (%s); using the defaults%s", p, e, kept)
            return s
        s._apply(data)
        return s

    def _apply(self, data: dict) -> None:
        known = {f.name for f in fields(self)} - {"path", "extra"}
        for key, value in data.items():
            if key not in known:
                self.extra[key] = value
                continue
            problem = _check(key, value)
            if problem:
                log.warning("settings: %s: %s %s; using the default", self.path, key, problem)
            elif key == "local_api":
                self.local_api = {**_default_local_api(), **value}
            else:
                setattr(self, key, value)

    def to_dict(self) -> dict:
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("path", "extra")})
        return d

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the settings atomically, owner-only; returns the path written."""
        p = Path(path) if path is not None else (self.path or default_settings_path())
        write_private(p, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        self.path = p
        return p

    def remember_model(self, choice: dict) -> None:
        """Keep `choice` (ui/model_dialog.py's shape) as last_model; a remote endpoint is also added
        to (or updated in) remote_endpoints, by base URL. Call save() to keep it."""
        self.last_model = dict(choice)
        if choice.get("kind") == "remote":
            entry = {"name": choice.get("name") or choice["url"], "base_url": choice["url"],
                     "api_key": choice.get("api_key")}
            for i, e in enumerate(self.remote_endpoints):
                if e.get("base_url") == choice["url"]:
                    self.remote_endpoints[i] = entry
                    return
            self.remote_endpoints.append(entry)

    def allow_always(self, server: str) -> None:
        """Remember that `server`'s tools may run without asking (call save() to keep it)."""
        if server not in self.mcp_always_allow:
            self.mcp_always_allow.append(server)


def model_open_args(choice: dict) -> tuple[str, str, dict]:
    """(kind, path, options) for kimi_desktop.engines.open_engine from a last_model / dialog choice."""
    kind = choice["kind"]
    if kind == "native":
        gb = choice.get("expert_cache_gb")
        return kind, choice["path"], ({} if gb is None else {"expert_cache_gb": gb})
    if kind == "remote":
        return kind, choice["url"], ({"api_key": choice["api_key"]} if choice.get("api_key") else {})
    return kind, choice["path"], {}


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(key: str, v: Any) -> str | None:
    """Why `v` is not a valid value for `key` (None if it is)."""
    if key == "last_model":
        if v is None:
            return None
        if not isinstance(v, dict) or v.get("kind") not in MODEL_KINDS:
            return f"must be null or an object with kind one of {', '.join(MODEL_KINDS)}"
        where = "url" if v["kind"] == "remote" else "path"
        if not isinstance(v.get(where), str):
            return f"({v['kind']}) needs a string {where!r}"
        gb = v.get("expert_cache_gb")
        if gb is not None and (not _is_num(gb) or gb < 0):
            return "expert_cache_gb must be null or a number >= 0"
        return None
    if key == "remote_endpoints":
        ok = isinstance(v, list) and all(isinstance(e, dict) and isinstance(e.get("base_url"), str)
                                         for e in v)
        return None if ok else "must be a list of {name, base_url, api_key} objects"
    if key == "mcp_always_allow":
        ok = isinstance(v, list) and all(isinstance(n, str) for n in v)
        return None if ok else "must be a list of MCP server names"
    if key == "tool_timeout_s":
        return None if _is_num(v) and v > 0 else "must be a number of seconds > 0"
    if key == "max_tool_rounds":
        return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "must be an integer >= 0"
    if key == "theme":
        return None if v in THEMES else f"must be one of {', '.join(THEMES)}"
    if key == "local_api":
        if not isinstance(v, dict):
            return "must be an object {port, api_key}"
        port = v.get("port", 8000)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            return "port must be an integer 0..65535"
        if v.get("api_key") is not None and not isinstance(v.get("api_key"), str):
            return "api_key must be a string or null"
        return None
    return None
