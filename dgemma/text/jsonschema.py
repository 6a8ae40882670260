"""JSON Schema (a subset) -> a normalised tree of value kinds, checked with clear errors for what is not supported.

Supported: type (one or a list), properties, required, additionalProperties, items, minItems, maxItems, enum,
const, anyOf / oneOf, minimum, maximum, exclusiveMinimum, exclusiveMaximum (numbers), minLength, maxLength,
local $ref into $defs / definitions (not recursive), and the annotations (title, description, default, examples,
format, $schema, $id, $comment, ...), which are ignored. Anything else (pattern, multipleOf, prefixItems,
uniqueItems, ...) is refused by name, never silently dropped: a document could not be valid by construction then
(uniqueItems: false, the default, constrains nothing and is taken as absent).

Node kinds (plain dicts, consumed by json_layout.py):
    {"kind": "object", "props": [(key, node), ...], "required": {key, ...}}
                                                                  declared properties in schema order (required ones
                                                                  not declared are appended); the others are optional
    {"kind": "map", "value": node, "min": a, "max": b}            free-form object: up to b entries of string keys
    {"kind": "array", "item": node, "min": a, "max": b}
    {"kind": "string", "min": a, "max": b|None}                  lengths in characters
    {"kind": "number", "integer": bool, "lo", "hi", "xlo", "xhi"} bounds (None = none); x*: exclusive
    {"kind": "options", "values": [v, ...]}                       enum, boolean
    {"kind": "fixed", "value": v}                                 const, null
    {"kind": "union", "branches": [scalar nodes]}                 the model picks the branch (scalar types only)
A union that includes a composite branch (an object or array, e.g. ["object", "null"]) takes that branch: one valid
alternative is all validity needs, and a scalar slot cannot hold a nested layout.
"""

from __future__ import annotations

import json
import math

ANNOTATIONS = {"title", "description", "default", "examples", "format", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "$defs", "definitions", "contentMediaType", "contentEncoding", "strict",
               "name"}
HANDLED = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum", "const",
           "anyOf", "oneOf", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
           "$ref"}
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
MAX_DEPTH = 12


class SchemaError(ValueError):
    """The schema is outside the supported subset or contradicts itself; the message says what and where."""


def _type_ok(value, t: str) -> bool:
    return {"object": isinstance(value, dict), "array": isinstance(value, list), "string": isinstance(value, str),
            "null": value is None, "boolean": isinstance(value, bool),
            "integer": (isinstance(value, int) or isinstance(value, float) and value.is_integer())
            and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool)}[t]


def _count(schema: dict, key: str, default: int, where: str) -> int:
    value = schema.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SchemaError(f"{where}: {key} must be a whole number >= 0, got {value!r}")
    return value


def _bound(schema: dict, key: str, where: str):
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SchemaError(f"{where}: {key} must be a finite number (draft 6+ form), got {value!r}")
    return value


