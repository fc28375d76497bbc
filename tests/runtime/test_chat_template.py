"""Chat format: the reference's worked examples, built-in renderer == Jinja templates, sandbox."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from kimi_desktop.runtime import load_tokenizer
from kimi_desktop.runtime.chat_template import (ChatTemplateError, builtin_template_text, deep_sort,
                                                render_k2_instruct, render_k2_thinking, render_template)
from kimi_desktop.runtime.tokenizer_files import write_tokenizer_files

# --- reference §5, worked examples (strings copied from the document) ---------------------
EXAMPLE_1_MESSAGES = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
    {"role": "user", "content": "2+2?"},
]
EXAMPLE_1 = """<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|><think></think>Hello!<|im_end|><|im_user|>user<|im_middle|>2+2?<|im_end|><|im_assistant|>assistant<|im_middle|>"""  # noqa: E501

EXAMPLE_2_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
EXAMPLE_2_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "need the tool",
     "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny, 21C"},
]
EXAMPLE_2 = """<|im_system|>tool_declare<|im_middle|>[{"function":{"name":"get_weather","parameters":{"properties":{"city":{"type":"string"}},"type":"object"}},"type":"function"}]<|im_end|><|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>Weather in Paris?<|im_end|><|im_assistant|>assistant<|im_middle|><think>need the tool</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city":"Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|><|im_system|>tool<|im_middle|>## Return of functions.get_weather:0
sunny, 21C<|im_end|><|im_assistant|>assistant<|im_middle|>"""  # noqa: E501

THINKING = builtin_template_text("thinking")
INSTRUCT = builtin_template_text("instruct")


@pytest.fixture(scope="session")
def thinking_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-thinking")
    write_tokenizer_files(folder, 1792, flavor="thinking")
    return folder


@pytest.fixture(scope="session")
def instruct_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-instruct")
    write_tokenizer_files(folder, 1792, flavor="instruct")
    return folder


def test_worked_example_1():
    assert render_k2_thinking(EXAMPLE_1_MESSAGES, None, True) == EXAMPLE_1
    assert render_template(THINKING, EXAMPLE_1_MESSAGES, add_generation_prompt=True) == EXAMPLE_1


def test_worked_example_2():
    assert "\nsunny" in EXAMPLE_2
    assert render_k2_thinking(EXAMPLE_2_MESSAGES, EXAMPLE_2_TOOLS, True) == EXAMPLE_2
    assert render_template(THINKING, EXAMPLE_2_MESSAGES, tools=EXAMPLE_2_TOOLS) == EXAMPLE_2


def test_render_chat_uses_the_folders_template(thinking_folder):
    tok = load_tokenizer(thinking_folder)
    assert tok.chat_template == THINKING
    assert tok.render_chat(EXAMPLE_1_MESSAGES) == EXAMPLE_1
    assert tok.render_chat(EXAMPLE_2_MESSAGES, tools=EXAMPLE_2_TOOLS) == EXAMPLE_2
    ids = tok.encode(EXAMPLE_2)
    sp = tok.special_ids
    for name in ("<|im_system|>", "<|im_middle|>", "<|im_end|>", "<|tool_call_begin|>", "<think>", "</think>"):
        assert sp[name] in ids
    assert tok.decode(ids) == EXAMPLE_2


# --- random conversations: built-in == Jinja ----------------------------------------------
def random_conversation(rng: random.Random) -> tuple[list, list | None]:
    msgs: list[dict] = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": rng.choice(["Be brief.", "系统提示", "", "two\nlines"])})
    idx = 0
    for _ in range(rng.randrange(0, 8)):
        role = rng.choice(["user", "user", "assistant", "assistant", "tool", "system"])
        m: dict = {"role": role}
        m["content"] = rng.choice([
            "hi", "", None, "多语言 😀 text", "line\nbreak",
            [{"type": "text", "text": "look: "}, {"type": "image_url", "image_url": {"url": "file:///a.png"}},
             {"type": "text", "text": "what is it?"}],
            [{"type": "image"}], [{"type": "text", "text": "part"}], [],
        ])
        if rng.random() < 0.25:
            m["name"] = rng.choice(["alice", "", "get_weather", None])
        if role == "assistant":
            if rng.random() < 0.6:
                m["reasoning_content"] = rng.choice(["thinking...", "", "深思熟虑", None])
            if rng.random() < 0.5:
                calls = []
                for j in range(rng.randrange(0, 3)):
                    args = rng.choice(['{"city":"Paris"}', {"b": 1, "a": "é", "list": [1, 2]}, "", {}, "not json"])
                    cid = rng.choice([f"functions.f{j}:{idx}", f"call_{idx:04x}", "weird id"])
                    calls.append({"id": cid, "type": "function", "function": {"name": f"f{j}", "arguments": args}})
                    idx += 1
                m["tool_calls"] = calls
        if role == "tool":
            m["tool_call_id"] = rng.choice(["functions.get_weather:0", "call_abc123", "x:1"])
        msgs.append(m)
    tools = rng.choice([None, [], EXAMPLE_2_TOOLS, [
        {"type": "function", "function": {"name": "search", "description": "Suche im Netz — 搜索",
                                          "parameters": {"type": "object", "required": ["q"],
                                                         "properties": {"q": {"type": "string"},
                                                                        "n": {"type": "integer"}}}}},
        {"function": {"name": "noop", "parameters": {}}, "type": "function"}]])
    return msgs, tools


@pytest.mark.parametrize("flavor", ["thinking", "instruct"])
def test_builtin_equals_jinja(flavor):
    builtin = render_k2_thinking if flavor == "thinking" else render_k2_instruct
    text = THINKING if flavor == "thinking" else INSTRUCT
    rng = random.Random(1234)
    for _ in range(400):
        msgs, tools = random_conversation(rng)
        gen = rng.random() < 0.7
        want = render_template(text, msgs, tools=tools, add_generation_prompt=gen)
        assert builtin(msgs, tools, gen) == want, json.dumps([msgs, tools], ensure_ascii=False)


def test_same_as_transformers_renderer():
    """Our Jinja path renders exactly what transformers' apply_chat_template machinery renders."""
    ctu = pytest.importorskip("transformers.utils.chat_template_utils")
    rng = random.Random(99)
    for template in (THINKING, INSTRUCT):
        for _ in range(150):
            msgs, tools = random_conversation(rng)
            gen = rng.random() < 0.7
            hf_msgs = ctu._normalize_chat_messages(msgs)
            hf_tools = deep_sort(tools) if tools is not None else None     # tokenization_kimi's step
            (want,), _ = ctu.render_jinja_template([hf_msgs], tools=hf_tools, chat_template=template,
                                                   add_generation_prompt=gen)
            assert render_template(template, msgs, tools=tools, add_generation_prompt=gen) == want


