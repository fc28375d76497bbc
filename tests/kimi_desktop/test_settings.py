"""The settings file: defaults, round trip, owner-only atomic writes, corrupt files set aside."""

from __future__ import annotations

import json
import logging
import os
import stat

from kimi_desktop.settings import Settings, config_dir, default_settings_path


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_defaults_when_missing(tmp_path):
    s = Settings.load(tmp_path / "none" / "settings.json")
    assert s.last_model is None and s.remote_endpoints == [] and s.mcp_always_allow == []
    assert s.tool_timeout_s == 30 and s.max_tool_rounds == 16 and s.theme == "system"
    assert s.local_api == {"port": 8000, "api_key": None}
    assert not (tmp_path / "none").exists()          # loading writes nothing


def test_round_trip_owner_only(tmp_path):
    p = tmp_path / "cfg" / "settings.json"
    s = Settings.load(p)
    s.last_model = {"kind": "native", "path": "/models/k2", "expert_cache_gb": 12.5}
    s.remote_endpoints.append({"name": "moonshot", "base_url": "https://api.example/v1", "api_key": "sk-1"})
    s.allow_always("files")
    s.allow_always("files")
    s.local_api["api_key"] = "local-key"
    s.theme = "dark"
    assert s.save() == p
    assert mode(p) == 0o600 and mode(p.parent) == 0o700
    assert [f.name for f in p.parent.iterdir()] == ["settings.json"]      # no temp file left
    t = Settings.load(p)
    assert t == s and t.mcp_always_allow == ["files"]
    assert json.loads(p.read_text())["remote_endpoints"][0]["api_key"] == "sk-1"


def test_save_replaces_a_world_readable_file(tmp_path):
    p = tmp_path / "settings.json"
    p.write_text("{}")
    os.chmod(p, 0o644)
    Settings.load(p).save()
    assert mode(p) == 0o600


def test_corrupt_file_is_set_aside_and_logged_once(tmp_path, caplog):
    p = tmp_path / "settings.json"
    p.write_text('{"theme": "dark",')
    with caplog.at_level(logging.WARNING, logger="kimi_desktop"):
        s = Settings.load(p)
        again = Settings.load(p)
    assert s == Settings() and again == Settings()
    assert (tmp_path / "settings.json.bad").read_text() == '{"theme": "dark",'
    assert not p.exists()
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "settings.json" in msgs[0] and "defaults" in msgs[0]


def test_not_an_object_is_corrupt(tmp_path):
    p = tmp_path / "settings.json"
    p.write_text("[1, 2]")
    assert Settings.load(p) == Settings()
    assert (tmp_path / "settings.json.bad").exists()


def test_bad_field_gets_its_default_others_kept(tmp_path, caplog):
    p = tmp_path / "settings.json"
    p.write_text(json.dumps({"tool_timeout_s": "slow", "max_tool_rounds": 4, "theme": "neon",
                             "last_model": {"kind": "gpu-farm"}, "local_api": {"port": 9001},
                             "future_key": {"x": 1}}))
    with caplog.at_level(logging.WARNING, logger="kimi_desktop"):
        s = Settings.load(p)
    assert s.tool_timeout_s == 30 and s.theme == "system" and s.last_model is None
    assert s.max_tool_rounds == 4 and s.local_api == {"port": 9001, "api_key": None}
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "tool_timeout_s" in text and "theme" in text and "last_model" in text
    s.save()
    assert json.loads(p.read_text())["future_key"] == {"x": 1}       # a newer version's keys survive


def test_unreadable_file_gives_defaults(tmp_path):
    p = tmp_path / "settings.json"
    p.mkdir()                                      # reading a directory fails with an OSError
    assert Settings.load(p) == Settings()


def test_config_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KIMI_DESKTOP_CONFIG_DIR", str(tmp_path / "c"))
    assert config_dir() == tmp_path / "c" and default_settings_path() == tmp_path / "c" / "settings.json"
    Settings.load().save()
    assert mode(tmp_path / "c") == 0o700


def test_remember_model_and_open_args(tmp_path):
    from kimi_desktop.settings import model_open_args
    s = Settings.load(tmp_path / "settings.json")
    s.remember_model({"kind": "remote", "url": "http://127.0.0.1:9/v1", "api_key": "k1", "name": "lab"})
    s.remember_model({"kind": "remote", "url": "http://127.0.0.1:9/v1", "api_key": "k2", "name": "lab"})
    assert s.remote_endpoints == [{"name": "lab", "base_url": "http://127.0.0.1:9/v1", "api_key": "k2"}]
    assert model_open_args(s.last_model) == ("remote", "http://127.0.0.1:9/v1", {"api_key": "k2"})
    s.remember_model({"kind": "native", "path": "/m/k2", "expert_cache_gb": 8.0})
    s.save()
    assert Settings.load(s.path).last_model == {"kind": "native", "path": "/m/k2", "expert_cache_gb": 8.0}
    assert model_open_args(s.last_model) == ("native", "/m/k2", {"expert_cache_gb": 8.0})
    assert model_open_args({"kind": "native", "path": "/m", "expert_cache_gb": None}) == ("native", "/m", {})
    assert model_open_args({"kind": "llama.cpp", "path": "/m/k2.gguf"}) == ("llama.cpp", "/m/k2.gguf", {})
