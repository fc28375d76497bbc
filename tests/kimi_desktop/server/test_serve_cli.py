"""`kimi-desktop serve`: a real server process (URL on stdout, a stop by signal exits 0 within
seconds, the key and bodies never in its logs) and the refusals that come before anything loads."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from kimi_desktop.cli import main

from .helpers import KEY, open_stream, read_until

SECRET = "a-body-marker-that-must-not-be-logged"


def start_serve(model, *extra, env=None):
    env = {**os.environ, **(env or {})}
    p = subprocess.Popen([sys.executable, "-m", "kimi_desktop", "serve", "--model", str(model), "--port", "0", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = {}
    reader = threading.Thread(target=lambda: line.update(url=p.stdout.readline()), daemon=True)
    reader.start()
    reader.join(120)
    url = line.get("url", "").strip()
    if not url.startswith("http://127.0.0.1:"):
        p.kill()
        raise AssertionError(f"no URL on stdout: {url!r}; stderr: {p.stderr.read()[-2000:]}")
    return p, url


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_process_end_to_end(tiny_int4, sig):
    import openai

    p, url = start_serve(tiny_int4, env={"KIMI_DESKTOP_API_KEY": KEY})
    try:
        assert url.endswith("/v1")
        c = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=30)
        r = c.chat.completions.create(model="x", messages=[{"role": "user", "content": SECRET}], max_tokens=3)
        assert r.usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        # a stop while a long answer is streaming: the generation is cancelled, the process exits 0
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        srv = type("S", (), {"port": port})
        s = open_stream(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": SECRET}],
                                                      "max_tokens": 100000, "stream": True}, KEY)
        read_until(s, b"data: ")
        p.send_signal(sig)
        rc = p.wait(15)                                      # "within seconds", with room for a loaded machine
        s.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = p.stderr.read()
    assert rc == 0, err[-2000:]
    assert "POST /v1/chat/completions" in err                 # request lines are logged ...
    assert KEY not in err and SECRET not in err                # ... never the key or a body
    assert "Traceback" not in err


def run_cli(capsys, *argv, env=None):
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        rc = main(["serve", *argv])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rc, capsys.readouterr().err


def test_non_loopback_bind_without_a_key_refuses_to_start(tiny_int4, capsys, monkeypatch):
    monkeypatch.delenv("KIMI_DESKTOP_API_KEY", raising=False)
    rc, err = run_cli(capsys, "--model", str(tiny_int4), "--host", "0.0.0.0")
    assert rc == 2 and "--host 0.0.0.0" in err and "key" in err and "Traceback" not in err


def test_key_file_problems(tiny_int4, tmp_path, capsys):
    rc, err = run_cli(capsys, "--model", str(tiny_int4), "--api-key-file", str(tmp_path / "missing"))
    assert rc == 2 and "--api-key-file" in err and "missing" in err
    empty = tmp_path / "empty"
    empty.write_text("\n")
    rc, err = run_cli(capsys, "--model", str(tiny_int4), "--api-key-file", str(empty))
    assert rc == 2 and "--api-key-file" in err and "one word" in err
    rc, err = run_cli(capsys, "--model", str(tiny_int4), "--api-key-file", str(empty), "--api-key", "k")
    assert rc == 2 and "not both" in err


def test_bad_port_and_a_port_in_use(tiny_int4, capsys, monkeypatch):
    with pytest.raises(SystemExit) as ei:
        main(["serve", "--model", str(tiny_int4), "--port", "70000"])
    assert ei.value.code == 2 and "--port" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        monkeypatch.setattr("kimi_desktop.engines.open_engine", _must_not_load)
        rc, err = run_cli(capsys, "--model", str(tiny_int4), "--port", str(taken.getsockname()[1]))
    assert rc == 2 and "cannot listen there" in err          # and refused before the model loads


def _must_not_load(*a, **kw):
    raise AssertionError("the model was opened before the port was checked")


@pytest.mark.parametrize("flag,value", [("--allowed-host", "http://box.lan"), ("--allowed-host", "box.lan:8000"),
                                        ("--allowed-host", "a b"), ("--allowed-host", ""),
                                        ("--allowed-host", "bad-.lan"), ("--cors-origin", "localhost:3000"),
                                        ("--cors-origin", "http://x.example/app"), ("--cors-origin", "ftp://x.example"),
                                        ("--cors-origin", "http://x.example:99999"), ("--cors-origin", "http://")])
def test_bad_host_and_origin_flags(tiny_int4, capsys, flag, value):
    with pytest.raises(SystemExit) as ei:
        main(["serve", "--model", str(tiny_int4), flag, value])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and err.count("\n") == 1 and flag in err and repr(value) in err


def test_the_flags_reach_the_app(tiny_int4, capsys, monkeypatch):
    from kimi_desktop.server import LocalServer

    got = {}
    monkeypatch.setattr(LocalServer, "run", lambda self, on_ready=None: got.update(app=self.app))
    monkeypatch.setenv("KIMI_DESKTOP_API_KEY", KEY)
    rc = main(["serve", "--model", str(tiny_int4), "--port", "0", "--strict-model", "--model-name", "tiny",
               "--allowed-host", "Box.LAN", "--allowed-host", "10.0.0.7", "--cors-origin", "http://localhost:3000/",
               "--cors-origin", "*"])
    assert rc == 0
    app = got["app"]
    assert app.state.kimi.strict_model and app.state.kimi.model_name == "tiny"
    layers = {m.cls.__name__ if isinstance(m.cls, type) else m.cls.__name__: m.kwargs for m in app.user_middleware}
    assert layers["HostGuard"]["accepted"] == {"box.lan", "10.0.0.7"}
    assert layers["cors"]["origins"] == ("http://localhost:3000", "*")
    assert layers["Guard"]["api_key"] == KEY


def test_help_lists_every_endpoint_and_flag(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for part in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
                 "/v1/messages/count_tokens", "/v1/models", "/health", "/metrics", "--strict-model",
                 "--allowed-host", "--cors-origin", "`ps`"):
        assert part in out, part
