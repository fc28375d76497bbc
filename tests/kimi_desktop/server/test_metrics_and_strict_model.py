"""GET /metrics (Prometheus text: the server's request and token counters, the engine's speeds, queue
and expert-cache figures) and --strict-model (other model names get 404 in each API's shape)."""

from __future__ import annotations

import json

import pytest

from kimi_desktop.server import LocalServer, create_app
from kimi_desktop.server.metrics import Metrics

from .helpers import openai_client, raw, sse_events

USER = [{"role": "user", "content": "Hi"}]


def parse(text: str) -> tuple[dict, dict]:
    """Exposition text -> ({sample line's name+labels: value}, {family: type}); checks the layout."""
    samples, types, helped = {}, {}, set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name in helped and kind in ("counter", "gauge")
            types[name] = kind
        elif line:
            key, value = line.rsplit(" ", 1)
            family = key.split("{", 1)[0]
            assert family in types, line                        # every sample after its family's TYPE
            samples[key] = float(value)
    assert all(name.startswith("kimi_desktop_") for name in types)
    return samples, types


@pytest.fixture
def fresh(server_engine):
    s = LocalServer(create_app(server_engine, "tiny"), port=0, logs=False).start_in_thread()
    yield s
    s.stop()


def test_metrics_count_the_api_traffic(fresh, server_engine):
    c = openai_client(fresh)
    usages = [c.chat.completions.create(model="x", messages=USER, max_tokens=3, temperature=0).usage,
              c.chat.completions.create(model="x", messages=USER, max_tokens=2, temperature=0).usage,
              c.completions.create(model="x", prompt="Hello there", max_tokens=2, temperature=0).usage]
    status, _, body = raw(fresh, "POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 2, "stream": True,
                                                                  "stream_options": {"include_usage": True}})
    usages.append(type("U", (), {k: v for k, v in sse_events(body)[-2]["usage"].items()})())
    assert status == 200
    assert raw(fresh, "POST", "/v1/chat/completions", {"messages": []})[0] == 400
    assert raw(fresh, "GET", "/v1/nothing/here")[0] == 404
    assert raw(fresh, "GET", "/v1/models/any-name")[0] == 200

    status, headers, body = raw(fresh, "GET", "/metrics")
    assert status == 200 and headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    m, types = parse(body.decode())
    req = "kimi_desktop_requests_total"
    assert types[req] == "counter"
    assert m[f'{req}{{endpoint="/v1/chat/completions",status="200"}}'] == 3
    assert m[f'{req}{{endpoint="/v1/completions",status="200"}}'] == 1
    assert m[f'{req}{{endpoint="/v1/chat/completions",status="400"}}'] == 1
    assert m[f'{req}{{endpoint="other",status="404"}}'] == 1
    assert m[f'{req}{{endpoint="/v1/models/{{name:path}}",status="200"}}'] == 1
    assert f'{req}{{endpoint="/metrics",status="200"}}' not in m          # counted once answered
    assert m["kimi_desktop_generated_tokens_total"] == sum(u.completion_tokens for u in usages) == 9
    assert m["kimi_desktop_prompt_tokens_total"] == sum(u.prompt_tokens for u in usages)
    assert m["kimi_desktop_cached_prompt_tokens_total"] == sum(
        u.prompt_tokens_details["cached_tokens"] if isinstance(u.prompt_tokens_details, dict)
        else u.prompt_tokens_details.cached_tokens for u in usages)
    assert m["kimi_desktop_cached_prompt_tokens_total"] > 0              # the second chat reused the first's prefix
    st = server_engine.stats()
    assert m["kimi_desktop_context_size"] == server_engine.ctx
    assert m["kimi_desktop_busy"] == 0 and m["kimi_desktop_queue_waiting"] == 0
    assert m["kimi_desktop_decode_tokens_per_second"] > 0 and m["kimi_desktop_prefill_tokens_per_second"] > 0
    assert m["kimi_desktop_resident_bytes"] > 1 << 20
    for name, key in (("expert_cache_hits_total", "expert_cache_hits"), ("expert_cache_misses_total",
                      "expert_cache_misses"), ("expert_cache_hit_rate", "expert_cache_hit_rate"),
                      ("disk_read_bytes_total", "disk_read_bytes"), ("expert_cache_bytes", "expert_cache_bytes")):
        assert m.get(f"kimi_desktop_{name}") == st[key], name       # no traffic since the scrape; None: no sample
    assert types["kimi_desktop_disk_read_bytes_total"] == "counter" and st["disk_read_bytes"] is not None
    m2, _ = parse(raw(fresh, "GET", "/metrics")[2].decode())
    assert m2[f'{req}{{endpoint="/metrics",status="200"}}'] == 1


