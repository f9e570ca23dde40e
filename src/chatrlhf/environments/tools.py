"""Tool calls in model text: the plain-text format, its parser, and running a tool safely.

The format is the Hermes / Qwen one, which chat templates with tool support also render:

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "23 * 47"}}
    </tool_call>

A reply may hold several calls; each becomes one ``{"role": "tool", "content": ...}`` message in the
environment's answer, in order. A call that is not valid JSON, names no known tool or has wrong arguments is
not run: it gets an error message in the same place (``ToolCall.error``), so the policy sees what was wrong
and the episode goes on. Nothing in a reply is ever passed to ``eval`` or ``exec``: a tool is a Python
function of its parsed JSON arguments.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
"""A call runs from ``<tool_call>`` to ``</tool_call>`` (or the end of a reply cut at the token limit)."""
MAX_CALLS = 4
"""Calls run per reply; later ones get an error message."""
MAX_OUTPUT_CHARS = 400
"""A tool's output is cut to this many characters (with a note), so a tool cannot flood the context."""


@dataclass
class Tool:
    """A function the policy may call: ``fn(**arguments) -> str``; a ``ValueError`` it raises is the message
    the policy sees. ``parameters`` is the JSON schema of the arguments (transformers' ``tools=`` form)."""

    name: str
    description: str
    parameters: dict
    fn: Callable[..., str]
    timeout_s: float = 2.0

    def schema(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass
class ToolCall:
    name: str | None
    arguments: dict = field(default_factory=dict)
    error: str | None = None  # why the call cannot run (bad JSON, unknown tool, ...)


def format_tool_call(name: str, arguments: dict) -> str:
    """The text of one call, as a demonstration writes it."""
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def parse_tool_calls(reply: str, tools: dict[str, Tool]) -> list[ToolCall]:
    """The calls in ``reply`` (empty: the reply is a plain answer). Never raises: a malformed call comes back
    with ``error`` set."""
    calls = []
    for i, match in enumerate(TOOL_CALL.finditer(reply)):
        if i == MAX_CALLS:
            calls.append(ToolCall(None, error=f"at most {MAX_CALLS} tool calls per reply"))
            break
        calls.append(_parse_one(match.group(1).strip(), tools))
    return calls


def _parse_one(body: str, tools: dict[str, Tool]) -> ToolCall:
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):
        return ToolCall(None, error='a tool call must be JSON: {"name": ..., "arguments": {...}}')
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return ToolCall(None, error='a tool call needs "name" (a string) and "arguments" (an object)')
    name, arguments = call["name"], call.get("arguments", {})
    if name not in tools:
        return ToolCall(name, error=f"unknown tool {name!r}; tools: {', '.join(sorted(tools))}")
    if not isinstance(arguments, dict):
        return ToolCall(name, error=f'"arguments" of {name} must be an object')
    return ToolCall(name, arguments)


def run_tool(call: ToolCall, tools: dict[str, Tool]) -> tuple[str, bool]:
    """(the message the policy sees, whether the call succeeded). The tool runs in a daemon thread with the
    tool's timeout; its output is cut to ``MAX_OUTPUT_CHARS``."""
    if call.error is not None:
        return f"error: {call.error}", False
    tool = tools[call.name]
    result: dict = {}

    def target() -> None:
        try:
            result["out"] = str(tool.fn(**call.arguments))
        except (ValueError, TypeError, ArithmeticError) as err:  # a bad argument, not a crash of the episode
            result["err"] = str(err) or type(err).__name__

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(tool.timeout_s)
    if worker.is_alive():
        return f"error: {tool.name} took longer than {tool.timeout_s:g} s", False
    if "err" in result:
        return f"error: {result['err']}", False
    out = result["out"]
    if len(out) > MAX_OUTPUT_CHARS:
        out = out[:MAX_OUTPUT_CHARS] + f" ... [cut at {MAX_OUTPUT_CHARS} characters]"
    return out, True


def plain_tool_prompt(tools: list[Tool]) -> str:
    """The system message describing ``tools`` and the call format, for chat templates without tool support."""
    lines = ["You can use these tools:"]
    lines += [f"- {t.name}: {t.description} Arguments: {json.dumps(t.parameters['properties'])}" for t in tools]
    lines.append("To call a tool, write <tool_call>{\"name\": NAME, \"arguments\": {...}}</tool_call> and stop; "
                 "its result comes back in the next message. When you know the answer, write it without a tool call.")
    return "\n".join(lines)
