"""Small Python tasks with unit tests: the ``synthetic-code`` generator.

A task is a function with a docstring (the ``prompt``, HumanEval-style), a short body (the
``solution`` is prompt + body) and three ``assert`` lines (the ``tests``). Expected values come
from an independent reference implementation, never from running the solution, so the unit
tests of this module check that solution and tests agree.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from phi4_engine.plugins.synthetic_sample import Sample

_WORDS = ["red", "cat", "sun", "tree", "blue", "dog", "book", "rain", "fish", "star", "moon", "cake", "ship", "bird"]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# A family returns (name, params, docstring, body lines, reference, list of argument tuples).
Family = tuple[str, str, str, list[str], Callable[..., Any], list[tuple[Any, ...]]]


def _ints(rng: random.Random, n: int | None = None, lo: int = -20, hi: int = 50) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n if n is not None else rng.randint(0, 6))]


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 5)))


def _add(rng: random.Random) -> Family:
    k = rng.randint(1, 9)
    return (f"add_{_NUMBER_WORDS[k]}", "x", f"Return x plus {k}.", [f"return x + {k}"],
            lambda x: x + k, [(rng.randint(-50, 50),) for _ in range(3)])


def _scale(rng: random.Random) -> Family:
    k = rng.randint(2, 9)
    return (f"scale_by_{k}", "xs", f"Return a new list with every element of xs multiplied by {k}.",
            [f"return [x * {k} for x in xs]"], lambda xs: [x * k for x in xs], [(_ints(rng),) for _ in range(3)])


def _sum_above(rng: random.Random) -> Family:
    t = rng.randint(0, 20)
    body = ["total = 0", "for x in xs:", f"    if x > {t}:", "        total += x", "return total"]
    return (f"sum_above_{t}", "xs", f"Return the sum of the elements of xs that are greater than {t}.", body,
            lambda xs: sum(x for x in xs if x > t), [(_ints(rng),) for _ in range(3)])


def _count_char(rng: random.Random) -> Family:
    c = rng.choice("aeioust")
    body = ["count = 0", "for ch in s:", f"    if ch == {c!r}:", "        count += 1", "return count"]
    return (f"count_{c}", "s", f"Return how many times the letter {c!r} appears in s.", body,
            lambda s: s.count(c), [(_sentence(rng),) for _ in range(3)])


def _reverse_words(rng: random.Random) -> Family:
    return ("reverse_words", "s", "Return s with the order of its words reversed, separated by single spaces.",
            ['return " ".join(reversed(s.split()))'], lambda s: " ".join(s.split()[::-1]),
            [(_sentence(rng),) for _ in range(3)])


def _divisible(rng: random.Random) -> Family:
    k = rng.randint(2, 9)
    return (f"divisible_by_{k}", "n", f"Return True if n is divisible by {k}, else False.",
            [f"return n % {k} == 0"], lambda n: n % k == 0, [(rng.randint(0, 99),) for _ in range(3)])


def _clamp(rng: random.Random) -> Family:
    lo = rng.randint(-10, 10)
    hi = lo + rng.randint(1, 20)
    body = [f"if x < {lo}:", f"    return {lo}", f"if x > {hi}:", f"    return {hi}", "return x"]
    return ("clamp", "x", f"Return x limited to the range [{lo}, {hi}].", body,
            lambda x: max(lo, min(hi, x)), [(rng.randint(lo - 15, hi + 15),) for _ in range(3)])


def _keep_parity(rng: random.Random) -> Family:
    even = rng.random() < 0.5
    word, rem = ("even", 0) if even else ("odd", 1)
    return (f"keep_{word}", "xs", f"Return the {word} numbers of xs, in order.",
            [f"return [x for x in xs if x % 2 == {rem}]"], lambda xs: [x for x in xs if abs(x) % 2 == rem],
            [(_ints(rng),) for _ in range(3)])


def _fizz(rng: random.Random) -> Family:
    a, b = rng.sample([2, 3, 5, 7], 2)
    w1, w2 = rng.sample(["Fizz", "Buzz", "Bang", "Pop", "Zap"], 2)
    doc = f"Return {w1 + w2!r} if n is divisible by {a} and {b}, {w1!r} if only by {a}, {w2!r} if only by {b}, else str(n)."
    body = [f"if n % {a * b} == 0:", f"    return {w1 + w2!r}", f"if n % {a} == 0:", f"    return {w1!r}",
            f"if n % {b} == 0:", f"    return {w2!r}", "return str(n)"]

    def ref(n: int) -> str:
        return (w1 if n % a == 0 else "") + (w2 if n % b == 0 else "") or str(n)

    return ("fizz", "n", doc, body, ref, [(rng.randint(1, 60),) for _ in range(3)])


def _extreme(rng: random.Random) -> Family:
    largest = rng.random() < 0.5
    word, cmp = ("largest", ">") if largest else ("smallest", "<")
    body = ["best = xs[0]", "for x in xs[1:]:", f"    if x {cmp} best:", "        best = x", "return best"]
    return (f"{word}_element", "xs", f"Return the {word} element of the non-empty list xs.", body,
            max if largest else min, [(_ints(rng, rng.randint(1, 6)),) for _ in range(3)])


def _repeat(rng: random.Random) -> Family:
    n = rng.randint(2, 4)
    sep = rng.choice(["-", ", ", " ", "+"])
    return (f"repeat_{_NUMBER_WORDS[n]}", "s", f"Return s repeated {n} times, joined by {sep!r}.",
            [f"return {sep!r}.join([s] * {n})"], lambda s: sep.join(s for _ in range(n)),
            [(rng.choice(_WORDS),) for _ in range(3)])


def _sum_range(rng: random.Random) -> Family:
    a = rng.randint(0, 5)
    body = ["total = 0", f"for i in range({a}, n + 1):", "    total += i", "return total"]
    return (f"sum_from_{a}", "n", f"Return the sum of the integers from {a} to n inclusive (0 if n < {a}).", body,
            lambda n: (n - a + 1) * (a + n) // 2 if n >= a else 0, [(rng.randint(a - 2, 30),) for _ in range(3)])


def _acronym(rng: random.Random) -> Family:
    return ("acronym", "s", "Return the first letter of each word of s, upper-cased and joined together.",
            ['return "".join(word[0].upper() for word in s.split())'],
            lambda s: "".join(w[:1] for w in s.split()).upper(), [(_sentence(rng),) for _ in range(3)])


FAMILIES: list[Callable[[random.Random], Family]] = [
    _add, _scale, _sum_above, _count_char, _reverse_words, _divisible, _clamp, _keep_parity,
    _fizz, _extreme, _repeat, _sum_range, _acronym,
]


def generate(rng: random.Random) -> Sample:
    name, params, doc, body, ref, inputs = rng.choice(FAMILIES)(rng)
    prompt = f'def {name}({params}):\n    """{doc}"""\n'
    solution = prompt + "".join(f"    {line}\n" for line in body)
    tests = "".join(f"assert {name}({', '.join(map(repr, args))}) == {ref(*args)!r}\n" for args in inputs)
    request = (f"Write a Python function `{name}({params})`. {doc}\n"
               f"Your code should pass these tests:\n\n{tests}")
    response = f"```python\n{solution}```"
    text = f"{solution}\n\n{tests}"
    return Sample(prompt=request, response=response, text=text,
                  meta={"prompt": prompt, "solution": solution, "tests": tests})
