"""Structured outputs on the endpoint: OpenAI's response_format (json_object, json_schema with strict), vLLM's
structured_outputs object and its older guided_json / guided_regex / guided_choice / guided_grammar fields, all
mapped to the engine's StructuredOutputsParams (llguidance keeps the reply to them token by token).

A request names its constraint in one of these places only. For a reasoning model the constraint applies to the
answer: the grammar lets the think block the template asked for come first (reasoning.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.server.fields import bad, obj, short
from app.server.reasoning import Think, ThinkState, lark_reasoning
from engine.structured_output import StructuredOutputsParams

_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
# structured_outputs' keys: the kinds, and the options applied here.
_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern", "disable_fallback")


@dataclass(frozen=True)
class Constraint:
    params: StructuredOutputsParams
    param: str  # the request field it came from: what a grammar the engine cannot compile is blamed on


# Keys whose value is a schema (or a list of them), and keys whose value maps names to schemas.
_SUBSCHEMA = ("items", "prefixItems", "additionalProperties", "anyOf", "oneOf", "allOf", "not", "if", "then", "else")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")


def closed_objects(schema: Any) -> Any:
    """The schema with additionalProperties: false on every object schema that does not say (OpenAI's strict
    mode, vLLM's disable_additional_properties)."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = closed_objects(out[key])
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(s) for name, s in out[key].items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _schema(value: Any, param: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise bad(param, f"{param}: the JSON schema is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise bad(param, f"{param} must be a JSON schema object, got {short(value)}")
    return value


def _whitespace(schema: dict, pattern: str | None) -> dict:
    if pattern is None:
        return schema
    return {**schema, "x-guidance": {**schema.get("x-guidance", {}), "whitespace_pattern": pattern}}


def _params(param: str, **fields) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields)
    except ValueError as e:
        raise bad(param, f"{param}: {e}") from None


def _response_format(fmt: Any) -> StructuredOutputsParams | None:
    kind = obj(fmt, "response_format").get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _params("response_format", json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise bad("response_format", "response_format json_schema needs json_schema.schema, a JSON schema object")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad(
                "response_format", f"response_format json_schema.strict must be true or false, got {short(strict)}"
            )
        schema = closed_objects(spec["schema"]) if strict else spec["schema"]
        return _params("response_format", json=schema)
    raise bad("response_format", f"response_format type must be text, json_object or json_schema, got {short(kind)}")


def _structured_outputs(spec: Any) -> StructuredOutputsParams:
    spec = obj(spec, "structured_outputs")
    unknown = [k for k in spec if k not in _KINDS + _OPTIONS and spec[k] is not None]
    if unknown:
        raise bad(
            "structured_outputs",
            f"structured_outputs.{unknown[0]} is not supported (supported: {', '.join(_KINDS + _OPTIONS)})",
        )
    fields = {k: spec[k] for k in _KINDS if spec.get(k) not in (None, False)}
    for flag in ("disable_any_whitespace", "disable_additional_properties", "disable_fallback"):
        if spec.get(flag) is not None and not isinstance(spec[flag], bool):
            raise bad("structured_outputs", f"structured_outputs.{flag} must be true or false")
    pattern = spec.get("whitespace_pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise bad("structured_outputs", "structured_outputs.whitespace_pattern must be a regular expression string")
    is_json = len(fields) == 1 and ("json" in fields or "json_object" in fields)
    if not is_json and (pattern is not None or spec.get("disable_additional_properties")):
        raise bad("structured_outputs", "whitespace_pattern and disable_additional_properties apply to JSON only")
    if is_json:
        schema = _schema(fields.pop("json"), "structured_outputs") if "json" in fields else {"type": "object"}
        fields.pop("json_object", None)
        if spec.get("disable_additional_properties"):
            schema = closed_objects(schema)
        fields["json"] = _whitespace(schema, pattern)
    return _params(
        "structured_outputs", **fields, disable_any_whitespace=bool(spec.get("disable_any_whitespace", False))
    )


def _guided(body: dict, name: str) -> StructuredOutputsParams:
    value = body[name]
    if name == "guided_json":
        pattern = body.get("guided_whitespace_pattern")
        if pattern is not None and not isinstance(pattern, str):
            raise bad("guided_whitespace_pattern", "guided_whitespace_pattern must be a regular expression string")
        return _params(name, json=_whitespace(_schema(value, name), pattern))
    if name == "guided_choice":
        return _params(name, choice=value if isinstance(value, list) else None)
    if not isinstance(value, str):
        raise bad(name, f"{name} must be a string, got {short(value)}")
    return _params(name, **{name.removeprefix("guided_"): value})


def read_constraint(body: dict) -> Constraint | None:
    """The one structured-output constraint a request sets, or None. Two of them is a 400 naming the second."""
    found: list[Constraint] = []
    if body.get("response_format") is not None:
        params = _response_format(body["response_format"])
        if params is not None:
            found.append(Constraint(params, "response_format"))
    if body.get("structured_outputs") is not None:
        found.append(Constraint(_structured_outputs(body["structured_outputs"]), "structured_outputs"))
    found += [Constraint(_guided(body, name), name) for name in _GUIDED if body.get(name) is not None]
    if body.get("guided_whitespace_pattern") is not None and body.get("guided_json") is None:
        raise bad("guided_whitespace_pattern", "guided_whitespace_pattern only applies to guided_json")
    if len(found) > 1:
        raise bad(found[1].param, f"{found[0].param} and {found[1].param} both constrain the reply: send one of them")
    return found[0] if found else None


def after_reasoning(constraint: Constraint, think: Think | None) -> Constraint:
    """The constraint applied to the answer of a reasoning model, the think block the template asked for first.
    A Lark or GBNF grammar of the request's own is kept as it is: it holds from the reply's first token."""
    params = constraint.params
    if think is None or think.state is ThinkState.CLOSED or params.grammar is not None:
        return constraint
    import llguidance

    kind, text = params.source
    if kind == "json_schema":
        answer = f"%json {text}"
    elif kind == "regex":
        answer = f"/{llguidance.regex_to_lark(text)}/"
    else:  # choice
        answer = " | ".join(json.dumps(c) for c in json.loads(text))
    lark = lark_reasoning(think) + f"answer: {answer}\n"
    return Constraint(StructuredOutputsParams(grammar=lark), constraint.param)
