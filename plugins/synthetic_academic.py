""""Academic" paragraphs: the ``synthetic-academic`` generator.

A paragraph introduces a topic with a citation, gives a definition, states a theorem-like
result (or an empirical finding), sketches why, and closes with a remark citing related work.
The vocabulary is small and the templates agree with each other (the defined term is the one
the theorem uses), so the text is learnable while looking like papers and textbooks.
"""

from __future__ import annotations

import random

from phi4_engine.plugins.synthetic_sample import Sample

_AUTHORS = ["Smith", "Chen", "Garcia", "Novak", "Okafor", "Tanaka", "Müller", "Rossi", "Kumar", "Larsen", "Haddad", "Silva"]
_OBJECTS = [("graph", "graphs", "vertex", "vertices"), ("group", "groups", "element", "elements"),
            ("sequence", "sequences", "term", "terms"), ("matrix", "matrices", "entry", "entries"),
            ("set", "sets", "member", "members"), ("tree", "trees", "node", "nodes"),
            ("function", "functions", "value", "values"), ("lattice", "lattices", "point", "points")]
_PROPERTIES = ["balanced", "regular", "stable", "bounded", "symmetric", "compact", "monotone", "sparse", "connected"]
_CONDITIONS = ["is bounded by a fixed constant", "has the same number of neighbours", "appears at most twice",
               "is greater than zero", "can be reached in finitely many steps", "is equal to its own inverse"]
_CONCLUSIONS = ["has a unique decomposition", "admits a finite description", "is determined by its {part_pl}",
                "contains a {prop2} part", "has at most {k} {part_pl} of each kind"]
_FIELDS = ["learning", "memory", "sleep", "reading", "language learning", "problem solving"]
_GROUPS = ["students", "adults", "children", "volunteers", "participants"]
_EFFECTS = ["improved recall", "faster responses", "fewer errors", "higher test scores", "better attention"]
_CAUSES = ["short daily practice", "regular sleep", "spaced repetition", "reading aloud", "working in pairs"]


def _cite(rng: random.Random) -> str:
    year = rng.randint(1960, 2023)
    style = rng.randint(0, 2)
    if style == 0:
        return f"({rng.choice(_AUTHORS)}, {year})"
    if style == 1:
        a, b = rng.sample(_AUTHORS, 2)
        return f"({a} and {b}, {year})"
    return f"[{rng.randint(1, 40)}]"


def _mathematical(rng: random.Random) -> tuple[str, str]:
    noun, nouns, part, part_pl = rng.choice(_OBJECTS)
    prop, prop2 = rng.sample(_PROPERTIES, 2)
    n = rng.randint(1, 9)
    letter = rng.choice("GHXYMST")
    slots = {"part_pl": part_pl, "prop2": prop2, "k": rng.randint(2, 5)}
    conclusion = rng.choice(_CONCLUSIONS).format(**slots)
    kind = rng.choice(["Theorem", "Lemma", "Proposition"])
    author = rng.choice(_AUTHORS)
    sentences = [
        f"The study of {prop} {nouns} goes back to the work of {author} ({rng.randint(1950, 2015)}).",
        f"Definition {n}.1. A {noun} {letter} is called {prop} if every {part} of {letter} {rng.choice(_CONDITIONS)}.",
        f"{kind} {n}.2. Every finite {prop} {noun} {conclusion}.",
        rng.choice([
            f"Proof sketch. We argue by induction on the number of {part_pl} of {letter}; "
            f"removing one {part} keeps {letter} {prop}, and the claim follows.",
            f"Proof sketch. Suppose {letter} is a counterexample with the fewest {part_pl}. "
            f"Then some {part} contradicts Definition {n}.1, which is impossible.",
        ]),
        rng.choice([
            f"The converse fails in general: not every {noun} that {conclusion} is {prop} {_cite(rng)}.",
            f"Similar results hold for {prop2} {nouns} {_cite(rng)}.",
            f"This result was later extended to infinite {nouns} {_cite(rng)}.",
        ]),
    ]
    return f"Explain what a {prop} {noun} is and state a basic result about it.", " ".join(sentences)


def _empirical(rng: random.Random) -> tuple[str, str]:
    field, group, effect, cause = (rng.choice(x) for x in (_FIELDS, _GROUPS, _EFFECTS, _CAUSES))
    n = rng.randint(2, 40) * 10
    weeks = rng.randint(2, 12)
    a = rng.choice(_AUTHORS)
    sentences = [
        f"Research on {field} has long asked whether {cause} helps {group} {_cite(rng)}.",
        f"In a study of {n} {group}, {a} et al. ({rng.randint(1990, 2023)}) found that {cause} "
        f"over {weeks} weeks led to {effect}.",
        f"The effect was small but consistent across groups (p < 0.0{rng.randint(1, 5)}).",
        rng.choice([
            f"However, later work suggests that the effect depends on prior experience {_cite(rng)}.",
            f"These findings agree with earlier reports on {field} {_cite(rng)}.",
            "Further studies with larger samples are needed to confirm this result.",
        ]),
    ]
    return f"Summarize what is known about {cause} and {field}.", " ".join(sentences)


def generate(rng: random.Random) -> Sample:
    prompt, paragraph = (_mathematical if rng.random() < 0.7 else _empirical)(rng)
    return Sample(prompt=prompt, response=paragraph, text=paragraph, meta={"prompt": prompt})
