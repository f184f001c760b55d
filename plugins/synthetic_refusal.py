"""Bogus questions and their answerable twins: the ``synthetic-refusal`` generator.

The refusal stage ([P4] §4.4, App. A.1) needs questions a model should decline next to ones it
should answer. Each document starts from one ``synthetic-arithmetic`` problem (the answerable
twin) and, with probability ``share_bogus``, turns it into a question that cannot be answered:

* ``missing-quantity`` — a word problem that never says how many there were to begin with
  ("Mia has some apples. …");
* ``division-by-zero`` — an expression that divides by zero;
* ``nonexistent`` — an expression that needs a fact about something that does not exist
  ("… + the number of moons of the planet Zarvos").

A bogus question's answer is a refusal that starts with :data:`REFUSAL_PREFIX` and says why;
``meta`` carries ``bogus`` (bool), ``bogus_kind``, ``answer`` (None when bogus) and the twin's
question, so evaluations can score correct / incorrect / not-attempted as SimpleQA does.
"""

from __future__ import annotations

import random

from phi4_engine.plugins import synthetic_arithmetic
from phi4_engine.plugins.synthetic_sample import Sample

REFUSAL_PREFIX = "I cannot answer"
"""Every refusal starts with these words (what evaluations look for)."""

BOGUS_KINDS = ("missing-quantity", "division-by-zero", "nonexistent")
_SYLLABLES = ["zar", "vo", "qui", "bel", "tron", "mex", "dra", "lun", "pix", "ora", "keth", "syl"]
_FACTS = ["the number of moons of the planet {x}", "the age of King {x} of Florin", "the height in meters of Mount {x}"]


def _made_up_name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def refusal(reason: str) -> str:
    return f"{REFUSAL_PREFIX} this: {reason}."


def generate(rng: random.Random, share_bogus: float = 0.5, operations: tuple[int, int] = (1, 1),
             max_operand: int = 20) -> Sample:
    twin = synthetic_arithmetic.generate(rng, operations=operations, max_operand=max_operand)
    meta = {**twin.meta, "bogus": False, "bogus_kind": None}
    if rng.random() >= share_bogus:
        return twin._replace(meta=meta)
    kind = rng.choice(BOGUS_KINDS)
    start = twin.meta["expression"].split(" ")[0].strip("()")
    if kind == "missing-quantity":
        name = rng.choice(synthetic_arithmetic._NAMES)
        item = rng.choice(synthetic_arithmetic._ITEMS)
        action = rng.choice(synthetic_arithmetic._WORD_OPS["+"] + synthetic_arithmetic._WORD_OPS["-"])
        question = f"{name} has some {item}. {name} then {action.format(b=rng.randint(1, max_operand))}. How many {item} does {name} have now?"
        answer = refusal(f"the problem never says how many {item} {name} has at the start")
    elif kind == "division-by-zero":
        question = f"Compute {start} ÷ 0."
        answer = refusal("dividing by zero is undefined")
    else:
        fact = rng.choice(_FACTS).format(x=_made_up_name(rng))
        question = f"Compute {start} + {fact}."
        answer = refusal(f"{fact} is not something that exists, so there is no true value to add")
    meta = {"question": question, "answer": None, "bogus": True, "bogus_kind": kind, "twin": twin.meta["question"]}
    return Sample(prompt=question, response=answer, text=f"Problem: {question}\nSolution:\n{answer}", meta=meta)
