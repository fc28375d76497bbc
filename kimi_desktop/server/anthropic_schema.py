"""Pydantic models of the Anthropic Messages request bodies (/v1/messages and its count_tokens).

They check types and ranges, so a schema violation is a 400 naming the field, and they make the
OpenAPI schema describe the bodies. What the schema accepts but the route refuses or drops:
image / document blocks (K2 reads text only: 400), server tools (a `type` other than "custom":
dropped with a log line), redacted_thinking blocks (opaque: dropped). Unknown fields (cache_control,
citations, service_tier, ...) are accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

# the same lenient base (unknown fields allowed, no inf / nan) and the same {type: text, text} block
from .openai_schema import INT64, _Model
from .openai_schema import TextPart as TextBlock


# -- content blocks ---------------------------------------------------------------------------------

class MediaBlock(_Model):
    """Images, documents and the like: accepted by the schema, refused by the route."""
    type: Literal["image", "document", "search_result", "container_upload"]


ResultPart = Annotated[TextBlock | MediaBlock, Field(discriminator="type")]


class ToolUseBlock(_Model):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Model):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ResultPart] | None = None
    is_error: bool | None = None


class ThinkingBlock(_Model):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Model):
    type: Literal["redacted_thinking"]
    data: str | None = None


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock | MediaBlock,
                  Field(discriminator="type")]


class Message(_Model):
    role: Literal["user", "assistant", "system"]      # Claude Code sends system turns inside messages
    content: str | list[Block]


# -- tools ------------------------------------------------------------------------------------------

class Tool(_Model):
    """A client tool (type absent or "custom") needs input_schema; server tools have their own fields."""
    type: str | None = None
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class _Choice(_Model):
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAuto(_Choice):
    type: Literal["auto"]


class ToolChoiceAny(_Choice):
    type: Literal["any"]


class ToolChoiceTool(_Choice):
    type: Literal["tool"]
    name: str


class ToolChoiceNone(_Model):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone,
                       Field(discriminator="type")]


# -- thinking ---------------------------------------------------------------------------------------

class ThinkingEnabled(_Model):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=0, lt=INT64)


class ThinkingDisabled(_Model):
    type: Literal["disabled"]


class ThinkingAdaptive(_Model):
    """The model decides how long to think: no cap but max_tokens."""
    type: Literal["adaptive"]


Thinking = Annotated[ThinkingEnabled | ThinkingDisabled | ThinkingAdaptive, Field(discriminator="type")]


# -- the request bodies ------------------------------------------------------------------------------

class CountTokensRequest(_Model):
    model: str | None = None                # any name is served by the loaded model
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class OutputConfig(_Model):
    effort: str | None = None               # low | medium | high | max: a reasoning budget when thinking is adaptive


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1, lt=INT64)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, lt=INT64)
    stream: bool = False
    metadata: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
