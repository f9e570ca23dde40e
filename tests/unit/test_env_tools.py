"""Tool calls in model text: parsing never raises, malformed calls become error turns, tools run with a
timeout and bounded output; environment specs load or fail naming the spec."""

import time

import pytest

from chatrlhf.environments import Environment, load_environment
from chatrlhf.environments.tools import (
    MAX_CALLS,
    MAX_OUTPUT_CHARS,
    Tool,
    format_tool_call,
    parse_tool_calls,
    plain_tool_prompt,
    run_tool,
)


def _echo(text):
    return text


def _slow(seconds):
    time.sleep(float(seconds))
    return "done"


def _fails(x):
    raise ValueError(f"cannot use {x}")


TOOLS = {t.name: t for t in (
    Tool("echo", "Echoes.", {"type": "object", "properties": {"text": {"type": "string"}}}, _echo),
    Tool("slow", "Sleeps.", {"type": "object", "properties": {"seconds": {"type": "number"}}}, _slow, timeout_s=0.2),
    Tool("fails", "Fails.", {"type": "object", "properties": {"x": {"type": "string"}}}, _fails),
)}


def test_a_formatted_call_parses_back():
    text = "Let me compute. " + format_tool_call("echo", {"text": "hi"})
    (call,) = parse_tool_calls(text, TOOLS)
    assert (call.name, call.arguments, call.error) == ("echo", {"text": "hi"}, None)
    assert run_tool(call, TOOLS) == ("hi", True)


def test_no_call_is_a_plain_answer():
    assert parse_tool_calls("The answer is 42.", TOOLS) == []


@pytest.mark.parametrize("body,error", [
    ("not json", "a tool call must be JSON"),
    ('["echo"]', 'needs "name"'),
    ('{"name": 3}', 'needs "name"'),
    ('{"name": "rm", "arguments": {}}', "unknown tool 'rm'; tools: echo, fails, slow"),
    ('{"name": "echo", "arguments": [1]}', '"arguments" of echo must be an object'),
    ("[" * 100000, "a tool call must be JSON"),
])
def test_malformed_calls_become_error_messages(body, error):
    (call,) = parse_tool_calls(f"<tool_call>{body}</tool_call>", TOOLS)
    assert error in call.error
    message, ok = run_tool(call, TOOLS)
    assert not ok and message.startswith("error: ") and error in message


def test_an_unclosed_call_at_the_token_limit_still_parses():
    (call,) = parse_tool_calls('<tool_call>{"name": "echo", "arguments": {"text": "x"}}', TOOLS)
    assert call.error is None


def test_wrong_arguments_timeouts_and_tool_errors_are_error_turns():
    (bad_arg,) = parse_tool_calls(format_tool_call("echo", {"nope": 1}), TOOLS)
    message, ok = run_tool(bad_arg, TOOLS)
    assert not ok and "unexpected keyword argument" in message
    started = time.time()
    (slow,) = parse_tool_calls(format_tool_call("slow", {"seconds": 5}), TOOLS)
    assert run_tool(slow, TOOLS) == ("error: slow took longer than 0.2 s", False)
    assert time.time() - started < 1.0
    (fails,) = parse_tool_calls(format_tool_call("fails", {"x": "y"}), TOOLS)
    assert run_tool(fails, TOOLS) == ("error: cannot use y", False)


def test_output_is_bounded_and_calls_are_capped():
    (call,) = parse_tool_calls(format_tool_call("echo", {"text": "z" * 5000}), TOOLS)
    message, ok = run_tool(call, TOOLS)
    assert ok and len(message) < MAX_OUTPUT_CHARS + 40 and message.endswith(f"[cut at {MAX_OUTPUT_CHARS} characters]")
    calls = parse_tool_calls(format_tool_call("echo", {"text": "a"}) * (MAX_CALLS + 3), TOOLS)
    assert len(calls) == MAX_CALLS + 1 and "at most" in calls[-1].error


def test_plain_prompt_names_each_tool_and_the_format():
    text = plain_tool_prompt(list(TOOLS.values()))
    assert "- echo: Echoes." in text and "<tool_call>" in text


def test_shipped_environments_load():
    for name in ("dialog",):
        env = load_environment(name)
        assert isinstance(env, Environment)


def test_env_with_bad_limits_is_refused(tmp_path):
    f = tmp_path / "e.py"
    f.write_text("from chatrlhf.environments import Environment\nclass E(Environment):\n    max_turns = 0\n")
    with pytest.raises(ValueError, match=r"--env '.*e.py:E': E.max_turns must be a positive integer, got 0"):
        load_environment(f"{f}:E")
    f.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ImportError, match="running .* failed with RuntimeError: boom"):
        load_environment(f"{f}:E")
