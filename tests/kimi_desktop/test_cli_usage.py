"""What a new user meets at the command line: it runs from inside the clone after a plain install,
every mistake is one line naming the flag (exit 2, nothing loaded), every option says what it does."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.kimi_desktop.test_remote_engine import FakeOpenAI

REPO = Path(__file__).resolve().parents[2]


def run(args, env=None, cwd=REPO, stdin=None, python=sys.executable, prelude=""):
    code = f"import sys; {prelude}from kimi_desktop.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([python, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          input=stdin, env={**os.environ, **(env or {})}, timeout=600)


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ------------------------------------------------------------------ run from inside the clone

@pytest.fixture(scope="module")
def installed_python(tmp_path_factory):
    """A Python with the package installed as `pip install .` lays it out (no editable finder):
    a venv whose site-packages holds a copy per pyproject's package-dir mapping and reaches the
    dependencies of the test environment through a path entry (whose .pth files are not run)."""
    root = tmp_path_factory.mktemp("plain-install")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    venv_python = root / "venv" / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.check_output([str(venv_python), "-c", purelib], text=True).strip())
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "numpy").is_dir())
    (site / "test-deps.pth").write_text(deps + "\n")
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "kimi_desktop", site / "kimi_desktop", ignore=ignore)
    for pkg, folder in setup["package-dir"].items():
        shutil.copytree(REPO / folder, site / pkg.replace(".", "/"), ignore=ignore)
    script = root / "venv" / "bin" / "kimi-desktop"        # what pip writes for the console script
    script.write_text(f"#!{venv_python}\nimport sys\nfrom kimi_desktop.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return venv_python, script


def test_python_m_kimi_desktop_from_inside_the_clone(installed_python, tiny_int4):
    python, _ = installed_python
    r = subprocess.run([str(python), "-m", "kimi_desktop", "generate", "--model", str(tiny_int4),
                        "--prompt-ids", "1,2,3", "--max-new-tokens", "2"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 2


def test_bench_from_inside_the_clone_and_exit_status(installed_python, tiny_int4, tmp_path):
    _, script = installed_python
    out = tmp_path / "bench.json"
    common = ["bench", "--prompt-len", "4", "--decode", "2", "--threads", "1", "--regimes", "ram",
              "--repeats", "1"]
    r = subprocess.run([str(script), *common, "--model", str(tiny_int4), "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    native = json.loads(out.read_text())["regimes"]["ram"]["runs"]["native"]
    assert "error" not in native and len(native["tokens"]) == 2
    # a model whose every run fails: the bench says so and exits non-zero
    broken = tmp_path / "broken"                  # headers fine, one expert tensor renamed away
    shutil.copytree(tiny_int4, broken)
    name, renamed = b"layers.1.mlp.experts.0.up_proj.", b"layers.1.mlp.experts.0.up_proX."
    for f in [*broken.glob("*.safetensors"), broken / "model.safetensors.index.json"]:
        data = f.read_bytes()
        f.write_bytes(data.replace(name, renamed))
    r = subprocess.run([str(script), *common, "--model", str(broken)], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode != 0 and "every run failed" in r.stderr, r.stdout + r.stderr


# ------------------------------------------------------------------ mistakes: one line, exit 2

BAD = [
    (["generate", "--demo", "--prompt-ids", "1", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["generate", "--demo", "--prompt-ids", "1", "--threads", "0"], "--threads"),
    (["generate", "--demo", "--prompt-ids", "1", "--threads", "many"], "--threads"),
    (["generate", "--demo", "--prompt-ids", "1", "--threads", "100000"], "--threads"),
    (["generate", "--demo", "--prompt-ids", "1", "--temperature", "-1"], "--temperature"),
    (["generate", "--demo", "--prompt-ids", "1", "--temperature", "nan"], "--temperature"),
    (["generate", "--demo", "--prompt-ids", "abc"], "--prompt-ids"),
    (["generate", "--demo", "--prompt-ids", "1,-2"], "--prompt-ids"),
    (["generate", "--demo", "--prompt-ids", "1", "--top-p", "0"], "--top-p"),
    (["generate", "--demo", "--prompt-ids", "1", "--expert-cache-gb", "-1"], "--expert-cache-gb"),
    (["generate", "--prompt-ids", "1"], "--model"),
    (["generate", "--demo"], "--prompt"),
    (["chat", "--demo", "--max-tokens", "0"], "--max-tokens"),
    (["chat", "--demo", "--temperature", "-1"], "--temperature"),
    (["chat", "--demo", "--ctx", "1"], "--ctx"),
    (["chat", "--demo", "--min-p", "2"], "--min-p"),
    (["chat", "--demo", "--top-k", "-1"], "--top-k"),
    (["chat", "--demo", "--engine", "llama.cpp"], "--demo"),
    (["chat", "--model", "http://127.0.0.1:1/v1"], "--model"),
    (["chat", "--engine", "remote", "--model", "not a url"], "--model"),
    (["chat", "--engine", "remote", "--model", "http://127.0.0.1:1/v1", "--expert-cache-gb", "2"],
     "--expert-cache-gb"),
    (["make-test-model", "x", "--shards", "0"], "--shards"),
]


@pytest.mark.parametrize("args,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_mistake_is_one_line_naming_the_flag_before_anything_loads(args, flag, tmp_path):
    r = run(args, env={"XDG_CACHE_HOME": str(tmp_path)}, cwd=tmp_path)
    one_line_error(r, flag)
    assert not any(tmp_path.iterdir()), "something was made before the mistake was reported"


def test_prompt_ids_past_the_vocabulary_are_refused_before_the_model_loads(tiny_int4, tmp_path):
    model = tmp_path / "m"                       # config and tokenizer fine, shards unreadable: only a
    shutil.copytree(tiny_int4, model)            # check made before loading can answer about the ids
    for f in model.glob("*.safetensors"):
        f.write_bytes(b"\0" * 8)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    one_line_error(run(["generate", "--model", str(model), "--prompt-ids", f"1,{vocab}"]),
                   "--prompt-ids", str(vocab), f"0..{vocab - 1}")
    assert "safetensors" in one_line_error(run(["generate", "--model", str(model), "--prompt-ids", "1"]))


def test_missing_model_folder_or_file_names_the_flag(tmp_path):
    one_line_error(run(["generate", "--model", str(tmp_path / "none"), "--prompt-ids", "1"]), "--model", "none")
    (tmp_path / "f.gguf").write_bytes(b"GGUF")
    one_line_error(run(["generate", "--model", str(tmp_path / "f.gguf"), "--prompt-ids", "1"]), "--model", "folder")
    one_line_error(run(["chat", "--engine", "llama.cpp", "--model", str(tmp_path / "none.gguf")]), "--model")


def test_expert_cache_size_mistakes_name_the_flag_before_loading(k2_full, tmp_path):
    r = run(["generate", "--demo", "--prompt-ids", "1", "--expert-cache-gb", "0.00001"],
            env={"XDG_CACHE_HOME": str(tmp_path)})
    one_line_error(r, "--expert-cache-gb", "fewer than", "GiB")
    # more than this machine has, for a model whose experts are larger still (headers only, no data)
    r = run(["generate", "--model", str(k2_full), "--prompt-ids", "1", "--expert-cache-gb", "100000"])
    one_line_error(r, "--expert-cache-gb", "does not fit in memory")


def test_missing_llama_cpp_python_is_one_line(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    r = run(["chat", "--engine", "llama.cpp", "--model", str(tmp_path / "m.gguf")],
            prelude="sys.modules['llama_cpp'] = None; ")          # as if the extra were not installed
    one_line_error(r, "llama-cpp-python", "kimi-desktop[llama]")


def test_remote_url_is_kept_as_a_url():
    server = FakeOpenAI()
    try:
        env = {"NO_PROXY": "127.0.0.1,localhost", "HTTP_PROXY": "", "http_proxy": ""}
        r = run(["chat", "--engine", "remote", "--model", server.url, "--no-color", "--hide-reasoning"],
                env=env, stdin="Hi there\n/exit\n")
    finally:
        server.close()
    assert r.returncode == 0, r.stderr
    assert "Hello world" in r.stdout and server.url in r.stdout
    assert server.requests and server.requests[0]["messages"][-1]["content"] == "Hi there"


def test_the_app_without_pyside6_is_one_line():
    for args in ([], ["--demo"]):
        r = run(args, prelude="sys.modules['PySide6'] = None; ")    # as if the app extra were not installed
        one_line_error(r, "PySide6", "pip install 'kimi-desktop[app]'")


# ------------------------------------------------------------------ help and first-run notice

def _parsers(parser: argparse.ArgumentParser, name="kimi-desktop"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def test_every_option_of_every_command_has_help():
    from kimi_desktop.cli import build_parser

    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, p in _parsers(build_parser()) for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and not (a.help and a.help.strip())]
    assert not missing, missing


def test_every_subcommand_has_help(tmp_path):
    from kimi_desktop.cli import build_parser

    for name, _ in _parsers(build_parser()):
        r = run(name.split()[1:] + ["--help"], cwd=tmp_path)
        assert r.returncode == 0 and "usage:" in r.stdout, (name, r.stderr)


def test_slow_warmup_says_once_that_kernels_compile(caplog):
    from kimi_desktop.notices import COMPILE_NOTICE, warm_up

    class Model:
        def __init__(self, s):
            self.s = s

        def warmup(self):
            time.sleep(self.s)
            return self.s

    with caplog.at_level(logging.INFO, logger="kimi_desktop"):
        warm_up(Model(0.0), after_s=0.2)
        time.sleep(0.4)
        assert COMPILE_NOTICE not in caplog.text            # fast (cached kernels): nothing said
        warm_up(Model(0.6), after_s=0.1)
    assert caplog.text.count(COMPILE_NOTICE) == 1
    assert re.search(r"one-time .* minute", COMPILE_NOTICE)


def test_readme_links_point_at_files_in_the_repo():
    text = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [u for u in links if not re.match(r"[a-z]+://", u)]
    assert "docs/architecture.md" in local
    assert all((REPO / u).exists() for u in local), [u for u in local if not (REPO / u).exists()]
    assert "design.md" not in text
