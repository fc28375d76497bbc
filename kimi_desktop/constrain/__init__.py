"""Constrained decoding for tool_choice and response_format, on K2's token format.

Two layers:

- `JsonPrefix` (json_prefix.py): an incremental JSON prefix checker over *bytes*: whether bytes keep
  the text a prefix of one valid JSON value (optionally of a schema's top-level type and required
  keys), whether it is complete, and the shortest bytes that complete it (`closing()`).

- `Constrainer` (program.py): the token-level program for one response, a generator that yields a
  `Step` (what the next token may be) and receives the token chosen:
    tool_choice "none"              -> the tool-call tokens are banned, everything else free;
    "required" / a named function   -> [<think> reasoning </think>] then only
        <|tool_calls_section_begin|> (<|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>
        {JSON object} <|tool_call_end|>)+ <|tool_calls_section_end|> <|im_end|>;
        named: exactly one call to NAME; required: NAME among the tools, more calls while the budget allows;
    response_format json_object / json_schema -> [reasoning] then one JSON value, then <|im_end|>;
        with tools and tool_choice "auto" the answer may instead be a tool-call section.
  Reasoning (thinking checkpoints, which have <think>/</think>) is allowed first, capped by
  max_reasoning_tokens and by the budget the rest needs; </think> is forced when it runs out.
  In every constrained stretch the budget (max_tokens) is tracked so that structures are closed with
  forced tokens before it runs out, where the budget allows at all.

`StepFilter` turns a Step into the sampler's inputs: a mask over the vocabulary and a lazy per-token
check over the decoded bytes of ordinary tokens (see runtime/sampling.py: candidates are tried in
sampling order, so the drawn token is an exact sample from the distribution restricted to tokens the
check accepts).
"""

from .json_prefix import JsonPrefix, default_value
from .program import TOOL_TOKENS, Constrainer, ConstraintError, Step, StepFilter, ToolSpec

__all__ = ["JsonPrefix", "default_value", "TOOL_TOKENS", "Constrainer", "ConstraintError", "Step", "StepFilter",
           "ToolSpec"]