class Normaliser:
    def __init__(self, root: dict):
        if not isinstance(root, dict):
            raise SchemaError(f"a JSON schema must be an object, got {type(root).__name__}")
        self.root = root

    def resolve(self, ref: str, where: str, seen: tuple[str, ...]) -> dict:
        if ref == "#":  # the whole schema, from inside itself
            raise SchemaError(f"{where}: recursive reference '#' (the whole schema) is not supported (the layout is "
                              "finite)")
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise SchemaError(f"{where}: only local references like '#/$defs/Name' are supported, got {ref!r}")
        if ref in seen:
            raise SchemaError(f"{where}: recursive reference {ref!r} is not supported (the layout is finite)")
        node = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise SchemaError(f"{where}: reference {ref!r} does not resolve")
            node = node[part]
        return node

    def node(self, schema, where: str = "$", depth: int = 0, seen: tuple[str, ...] = ()) -> dict:
        if depth > MAX_DEPTH:
            raise SchemaError(f"{where}: nesting deeper than {MAX_DEPTH} levels is not supported")
        if schema is True or schema == {}:
            schema = {"type": ["string", "number", "boolean", "null"]}  # any value: a scalar the model picks
        if not isinstance(schema, dict):
            raise SchemaError(f"{where}: a schema must be an object, got {schema!r}")
        if schema.get("uniqueItems") is False:  # the default: it constrains nothing, so there is nothing to refuse
            schema = {k: v for k, v in schema.items() if k != "uniqueItems"}
        unknown = set(schema) - HANDLED - ANNOTATIONS
        if unknown:
            raise SchemaError(f"{where}: unsupported schema keyword(s) {sorted(unknown)}; supported: "
                              f"{sorted(HANDLED)} (annotations such as description are ignored)")
        if "$ref" in schema:
            ref = schema["$ref"]
            rest = {k: v for k, v in schema.items() if k != "$ref" and k not in ANNOTATIONS}
            if rest:
                raise SchemaError(f"{where}: $ref next to other constraints {sorted(rest)} is not supported")
            return self.node(self.resolve(ref, where, seen), f"{where}->{ref}", depth + 1, seen + (ref,))
        types = schema.get("type", None)
        if isinstance(types, str):
            types = [types]
        if types is not None and (not isinstance(types, list) or not types or any(t not in TYPES for t in types)):
            raise SchemaError(f"{where}: type must be one of {list(TYPES)} or a non-empty list of them, got "
                              f"{schema.get('type')!r}")
        if "const" in schema:
            if types is not None and not any(_type_ok(schema["const"], t) for t in types):
                raise SchemaError(f"{where}: const {schema['const']!r} does not have the declared type {types}")
            return {"kind": "fixed", "value": schema["const"]}
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}: enum must be a non-empty list")
            if types is not None:
                values = [v for v in values if any(_type_ok(v, t) for t in types)]
                if not values:
                    raise SchemaError(f"{where}: no enum value has the declared type {types}")
            return {"kind": "options", "values": values} if len(values) > 1 else {"kind": "fixed", "value": values[0]}
        for word in ("anyOf", "oneOf"):
            if word in schema:
                branches = schema[word]
                if not isinstance(branches, list) or not branches:
                    raise SchemaError(f"{where}: {word} must be a non-empty list of schemas")
                base = {k: v for k, v in schema.items() if k not in (word, *ANNOTATIONS)}
                nodes = [self.node({**base, **b} if isinstance(b, dict) and base and "$ref" not in b else b,
                                   f"{where}.{word}[{i}]", depth + 1, seen) for i, b in enumerate(branches)]
                return self.union(nodes, where, exclusive=word == "oneOf")
        if types is None:  # infer from the keywords present
            if "properties" in schema or "additionalProperties" in schema or "required" in schema:
                types = ["object"]
            elif "items" in schema or "minItems" in schema or "maxItems" in schema:
                types = ["array"]
            else:
                types = ["string", "number", "boolean", "null"]
        if len(types) > 1:
            return self.union([self.node({**schema, "type": t}, where, depth, seen) for t in types], where, False)
        return self.single(schema, types[0], where, depth, seen)

    def union(self, nodes: list[dict], where: str, exclusive: bool) -> dict:
        composite = [n for n in nodes if n["kind"] in ("object", "map", "array")]
        if composite:
            if exclusive and len(composite) > 1:
                raise SchemaError(f"{where}: oneOf with several object/array branches is not supported")
            return composite[0]
        flat = []
        for n in nodes:
            flat.extend(n["branches"] if n["kind"] == "union" else [n])
        if exclusive:
            kinds = [("number" if n["kind"] == "number" else n["kind"]) for n in flat]
            if len(set(kinds)) != len(kinds):
                raise SchemaError(f"{where}: oneOf branches of the same kind could both match; use anyOf")
        return flat[0] if len(flat) == 1 else {"kind": "union", "branches": flat}

    def single(self, schema: dict, t: str, where: str, depth: int, seen) -> dict:
        if t == "null":
            return {"kind": "fixed", "value": None}
        if t == "boolean":
            return {"kind": "options", "values": [True, False]}
        if t == "string":
            lo, hi = _count(schema, "minLength", 0, where), schema.get("maxLength")
            if hi is not None and _count(schema, "maxLength", 0, where) < lo:
                raise SchemaError(f"{where}: maxLength {hi} < minLength {lo}")
            return {"kind": "string", "min": lo, "max": hi}
        if t in ("number", "integer"):
            b = {k: _bound(schema, key, where) for k, key in (("lo", "minimum"), ("hi", "maximum"),
                                                              ("xlo", "exclusiveMinimum"), ("xhi", "exclusiveMaximum"))}
            lo = max([v for v in (b["lo"], b["xlo"]) if v is not None], default=-math.inf)
            hi = min([v for v in (b["hi"], b["xhi"]) if v is not None], default=math.inf)
            empty_int = t == "integer" and math.isfinite(lo) and math.isfinite(hi) and math.floor(hi) < math.ceil(lo)
            if lo > hi or (lo == hi and (b["xlo"] == lo or b["xhi"] == hi)) or empty_int:
                raise SchemaError(f"{where}: the bounds leave no {t}")
            return {"kind": "number", "integer": t == "integer", **b}
        if t == "array":
            items = schema.get("items", True)
            if isinstance(items, list):
                raise SchemaError(f"{where}: tuple-form items (a list) is not supported; use one schema")
            lo, hi = _count(schema, "minItems", 0, where), schema.get("maxItems")
            if hi is not None and _count(schema, "maxItems", 0, where) < lo:
                raise SchemaError(f"{where}: maxItems {hi} < minItems {lo}")
            return {"kind": "array", "item": self.node(items, f"{where}[]", depth + 1, seen), "min": lo, "max": hi}
        # object
        props = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(props, dict) or not isinstance(required, list):
            raise SchemaError(f"{where}: properties must be an object and required a list")
        if not all(isinstance(k, str) for k in required):
            raise SchemaError(f"{where}: required must list property names (strings), got {required!r}")
        extra = schema.get("additionalProperties", True)
        out = [(k, self.node(v, f"{where}.{k}", depth + 1, seen)) for k, v in props.items()]
        for k in dict.fromkeys(required):  # required but not declared: present, with the additionalProperties schema
            if k not in props:
                if extra is False:
                    raise SchemaError(f"{where}: {k!r} is required but not a property and additionalProperties is "
                                      "false")
                out.append((k, self.node(extra, f"{where}.{k}", depth + 1, seen)))
        if out or extra is False:
            return {"kind": "object", "props": out, "required": frozenset(required)}
        return {"kind": "map", "value": self.node(extra, f"{where}.*", depth + 1, seen), "min": 0, "max": None}


def normalise(schema: dict) -> dict:
    """A JSON schema (dict) -> the node tree above; raises SchemaError naming the offending place."""
    return Normaliser(schema).node(schema)


def literal(value) -> str:
    """JSON text of a literal (enum/const value) as the layout writes it."""
    return json.dumps(value, ensure_ascii=False)
