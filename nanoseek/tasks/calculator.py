"""The calculator tool task: arithmetic questions answered through a tool call, so a small model can learn tool use.

Each conversation offers one tool, `calculator({"expression": str})`. The user asks a built-in arithmetic problem
("What is 8+79*9-66?"); the assistant calls the calculator with the problem's expression, the tool answers with
its value, and the assistant answers with that value. The problems (and their train / val / test splits) are the
arithmetic task's, so `builtin:calculator` never trains on a held-out arithmetic problem either.
"""

from __future__ import annotations

import json

from nanoseek.tasks.problems import Problem
from nanoseek.tasks.verify import exact_value

NAME = "calculator"
TOOL = {
    "type": "function",
    "function": {
        "name": NAME,
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}


def calculate(expression: str) -> str:
    """What the calculator tool returns: the exact value of a + - * / ( ) expression (never `eval`), or an error
    text the model can read."""
    value = exact_value(expression)
    if value is None:
        return f"error: cannot evaluate {expression!r} (use numbers, + - * / and parentheses)"
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.6g}"


def calculator_chat(problem: Problem, index: int = 0) -> dict:
    """One arithmetic problem as a tool-use conversation: `{"messages": [...], "tools": [TOOL]}` (OpenAI's
    chat format, what `nanoseek sft` reads from .jsonl too)."""
    expression = problem.meta["canonical"]
    call_id = f"call_{index}"
    arguments = json.dumps({"expression": expression})
    result = calculate(expression)
    call = {"id": call_id, "type": "function", "function": {"name": NAME, "arguments": arguments}}
    messages = [
        {"role": "user", "content": problem.prompt},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": result},
        {"role": "assistant", "content": result},
    ]
    return {"messages": messages, "tools": [TOOL]}