def test_reasoning_aliases():
    loop = [{"role": "user", "content": "q"},
            {"role": "assistant", "reasoning": "via reasoning", "tool_calls": [
                {"id": "a", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "a", "content": "1"},
            {"role": "assistant", "thinking": "via thinking", "reasoning_content": None, "tool_calls": [
                {"id": "b", "function": {"name": "f", "arguments": "{}"}}]}]
    out = render_k2_thinking(loop)
    assert "<think>via reasoning</think>" in out and "<think>via thinking</think>" in out
    assert out == render_template(THINKING, loop)


def test_tools_sorted_compact_non_ascii_kept():
    tools = [{"type": "function", "function": {"parameters": {"type": "object", "properties": {
        "z": {"type": "string"}, "a": {"description": "城市", "type": "string"}}}, "name": "w"}}]
    want = ('<|im_system|>tool_declare<|im_middle|>[{"function":{"name":"w","parameters":{"properties":'
            '{"a":{"description":"城市","type":"string"},"z":{"type":"string"}},"type":"object"}},'
            '"type":"function"}]<|im_end|>')
    for out in (render_k2_thinking([], tools, False),
                render_template(THINKING, [], tools=tools, add_generation_prompt=False),
                render_k2_instruct([], tools, False)):
        assert out.startswith(want)
    assert tools[0]["function"]["parameters"]["properties"].keys() == {"z", "a"}    # input untouched
    assert list(deep_sort({"b": [{"d": 1, "c": 2}], "a": 0})) == ["a", "b"]


def test_history_drops_reasoning_suffix_keeps_it():
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "", "reasoning_content": "r2",
         "tool_calls": [{"id": "call_A", "function": {"name": "f", "arguments": {"x": 1, "y": "ü"}}}]},
        {"role": "tool", "tool_call_id": "call_A", "name": "f", "content": "42"},
        {"role": "assistant", "content": "", "reasoning_content": "r3",
         "tool_calls": [{"id": "functions.g:1", "function": {"name": "g", "arguments": "{}"}}]},
    ]
    out = render_k2_thinking(msgs, None, False)
    assert "r1" not in out and "<think></think>a1" in out
    assert ("<think>r2</think><|tool_calls_section_begin|><|tool_call_begin|>call_A<|tool_call_argument_begin|>"
            '{"x": 1, "y": "ü"}<|tool_call_end|><|tool_calls_section_end|>') in out     # dict args: tojson
    assert "<|im_system|>f<|im_middle|>## Return of call_A\n42<|im_end|>" in out       # name field, id as sent
    assert out.endswith("<think>r3</think><|tool_calls_section_begin|><|tool_call_begin|>functions.g:1"
                        "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|><|im_end|>")
    assert out == render_template(THINKING, msgs, add_generation_prompt=False)


