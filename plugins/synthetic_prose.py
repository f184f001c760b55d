"""Simple English stories from a modest vocabulary: the ``synthetic-prose`` generator.

TinyStories-like: a character, a place, a small problem, a helper, an ending, each sentence
drawn from a few templates, so a tiny model can learn grammar and coherence (the character's
name and pronoun stay consistent through the story).
"""

from __future__ import annotations

import random

from phi4_engine.plugins.synthetic_sample import Sample

_CHARACTERS = [
    ("Tom", "he", "his"), ("Lily", "she", "her"), ("Ben", "he", "his"), ("Sue", "she", "her"),
    ("Max", "he", "his"), ("Anna", "she", "her"), ("Sam", "he", "his"), ("Mia", "she", "her"),
]
_ANIMALS = ["cat", "dog", "rabbit", "bird", "fox", "bear", "duck", "frog", "mouse", "pig"]
_ADJECTIVES = ["little", "happy", "small", "brave", "kind", "curious", "shy", "funny", "sleepy", "big"]
_PLACES = ["a small house", "a big forest", "a quiet town", "a green park", "a farm", "a house by the sea"]
_OBJECTS = ["ball", "kite", "box", "hat", "book", "key", "toy car", "red balloon", "shiny stone", "cup"]
_FEELINGS = ["happy", "sad", "scared", "excited", "tired", "surprised", "proud"]
_HELPERS = ["mom", "dad", "friend", "grandma", "teacher", "neighbor"]
_LOSS_PLACES = ["under the bed", "in the tall grass", "behind a tree", "in the river", "on the roof", "in a hole"]

_OPENINGS = [
    "Once upon a time, there was a {adj} {animal} named {name}.",
    "One day, a {adj} {animal} called {name} woke up early.",
    "{name} was a {adj} {animal}.",
]
_HOMES = [
    "{Pro} lived in {place}.",
    "{Pro} lived in {place} with {pos} {helper}.",
    "{Pos} home was in {place}.",
]
_FINDS = [
    "{name} had a {obj} that {pro} loved very much.",
    "One morning, {name} found a {obj}.",
    "{name} liked to play with {pos} {obj} every day.",
]
_PROBLEMS = [
    "But one day, the {obj} was lost {loss}. {name} felt {feeling}.",
    "Then the wind blew the {obj} away, and it landed {loss}. {name} was {feeling}.",
    "Suddenly, {name} could not find the {obj}. {Pro} looked everywhere and felt {feeling}.",
]
_HELPS = [
    "{Pos} {helper} came and said, \"Do not worry, {name}. We will find it together.\"",
    "A {adj2} {animal2} saw {name} and asked, \"Why are you {feeling}?\" Then the {animal2} helped {obj_pro}.",
    "{name} asked {pos} {helper} for help, and they looked {loss} together.",
]
_ENDINGS = [
    "At last they found the {obj}. {name} smiled and said, \"Thank you!\"",
    "Soon the {obj} was back. {name} was {happy} again, and {pro} learned to be careful.",
    "They found the {obj} and played with it until the sun went down.",
]
_MORALS = ["", "", " The end.", " {name} learned that friends help each other."]


def _story(rng: random.Random) -> tuple[str, str]:
    name, pro, pos = rng.choice(_CHARACTERS)
    animal, animal2 = rng.sample(_ANIMALS, 2)
    adj, adj2 = rng.sample(_ADJECTIVES, 2)
    slots = {
        "name": name, "pro": pro, "pos": pos, "Pro": pro.capitalize(), "Pos": pos.capitalize(),
        "obj_pro": "him" if pro == "he" else "her", "animal": animal, "animal2": animal2,
        "adj": adj, "adj2": adj2, "place": rng.choice(_PLACES), "obj": rng.choice(_OBJECTS),
        "feeling": rng.choice([f for f in _FEELINGS if f not in ("happy", "excited", "proud")]),
        "happy": rng.choice(["happy", "proud", "excited"]), "helper": rng.choice(_HELPERS),
        "loss": rng.choice(_LOSS_PLACES),
    }
    parts = [_OPENINGS, _HOMES, _FINDS, _PROBLEMS, _HELPS, _ENDINGS]
    story = " ".join(rng.choice(options).format(**slots) for options in parts)
    story += rng.choice(_MORALS).format(**slots)
    prompt = f"Write a short story about a {adj} {animal} named {name} and a {slots['obj']}."
    return prompt, story


def generate(rng: random.Random) -> Sample:
    prompt, story = _story(rng)
    return Sample(prompt=prompt, response=story, text=story, meta={"prompt": prompt})
