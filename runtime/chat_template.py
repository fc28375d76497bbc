"""Chat prompts in K2's format: the checkpoint's own Jinja template, rendered the way Hugging Face
transformers renders it, and a pure-Python renderer of the same format for folders without one.

Both paths see the same input: messages as transformers prepares them (None-valued keys dropped, so
`"content": null` reads as no content, never as the text "None"; `reasoning_content` filled from
`reasoning` / `thinking`) and tools with their dict keys deep-sorted, as the checkpoint's tokenizer
(tokenization_kimi.py) does before rendering.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
MEDIA = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>\n"   # upstream's text, "\n" too
FLAVORS = ("thinking", "instruct")


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or the conversation has the wrong shape."""


# --------------------------------------------------------------------------------------------
# Input normalisation shared by both paths

def deep_sort(obj: Any) -> Any:
    """Dict keys sorted at every depth (tokenization_kimi.deep_sort_dict)."""
    if isinstance(obj, Mapping):
        return {k: deep_sort(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [deep_sort(v) for v in obj]
    return obj


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain dicts without None-valued keys (as transformers does), `reasoning_content` filled from
    `thinking` / `reasoning` when only those are given; ChatTemplateError for a malformed message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of message objects, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"messages[{i}]: expected an object, got {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"messages[{i}]: 'role' must be a string")
        c = m.get("content")
        if c is not None and not isinstance(c, str):
            if not isinstance(c, Sequence) or not all(isinstance(p, Mapping) for p in c):
                raise ChatTemplateError(f"messages[{i}]: 'content' must be a string, null, or a list "
                                        f"of content-part objects")
        tcs = m.get("tool_calls")
        if tcs:
            if not isinstance(tcs, Sequence) or isinstance(tcs, (str, bytes)):
                raise ChatTemplateError(f"messages[{i}]: 'tool_calls' must be a list")
            for j, tc in enumerate(tcs):
                if not (isinstance(tc, Mapping) and isinstance(tc.get("function"), Mapping)
                        and "arguments" in tc["function"]):
                    raise ChatTemplateError(f"messages[{i}].tool_calls[{j}]: expected "
                                            f"{{id, function: {{name, arguments}}}}")
        m = {k: v for k, v in m.items() if v is not None}
        if "reasoning_content" not in m:      # older names for it, aliased as transformers does
            alias = next((m[k] for k in ("thinking", "reasoning") if k in m), None)
            if alias is not None:
                m["reasoning_content"] = alias
        out.append(m)
    return out


def _prepare_tools(tools: Sequence[Mapping] | None) -> list | None:
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ChatTemplateError(f"tools must be a list of tool objects, got {type(tools).__name__}")
    return deep_sort(list(tools))


# --------------------------------------------------------------------------------------------
# Jinja path (as transformers' apply_chat_template)

def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.utils
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """transformers' {% generation %} block (marks assistant text for training): rendered as is."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    class TemplateDict:
        """dict() and dict.fromkeys() without exposing the dict type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class Namespace(jinja2.utils.Namespace):
        """namespace() that refuses underscore names (transformers' TemplateNamespace)."""

        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r}: underscore names are not allowed")

    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = Namespace
    env.globals["dict"] = TemplateDict()
    return env


@functools.lru_cache(maxsize=16)
def compile_template(text: str):
    """A compiled template (cached by its text); ChatTemplateError if it does not parse."""
    import jinja2

    try:
        return _environment().from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: line {e.lineno}: {e.message}") from None


def render_template(template: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
                    add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """Render a Jinja chat template in transformers' sandbox (trim_blocks, lstrip_blocks,
    loopcontrols, tojson, raise_exception, strftime_now). kwargs reach the template as variables."""
    import jinja2

    compiled = compile_template(template)
    try:
        return compiled.render(messages=normalize_messages(messages), tools=_prepare_tools(tools),
                               add_generation_prompt=add_generation_prompt, **kwargs)
    except ChatTemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template tried something the sandbox forbids: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def builtin_template_text(flavor: str) -> str:
    """The Jinja text of kimi-desktop's K2 template for flavor "thinking" or "instruct"."""
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
    return (resources.files("kimi_desktop.runtime") / "templates" / f"k2_{flavor}.jinja").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Built-in renderer (no Jinja): the same strings as templates/k2_*.jinja

def _field(d: Mapping[str, Any], key: str, default: str = "") -> str:
    """How Jinja prints d[key] ({{ d[key] }}): a missing key prints as `default`, a value as str(value)."""
    return str(d[key]) if key in d else default


def _content(m: Mapping[str, Any]) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    out = []
    for part in c:
        if part.get("type") == "image" or "image" in part or "image_url" in part:
            out.append(MEDIA)
        else:
            out.append(_field(part, "text"))
    return "".join(out)


def _role(m: Mapping[str, Any]) -> str:
    role = m["role"]
    name = m.get("name") or role
    tag = {"user": "<|im_user|>", "assistant": "<|im_assistant|>"}.get(role, "<|im_system|>")
    return f"{tag}{name}<|im_middle|>"


def _tool_calls(m: Mapping[str, Any]) -> str:
    out = ["<|tool_calls_section_begin|>"]
    for tc in m["tool_calls"]:
        args = tc["function"]["arguments"]
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        out.append(f"<|tool_call_begin|>{_field(tc, 'id')}<|tool_call_argument_begin|>{args}<|tool_call_end|>")
    out.append("<|tool_calls_section_end|>")
    return "".join(out)


def _tool_declare(tools: list | None) -> str:
    if not tools:
        return ""
    return f"<|im_system|>tool_declare<|im_middle|>{_tojson(tools, separators=(',', ':'))}<|im_end|>"


def _body(m: Mapping[str, Any]) -> str:
    if m["role"] == "tool":
        return f"## Return of {_field(m, 'tool_call_id')}\n{_content(m)}"
    return _content(m)


def render_k2_thinking(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
                       add_generation_prompt: bool = True) -> str:
    """K2-Thinking's format (templates/k2_thinking.jinja) without Jinja."""
    messages, tools = normalize_messages(messages), _prepare_tools(tools)
    history_end = max((i for i, m in enumerate(messages) if m["role"] == "assistant" and not m.get("tool_calls")),
                      default=-1)
    out = [_tool_declare(tools)]
    if not messages or messages[0]["role"] != "system":
        out.append(f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM}<|im_end|>")
    for i, m in enumerate(messages):
        out.append(_role(m))
        if m["role"] == "assistant":
            reasoning = _field(m, "reasoning_content") if i > history_end else ""
            out.append(f"<think>{reasoning}</think>{_content(m)}")
            if m.get("tool_calls"):
                out.append(_tool_calls(m))
        else:
            out.append(_body(m))
        out.append("<|im_end|>")
    return _joined(out, add_generation_prompt)


def _joined(out: list[str], add_generation_prompt: bool) -> str:
    """The rendered turns, then the assistant's opening when a reply is wanted."""
    return "".join(out) + ("<|im_assistant|>assistant<|im_middle|>" if add_generation_prompt else "")


def render_k2_instruct(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
                       add_generation_prompt: bool = True) -> str:
    """K2-Instruct's format (templates/k2_instruct.jinja) without Jinja."""
    messages, tools = normalize_messages(messages), _prepare_tools(tools)
    out = [_tool_declare(tools)]
    for i, m in enumerate(messages):
        if i == 0 and m["role"] != "system":
            out.append(f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM}<|im_end|>\n")
        out.append(_role(m))
        if m["role"] == "assistant" and m.get("tool_calls"):
            out.append(_content(m) + _tool_calls(m))
        else:
            out.append(_body(m))
        out.append("<|im_end|>")
    return _joined(out, add_generation_prompt)


BUILTIN_RENDERERS = {"thinking": render_k2_thinking, "instruct": render_k2_instruct}


class ChatRenderer:
    """Renders with the checkpoint's template text, or the built-in K2 renderer of `flavor`."""

    def __init__(self, template: str | None, flavor: str = "thinking",
                 special_tokens: Mapping[str, str] | None = None):
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
        self.template, self.flavor = template, flavor
        self.special_tokens = dict(special_tokens or {})
        if template is not None:
            compile_template(template)          # fail early on a template that does not parse

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
               add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if self.template is None:
            return BUILTIN_RENDERERS[self.flavor](messages, tools, add_generation_prompt)
        return render_template(self.template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                               **{**self.special_tokens, **kwargs})