def test_parts_images_names_and_nulls():
    msgs = [{"role": "system", "content": "S", "name": "boss"},
            {"role": "user", "name": "alice", "content": [
                {"type": "text", "text": "see "}, {"type": "image_url", "image_url": {"url": "u"}},
                {"type": "text", "text": "this"}]},
            {"role": "assistant", "content": None, "reasoning_content": None}]
    out = render_k2_thinking(msgs, None, True)
    assert out == ("<|im_system|>boss<|im_middle|>S<|im_end|>"
                   "<|im_user|>alice<|im_middle|>see <|media_start|>image<|media_content|><|media_pad|>"
                   "<|media_end|>\nthis<|im_end|>"
                   "<|im_assistant|>assistant<|im_middle|><think></think><|im_end|>"
                   "<|im_assistant|>assistant<|im_middle|>")
    assert render_template(THINKING, msgs) == out
    # a null reasoning_content in the tool loop reads as missing, never as "None"
    call = {"id": "x", "function": {"name": "f", "arguments": "{}"}}
    loop = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "reasoning_content": None, "tool_calls": [call]}]
    assert "None" not in render_k2_thinking(loop) and "None" not in render_template(THINKING, loop)


def test_instruct_format(instruct_folder):
    tok = load_tokenizer(instruct_folder)
    assert tok.chat_template == INSTRUCT and "<think>" not in tok.special_ids
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Let me check.",
             "tool_calls": [{"id": "functions.f:0", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "functions.f:0", "content": "ok"}]
    want = ("<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>\n"
            "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>Let me check."
            "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}"
            "<|tool_call_end|><|tool_calls_section_end|><|im_end|><|im_system|>tool<|im_middle|>## Return of "
            "functions.f:0\nok<|im_end|><|im_assistant|>assistant<|im_middle|>")
    assert tok.render_chat(msgs) == want
    assert render_k2_instruct(msgs) == want
    assert render_k2_instruct([]) == "<|im_assistant|>assistant<|im_middle|>"
    assert render_k2_thinking([]).startswith("<|im_system|>system<|im_middle|>You are Kimi")


def test_template_sources(thinking_folder, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(thinking_folder, d)
    (d / "chat_template.jinja").unlink()
    tok = load_tokenizer(d)                               # no template: built-in thinking renderer
    assert tok.chat_template is None and tok.render_chat(EXAMPLE_2_MESSAGES, tools=EXAMPLE_2_TOOLS) == EXAMPLE_2
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ bos_token }}{{ messages[0]['content'] }}{{ extra }}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(d).render_chat([{"role": "user", "content": "x"}], extra="!") == "[BOS]x!"
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(d).render_chat([]) == "D"
    (d / "chat_template.jinja").write_text("file wins")
    assert load_tokenizer(d).render_chat([]) == "file wins"


# --- Jinja environment: HF's features and the sandbox ---------------------------------------
def test_hf_environment_features():
    msgs = [{"role": "user", "content": "x"}]
    assert render_template("{{ {'b': 1, 'a': 'é'} | tojson }}", msgs) == '{"b": 1, "a": "é"}'
    assert (render_template("{{ {'b': 1, 'a': 2} | tojson(indent=1, sort_keys=True) }}", msgs)
            == '{\n "a": 2,\n "b": 1\n}')
    assert render_template("{{ [1, 2] | tojson(separators=(',', ':')) }}", msgs) == "[1,2]"
    assert len(render_template("{{ strftime_now('%Y-%m-%d') }}", msgs)) == 10
    loop_break = "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
    assert render_template(loop_break, msgs) == "01"
    assert render_template("{% generation %}kept{% endgeneration %}", msgs) == "kept"
    assert render_template("{{ dict(a=1) | tojson }}{{ dict.fromkeys(['k']) | tojson }}", msgs) == '{"a": 1}{"k": null}'

    assert render_template("  {% if true %}\n  a\n  {% endif %}\n", msgs) == "  a\n"     # trim/lstrip blocks


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages[0].__class__.__base__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{{ messages.append(1) }}",                       # immutable sandbox: no mutating methods
    "{% set d = {} %}{{ d.update({'a': 1}) }}",
    "{% set ns = namespace(_x=1) %}",
    "{% set ns = namespace(a=1) %}{% set ns._a = 2 %}",
])
def test_sandbox_blocks_escapes(template):
    with pytest.raises(ChatTemplateError, match="sandbox forbids"):
        render_template(template, [{"role": "user", "content": "x"}])


def test_sandbox_unsafe_attribute_alone_prints_nothing():
    assert render_template("{{ messages.__class__ }}{{ raise_exception.__globals__ }}", []) == ""


def test_raise_exception_and_syntax_errors():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_template("{{ raise_exception('roles must alternate') }}", [])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_template("{% if %}", [])
    with pytest.raises(ChatTemplateError, match="UndefinedError|undefined"):
        render_template("{{ nothing.at.all }}", [])


@pytest.mark.parametrize("messages", [
    "hello", [{"content": "no role"}], [{"role": "user", "content": 5}],
    [{"role": "assistant", "tool_calls": [{"id": "x"}]}], ["not a dict"],
])
def test_malformed_messages(messages):
    for render in (lambda: render_k2_thinking(messages), lambda: render_template(THINKING, messages)):
        with pytest.raises(ChatTemplateError):
            render()


def test_builtin_template_text():
    assert "{%- break -%}" in THINKING and "tojson(separators=(',', ':'))" in THINKING
    assert "<think>" not in INSTRUCT.split("-#}", 1)[1]          # (the header comment mentions it)
    with pytest.raises(ValueError):
        builtin_template_text("base")
