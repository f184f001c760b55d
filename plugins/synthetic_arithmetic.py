"""Arithmetic problems with worked steps: the ``synthetic-arithmetic`` generator.

Each problem applies 2–3 operations (``+ - * /``; both adjustable) to numbers below 100, left to right, with
every intermediate result a non-negative integer below 1000 and every division exact, so a
tiny model can learn the steps. Problems are either bare expressions (parenthesized so the
written order of operations is the evaluation order) or short word problems. The worked
solution states one ``a op b = c`` line per operation and ends with ``Answer: <n>``.
"""

from __future__ import annotations

import random

from phi4_engine.plugins.synthetic_sample import Sample

SYMBOL = {"+": "+", "-": "-", "*": "×", "/": "÷"}
"""How each operation is written in problems and steps."""

_NAMES = ["Mia", "Leo", "Ava", "Noah", "Zoe", "Sam", "Lily", "Omar", "Ella", "Ben", "Nina", "Max"]
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards", "stamps", "eggs"]
_WORD_OPS = {
    "+": ["buys {b} more", "finds {b} more", "gets {b} more from a friend", "adds {b} more"],
    "-": ["gives away {b}", "loses {b}", "uses {b}", "sells {b}"],
    "*": ["ends up with {b} times as many", "multiplies the pile by {b}"],
    "/": ["splits them into {b} equal groups and keeps one group", "puts them into {b} equal boxes and keeps one box"],
}


def _pick_ops(rng: random.Random, start: int, count: int, max_operand: int = 99) -> list[tuple[str, int, int]]:
    """``count`` steps ``(op, operand, result)`` from ``start``, all results integers in [0, 1000)."""
    steps = []
    value = start
    for _ in range(count):
        choices = ["+", "-", "*", "/"]
        rng.shuffle(choices)
        for op in choices:
            if op == "+" and value + 1 < 1000:
                b = rng.randint(1, min(max_operand, 999 - value))
                result = value + b
            elif op == "-" and value >= 1:
                b = rng.randint(1, min(max_operand, value))
                result = value - b
            elif op == "*" and 0 < value * 2 < 1000:
                b = rng.randint(2, max(2, min(9, max_operand, 999 // value)))
                result = value * b
            elif op == "/":
                divisors = [d for d in range(2, 10) if value >= d and value % d == 0]
                if not divisors:
                    continue
                b = rng.choice(divisors)
                result = value // b
            else:
                continue
            break
        steps.append((op, b, result))
        value = result
    return steps


def _expression(start: int, steps: list[tuple[str, int, int]], symbols: dict[str, str]) -> str:
    """Written form; the left side of ``*`` and ``/`` is parenthesized, so reading order is evaluation order."""
    expr = str(start)
    prev = None
    for op, b, _ in steps:
        if op in "*/" and prev is not None:
            expr = f"({expr})"
        expr = f"{expr} {symbols[op]} {b}"
        prev = op
    return expr


def generate(rng: random.Random, operations: tuple[int, int] = (2, 3), max_operand: int = 99) -> Sample:
    """One problem with ``operations[0]..operations[1]`` steps on numbers up to ``max_operand``."""
    start = rng.randint(2, max_operand)
    steps = _pick_ops(rng, start, rng.randint(*operations), max_operand)
    answer = steps[-1][2]
    expression = _expression(start, steps, {op: op if op != "/" else "//" for op in SYMBOL})
    lines = []
    value = start
    for op, b, result in steps:
        lines.append(f"{value} {SYMBOL[op]} {b} = {result}")
        value = result
    if rng.random() < 0.5:
        question = f"Compute {_expression(start, steps, SYMBOL)}."
        work = "\n".join(lines)
    else:
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        actions = [rng.choice(_WORD_OPS[op]).format(b=b) for op, b, _ in steps]
        if len(actions) == 1:
            story = f"{name} then {actions[0]}"
        elif len(actions) == 2:
            story = f"{name} then {actions[0]} and after that {actions[1]}"
        else:
            story = f"{name} then {actions[0]}, after that {actions[1]}, and finally {actions[2]}"
        question = f"{name} has {start} {item}. {story}. How many {item} does {name} have now?"
        work = f"{name} starts with {start} {item}.\n" + "\n".join(lines)
    response = f"{work}\nAnswer: {answer}"
    text = f"Problem: {question}\nSolution:\n{response}"
    meta = {"question": question, "answer": str(answer), "expression": expression}
    return Sample(prompt=question, response=response, text=text, meta=meta)
