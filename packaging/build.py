"""Build the kimi-desktop one-folder app with PyInstaller, then smoke-test the bundle.

    python3 packaging/build.py [--venv DIR] [--skip-build] [--cold] [--no-window]

1. An environment for the build (--venv, else $KIMI_PACK_VENV, else packaging/build/venv): made once with
   `pip install pyinstaller '.[app]'`; the project is reinstalled into it, non-editable, on every run.
2. `pyinstaller packaging/kimi-desktop.spec` -> packaging/dist/kimi-desktop/ (niced: it is CPU-heavy).
3. Checks, each failure one line and a nonzero exit: no torch, transformers or test tools in the bundle;
   `--version`; `serve --demo` on a free loopback port answering /health and one chat completion; a
   second `serve --engine remote` pointed at the first, giving the same answer (the openai client
   inside the bundle); both stop with exit 0 on SIGTERM; then (Linux, needs Xvfb, xdotool and
   ImageMagick's `import`) the window: `kimi-desktop --demo` under Xvfb, one message typed and answered,
   a screenshot in packaging/dist/smoke-window.png, closed as a window manager closes it
   (WM_DELETE_WINDOW), exit 0.
The bundle runs with its own cache, data and config folders under packaging/build/smoke/ (XDG_*), so
your conversations and settings are never touched; the numba kernel cache there is kept between runs
(--cold empties it first: the first start of a fresh install). Times are printed as they are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DIST = HERE / "dist"
WORK = HERE / "build"
SMOKE = WORK / "smoke"
APP = DIST / "kimi-desktop"
EXE = APP / ("kimi-desktop.exe" if os.name == "nt" else "kimi-desktop")
SCREENSHOT = DIST / "smoke-window.png"
# top-level module names that must not be in the bundle (pure modules in the PYZ, or folders/binaries)
BANNED = ("torch", "transformers", "compressed_tensors", "pytest", "_pytest", "pytestqt", "hypothesis",
          "schemathesis", "anthropic", "llama_cpp")
SOURCE_FILES = ("pyproject.toml", "README.md")
SOURCE_DIRS = ("kimi_desktop", "runtime", "offload", "ui")      # pyproject's package folders
PROMPT = "What does the assert statement do?"
sys.path.insert(0, str(HERE))
from smoke_window import Failed, run_window_check  # noqa: E402


def step(msg: str) -> None:
    print(f"== {msg}", flush=True)


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def nice():
    return (lambda: os.nice(10)) if hasattr(os, "nice") else None


def clean_source() -> Path:
    """What a wheel is built from: the package folders, pyproject.toml and README.md, copied without caches
    (the checkout's own build/ folder keeps files setuptools once copied, even after they were deleted)."""
    src = WORK / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for name in SOURCE_FILES:
        shutil.copy2(REPO / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc")
    for name in SOURCE_DIRS:
        shutil.copytree(REPO / name, src / name, ignore=skip)
    return src


def prepare_venv(venv: Path) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    py = venv_python(venv)
    if not py.exists():
        step(f"making the build environment {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "pyinstaller", f"{REPO}[app]"], check=True)
    step("installing the project into it (non-editable, a clean copy of the current tree)")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(clean_source())],
                   check=True, preexec_fn=nice(), cwd=WORK)
    where = subprocess.run([str(py), "-c", "import kimi_desktop.runtime as r; print(r.__file__)"], cwd=WORK,
                           capture_output=True, text=True).stdout.strip()
    if not where or not Path(where).resolve().is_relative_to(venv.resolve()):
        raise Failed(f"kimi_desktop.runtime imports from {where or 'nowhere'}, not from the copy installed in {venv}")
    return py


def check_icon() -> None:
    svg = HERE / "icon" / "kimi-desktop.svg"
    copy = REPO / "ui" / "icons" / "kimi-desktop.svg"
    if not copy.exists() or copy.read_bytes() != svg.read_bytes():
        raise Failed(f"{copy} differs from {svg}: run python packaging/icon/render_icons.py")
    for size in (16, 24, 32, 48, 64, 128, 256, 512):
        if not (HERE / "icon" / f"kimi-desktop-{size}.png").exists():
            raise Failed(f"packaging/icon/kimi-desktop-{size}.png is missing: run packaging/icon/render_icons.py")


def build(py: Path) -> float:
    step("pyinstaller packaging/kimi-desktop.spec")
    t0 = time.monotonic()
    # cwd: not the checkout, whose kimi_desktop/ would shadow the installed package (`-m` puts cwd first)
    r = subprocess.run([str(py), "-m", "PyInstaller", str(HERE / "kimi-desktop.spec"), "--noconfirm",
                        "--distpath", str(DIST), "--workpath", str(WORK / "pyinstaller")], cwd=WORK,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=nice())
    (WORK / "pyinstaller.log").write_text(r.stdout)
    if r.returncode != 0:
        tail = [ln for ln in r.stdout.splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise Failed(f"pyinstaller failed ({WORK / 'pyinstaller.log'}): {tail[0]}")
    return time.monotonic() - t0


LIST_PYZ = """
import json, sys
from PyInstaller.archive.readers import CArchiveReader
a = CArchiveReader(sys.argv[1])
names = [n for n in a.toc if n.endswith('.pyz')]
print(json.dumps(sorted(set(m for n in names for m in a.open_embedded_archive(n).toc))))
"""


def check_contents(py: Path) -> None:
    """No banned package among the bundle's pure modules (the PYZ inside the executable) or its files."""
    r = subprocess.run([str(py), "-c", LIST_PYZ, str(EXE)], capture_output=True, text=True)
    if r.returncode != 0:
        raise Failed(f"cannot list the bundle's modules: {r.stderr.strip().splitlines()[-1:]}")
    modules = json.loads(r.stdout)
    inside = APP / "_internal"                  # PyInstaller >= 6 puts everything but the program here
    files = [p.name for p in (inside if inside.is_dir() else APP).iterdir()]
    for name in BANNED:
        hit = [m for m in modules if m.split(".")[0] == name] + \
              [f for f in files if f.split(".")[0] == name or f.startswith(name + "-")]
        if hit:
            raise Failed(f"the bundle contains {name} ({hit[0]}): it must not (see EXCLUDED in the spec)")
    if "kimi_desktop.runtime.kernels" not in modules and not (APP / "_internal/kimi_desktop/runtime/kernels").is_dir():
        raise Failed("the bundle lacks kimi_desktop.runtime.kernels")
    print(f"   {len(modules)} modules; none of {', '.join(BANNED)}")


def smoke_env(cold: bool) -> dict:
    for kind in ("data", "config") + (("cache",) if cold else ()):     # a fresh user, the kernels kept
        if (SMOKE / kind).exists():
            shutil.rmtree(SMOKE / kind)
    env = dict(os.environ)
    for var in ("NUMBA_CACHE_DIR", "KIMI_DESKTOP_API_KEY", "PYTHONPATH", "PYTHONHOME"):
        env.pop(var, None)
    for kind in ("cache", "data", "config"):
        (SMOKE / kind).mkdir(parents=True, exist_ok=True)
        env[f"XDG_{kind.upper()}_HOME"] = str(SMOKE / kind)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 120.0) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def check_version(env: dict, py: Path) -> float:
    step(f"{EXE.name} --version")
    want = subprocess.run([str(py), "-c", "import kimi_desktop; print(kimi_desktop.__version__)"],
                          capture_output=True, text=True).stdout.strip()
    t0 = time.monotonic()
    r = subprocess.run([str(EXE), "--version"], capture_output=True, text=True, env=env, timeout=120)
    dt = time.monotonic() - t0
    if r.returncode != 0 or r.stdout.strip() != f"kimi-desktop {want}":
        raise Failed(f"--version: exit {r.returncode}, printed {r.stdout.strip()!r}, expected 'kimi-desktop {want}'")
    print(f"   {r.stdout.strip()} in {dt:.2f} s")
    return dt


class Server:
    """One `kimi-desktop serve ...` of the bundle, its output in a log file."""

    def __init__(self, args: list[str], env: dict, name: str):
        self.port = free_port()
        self.log = SMOKE / f"{name}.log"
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([str(EXE), "serve", *args, "--port", str(self.port)], env=env,
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float) -> float:
        while time.monotonic() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise Failed(f"serve exited {self.proc.returncode} before /health answered: "
                             f"{self.last_line()} ({self.log})")
            try:
                if http(self.base + "/health", timeout=2).get("status") == "ok":
                    return time.monotonic() - self.t0
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise Failed(f"serve: /health not ok after {timeout:.0f} s ({self.log})")

    def chat(self, prompt: str, max_tokens: int = 48) -> tuple[dict, float]:
        t0 = time.monotonic()
        try:
            out = http(self.base + "/v1/chat/completions",
                       {"model": "demo", "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": max_tokens, "temperature": 0, "seed": 1})
        except urllib.error.HTTPError as e:
            raise Failed(f"chat completion: HTTP {e.code}: {e.read()[:200]!r}") from None
        except OSError as e:
            raise Failed(f"chat completion: {e}") from None
        msg = (out.get("choices") or [{}])[0].get("message") or {}
        if not (msg.get("content") or msg.get("reasoning_content")):
            raise Failed(f"chat completion: an empty answer: {json.dumps(out)[:200]}")
        return out, time.monotonic() - t0

    def stop(self) -> None:
        """SIGTERM, as a service manager stops it: it must exit 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if os.name != "nt" else signal.CTRL_BREAK_EVENT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise Failed(f"serve did not stop within 30 s of SIGTERM ({self.log})") from None
        if self.proc.returncode != 0:
            raise Failed(f"serve exited {self.proc.returncode} on SIGTERM: {self.last_line()} ({self.log})")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def last_line(self) -> str:
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else "(no output)"


def answer_text(out: dict) -> str:
    msg = out["choices"][0]["message"]
    return (msg.get("reasoning_content") or "") + "|" + (msg.get("content") or "")


def check_serve(env: dict, timeout: float) -> dict:
    step("serve --demo, then serve --engine remote on it")
    times = {}
    demo = Server(["--demo"], env, "serve-demo")
    remote = None
    try:
        times["serve_health_s"] = demo.wait_healthy(timeout)
        out, times["serve_first_chat_s"] = demo.chat(PROMPT)
        print(f"   /health ok {times['serve_health_s']:.2f} s after launch; first chat completion "
              f"{times['serve_first_chat_s']:.2f} s later "
              f"({out['usage']['completion_tokens']} tokens, finish {out['choices'][0]['finish_reason']})")
        print(f"   answer: {answer_text(out)[:200]!r}")
        remote = Server(["--engine", "remote", "--model", demo.base + "/v1"], env, "serve-remote")
        times["remote_health_s"] = remote.wait_healthy(120)
        via, times["remote_chat_s"] = remote.chat(PROMPT)
        if answer_text(via) != answer_text(out):
            raise Failed(f"serve --engine remote answered {answer_text(via)[:80]!r}, the demo server "
                         f"{answer_text(out)[:80]!r}: expected the same (greedy, same request)")
        print(f"   remote: /health ok {times['remote_health_s']:.2f} s after launch, the same answer "
              f"in {times['remote_chat_s']:.2f} s")
        remote.stop()
        demo.stop()
    finally:
        for s in (remote, demo):
            if s is not None:
                s.kill()
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=Path(os.environ.get("KIMI_PACK_VENV", WORK / "venv")),
                    help="the build environment (default $KIMI_PACK_VENV, else packaging/build/venv)")
    ap.add_argument("--skip-build", action="store_true", help="test the bundle already in packaging/dist")
    ap.add_argument("--cold", action="store_true", help="empty the smoke tests' cache first (numba compiles)")
    ap.add_argument("--no-window", action="store_true", help="skip the window check (no Xvfb)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for the first /health")
    args = ap.parse_args(argv)
    results: dict = {}
    try:
        check_icon()
        py = prepare_venv(args.venv)
        if not args.skip_build:
            results["build_s"] = round(build(py), 1)
        if not EXE.exists():
            raise Failed(f"no bundle at {APP}: run without --skip-build")
        check_contents(py)
        size = sum(p.stat().st_size for p in APP.rglob("*") if p.is_file() and not p.is_symlink())
        results["bundle_bytes"] = size
        print(f"   bundle: {APP} {size / 2**20:.0f} MiB")
        env = smoke_env(args.cold)
        results["version_s"] = check_version(env, py)
        results.update(check_serve(env, args.timeout))
        if not args.no_window:
            step("the window under Xvfb")
            results.update(run_window_check(EXE, env, SCREENSHOT, SMOKE, PROMPT, args.timeout))
    except Failed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    (WORK / "smoke-results.json").write_text(json.dumps(results, indent=1))
    step(f"all checks passed: {json.dumps({k: round(v, 2) for k, v in results.items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