def test_metrics_show_the_expert_store_at_work(tiny_int4):
    from kimi_desktop.engines.native import NativeEngine

    e = NativeEngine(tiny_int4, expert_cache_bytes=1 << 20)           # a store smaller than the experts
    s = LocalServer(create_app(e, "store"), port=0, logs=False).start_in_thread()
    try:
        m0, _ = parse(raw(s, "GET", "/metrics")[2].decode())
        openai_client(s).chat.completions.create(model="x", messages=USER, max_tokens=3, temperature=0)
        m, _ = parse(raw(s, "GET", "/metrics")[2].decode())
    finally:
        s.stop()
        e.close()
    assert m0["kimi_desktop_disk_read_bytes_total"] == 0 and m0["kimi_desktop_expert_cache_misses_total"] == 0
    hits, misses = m["kimi_desktop_expert_cache_hits_total"], m["kimi_desktop_expert_cache_misses_total"]
    assert misses > 0 and m["kimi_desktop_disk_read_bytes_total"] > 0
    assert m["kimi_desktop_expert_cache_hit_rate"] == pytest.approx(hits / (hits + misses))
    assert 0 < m["kimi_desktop_expert_cache_bytes"] <= 1 << 20


def test_metrics_tolerate_what_an_engine_does_not_report():
    class U:
        prompt_tokens, cached_prompt_tokens, completion_tokens = 5, 2, 3
    mt = Metrics()
    mt.add_usage(U())
    mt.count_request('/v1/"odd"\npath', 200)
    m, types = parse(mt.render({"busy": True, "decode_tok_s": 12.5, "context_size": None, "expert_cache_hits": None,
                                "engine": "remote"}, waiting_fallback=2))
    assert m["kimi_desktop_busy"] == 1 and m["kimi_desktop_decode_tokens_per_second"] == 12.5
    assert m["kimi_desktop_queue_waiting"] == 2                       # the server's own count when the engine has none
    assert "kimi_desktop_context_size" in types and "kimi_desktop_context_size" not in m
    assert "kimi_desktop_expert_cache_hits_total" not in m
    assert m["kimi_desktop_prompt_tokens_total"] == 5 and m["kimi_desktop_generated_tokens_total"] == 3
    assert m['kimi_desktop_requests_total{endpoint="/v1/\\"odd\\"\\npath",status="200"}'] == 1
    assert parse(Metrics().render({}))[0]["kimi_desktop_generated_tokens_total"] == 0


class Broken:
    kind = "broken"

    def stats(self):
        raise RuntimeError("no stats")


def test_metrics_survive_an_engine_whose_stats_fail():
    s = LocalServer(create_app(Broken(), "b"), port=0, logs=False).start_in_thread()
    try:
        status, _, body = raw(s, "GET", "/metrics")
        assert status == 200 and "kimi_desktop_requests_total" in body.decode()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def strict(server_engine):
    s = LocalServer(create_app(server_engine, "tiny", strict_model=True), port=0, logs=False).start_in_thread()
    yield s
    s.stop()


def test_strict_model_serves_only_its_name(strict):
    import anthropic
    import openai

    c = openai_client(strict)
    assert c.chat.completions.create(model="tiny", messages=USER, max_tokens=1).model == "tiny"
    with pytest.raises(openai.NotFoundError) as ei:
        c.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=1)
    err = ei.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model" and "'gpt-4o'" in err["message"]
    assert "--strict-model" in err["message"] and "'tiny'" in err["message"]
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-3.5-turbo-instruct", prompt="a", max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="gpt-5", input="Hi", max_output_tokens=1)
    assert c.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4o")

    a = anthropic.Anthropic(base_url=strict.base_url, api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(anthropic.NotFoundError) as ei:
        a.messages.create(model="claude-haiku-4-5", max_tokens=1, messages=USER)
    assert ei.value.body == {"type": "error", "error": {"type": "not_found_error", "message": ei.value.body[
        "error"]["message"]}} and "claude-haiku-4-5" in ei.value.body["error"]["message"]
    status, _, body = raw(strict, "POST", "/v1/messages/count_tokens", {"model": "claude-x", "messages": USER})
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"
    assert a.messages.create(model="tiny", max_tokens=1, messages=USER).model == "tiny"
    # no model named, or a body the schema refuses anyway: not this check's business
    assert raw(strict, "POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 1})[0] == 200
    assert raw(strict, "POST", "/v1/chat/completions", {"model": 5, "messages": USER})[0] == 400


def test_without_strict_model_any_name_is_served(server):
    c = openai_client(server)
    assert c.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=1).model == "gpt-4o"
    assert c.models.retrieve("claude-haiku-4-5").id == "claude-haiku-4-5"
