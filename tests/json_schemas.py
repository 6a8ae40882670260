"""A seeded generator of random JSON schemas in dgemma's supported subset (shared by the JSON tests)."""

from __future__ import annotations

import random

WORDS = ["name", "id", "kind", "items", "value", "tags", "x", "deep key", "ünï", "a\"b", "n0"]


def scalar(rng: random.Random) -> dict:
    pick = rng.randrange(11)
    if pick == 0:
        s = {"type": "string"}
        if rng.random() < 0.4:
            s["maxLength"] = rng.randrange(0, 8)
        if rng.random() < 0.3:
            s["minLength"] = rng.randrange(0, 4)
            s["maxLength"] = max(s.get("maxLength", 0), s["minLength"])
        return s
    if pick in (1, 2):
        s = {"type": rng.choice(["integer", "number"])}
        lo = rng.choice([None, -50, 0, 3, 1.5, -0.25])
        if lo is not None:
            s[rng.choice(["minimum", "exclusiveMinimum"])] = lo
        if rng.random() < 0.5:
            s[rng.choice(["maximum", "exclusiveMaximum"])] = (lo if lo is not None else 0) + rng.choice([5, 100, 7.5])
        return s
    if pick == 3:
        return {"type": "boolean"}
    if pick == 4:
        return {"type": "null"}
    if pick == 5:
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True, "a b", "é"], rng.randrange(1, 5))}
    if pick == 6:
        return {"const": rng.choice(["fixed", 42, None, [1, 2], {"k": "v"}])}
    if pick == 7:
        return {"type": [rng.choice(["string", "integer", "number", "boolean"]), "null"]}
    if pick == 8:
        return {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "integer", "minimum": 0},
                          {"enum": ["x", False]}]}
    if pick == 9:
        return {"type": "string", "description": "annotations are ignored", "format": "email"}
    return {}  # any value


def schema(rng: random.Random, depth: int = 0) -> dict:
    r = rng.random()
    if depth >= 3 or r < 0.35:
        return scalar(rng)
    if r < 0.65:
        keys = rng.sample(WORDS, rng.randrange(0, 5))
        s = {"type": "object", "properties": {k: schema(rng, depth + 1) for k in keys}}
        s["required"] = [k for k in keys if rng.random() < 0.6]
        if rng.random() < 0.3:
            s["additionalProperties"] = False
        return s
    if r < 0.85:
        s = {"type": "array", "items": schema(rng, depth + 1)}
        if rng.random() < 0.5:
            s["minItems"] = rng.randrange(0, 3)
        if rng.random() < 0.5:
            s["maxItems"] = s.get("minItems", 0) + rng.randrange(0, 3)
        return s
    if r < 0.93:
        return {"type": "object", "additionalProperties": scalar(rng)}
    return {"type": ["object", "null"], "properties": {"inner": scalar(rng)}, "required": ["inner"]}


def random_schema(seed: int) -> dict:
    rng = random.Random(seed)
    root = schema(rng)
    if rng.random() < 0.3:  # through a local reference
        return {"$defs": {"Root": root}, "$ref": "#/$defs/Root"}
    return root
