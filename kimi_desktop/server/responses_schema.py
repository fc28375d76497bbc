"""Pydantic models of the OpenAI Responses request body (POST /v1/responses).

They check types and ranges (a schema violation is a 400 naming the field) and make the OpenAPI
schema describe the body. Unknown fields are accepted and ignored, and so are input items and tools
of types this server has no use for: a tagged union would refuse them, so `input` and `tools` pick
their member with a callable discriminator that sends every unknown `type` to a catch-all model.

Input items: message (role user | assistant | system | developer; content a string or parts
input_text / output_text; input_image / input_file / input_audio parts are refused by the route),
function_call, function_call_output, reasoning (K2's reasoning sent back), Codex's custom_tool_call /
custom_tool_call_output / local_shell_call, item_reference (refused: nothing is stored), and any
other type (dropped by the route with a log line).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from .openai_schema import INT64


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# -- content parts ------------------------------------------------------------------------------------

class TextPart(_Model):
    type: Literal["input_text", "output_text", "text", "summary_text", "reasoning_text"]
    text: str


class RefusalPart(_Model):
    type: Literal["refusal"]
    refusal: str


class MediaPart(_Model):
    """Images, files and audio: accepted by the schema, refused by the route (K2 reads text)."""
    type: Literal["input_image", "input_file", "input_audio"]


Part = Annotated[TextPart | RefusalPart | MediaPart, Field(discriminator="type")]


# -- input items ----------------------------------------------------------------------------------------

class MessageItem(_Model):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    id: str | None = None


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[Part]


class ReasoningText(_Model):
    type: Literal["reasoning_text", "text", "summary_text"]
    text: str


class ReasoningItem(_Model):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = []
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None


class CustomToolCallItem(_Model):
    """Codex's freeform tools (apply_patch): kept in history as a tool call whose arguments are `input`."""
    type: Literal["custom_tool_call"]
    call_id: str
    name: str
    input: str


class CustomToolCallOutputItem(_Model):
    type: Literal["custom_tool_call_output"]
    call_id: str
    output: str | list[Part]


class LocalShellCallItem(_Model):
    """Codex's local_shell tool call: kept in history as a call of `local_shell` with the action as arguments."""
    type: Literal["local_shell_call"]
    call_id: str | None = None
    id: str | None = None
    action: dict[str, Any]


class ItemReference(_Model):
    type: Literal["item_reference"]
    id: str


class OtherItem(_Model):
    """Any other item type (web_search_call, compaction, ...): dropped by the route with a log line."""
    type: str


# item type -> its member's tag (capitalised: errors.field_path leaves such tags out of the field name)
ITEM_TYPES = {"message": "Message", "function_call": "FunctionCall", "function_call_output": "FunctionCallOutput",
              "reasoning": "Reasoning", "custom_tool_call": "CustomToolCall",
              "custom_tool_call_output": "CustomToolCallOutput", "local_shell_call": "LocalShellCall",
              "item_reference": "ItemReference"}


def _item_tag(v: Any) -> str:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    if kind is None and isinstance(v, dict) and "role" in v:
        kind = "message"                    # EasyInputMessage: {"role", "content"} without a type
    return ITEM_TYPES.get(kind, "Other")


Item = Annotated[(
    Annotated[MessageItem, Tag("Message")] | Annotated[FunctionCallItem, Tag("FunctionCall")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutput")] | Annotated[ReasoningItem, Tag("Reasoning")]
    | Annotated[CustomToolCallItem, Tag("CustomToolCall")]
    | Annotated[CustomToolCallOutputItem, Tag("CustomToolCallOutput")]
    | Annotated[LocalShellCallItem, Tag("LocalShellCall")] | Annotated[ItemReference, Tag("ItemReference")]
    | Annotated[OtherItem, Tag("Other")]
), Discriminator(_item_tag)]


# -- tools ----------------------------------------------------------------------------------------------

class FunctionTool(_Model):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class OtherTool(_Model):
    """Built-in and client tools (local_shell, web_search, custom, mcp, ...): dropped with a log line."""
    type: str


def _tool_tag(v: Any) -> str:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return "Function" if kind == "function" else "Other"


ToolItem = Annotated[Annotated[FunctionTool, Tag("Function")] | Annotated[OtherTool, Tag("Other")],
                     Discriminator(_tool_tag)]


class NamedFunction(_Model):
    type: Literal["function"]
    name: str


# -- text format, reasoning ---------------------------------------------------------------------------------

class TextFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Model):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Model):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


# -- the request body -----------------------------------------------------------------------------------------

class ResponsesRequest(_Model):
    model: str | None = None
    input: str | list[Item] | None = None
    instructions: str | None = None
    tools: list[ToolItem] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1, lt=INT64)
    max_tool_calls: int | None = Field(None, ge=1, lt=INT64)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    stream: bool = False
    store: bool | None = None
    background: bool | None = None
    include: list[str] | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    generate: bool | None = None            # Codex's warm-up request sends generate: false
    # llama-server's extensions, as on Chat Completions
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    top_k: int | None = Field(None, ge=0, lt=INT64)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
