"""The job-file key reference (docs/keys.md), generated from the schema in raydist/config.py by
``raydist docs keys``, so the page cannot drift from what validation accepts (tests/test_tracking.py compares them).
"""

from __future__ import annotations

from typing import Any

from raydist import config as C

INTRO = """# Job file keys

Every key a job file (and the `--set SECTION.KEY=VALUE` option) accepts, with its type, default and allowed values.
Sweep and compare files change these same keys (`set:` / `overrides:`); their `tracking:` section takes the keys of
the tracking section below. Fractions such as `8/255` are accepted wherever the type is `frac`.

This page is generated from the schema in `raydist/config.py` by `raydist docs keys > docs/keys.md`.
"""

KINDS = {"int": "int", "float": "float", "frac": "frac", "bool": "bool", "str": "string", "int_list": "list of int",
         "str_list": "list of string"}


def _value(value: Any, kind: str) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if kind == "frac" and isinstance(value, float):
        k = value * 255
        if abs(k - round(k)) < 1e-9 and round(k) != 0:
            return f"{round(k)}/255"
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value) if not isinstance(value, float) else f"{value:g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _allowed(field: C.Field) -> str:
    parts = []
    choices = field.choice_list()
    if choices:
        parts.append(", ".join(f"`{c}`" for c in choices))
    if field.min is not None:
        parts.append(f"{'>' if field.min_exclusive else '>='} {field.min:g}")
    if field.max is not None:
        parts.append(f"<= {field.max:g}")
    if field.nullable:
        parts.append("null")
    return "; ".join(parts)


def _method_note(key: str) -> str:
    if key in C.METHOD_COMMON:
        return "all methods"
    from raydist.methods import METHOD_PARAMS

    takers = [m for m, params in METHOD_PARAMS.items() if key in params]
    return ", ".join(f"`{m}`" for m in takers)


def key_reference() -> str:
    """The Markdown page: one table per section, one row per key, in the schema's order."""
    lines = [INTRO]
    for section, fields in C.SCHEMA.items():
        lines.append(f"## {section}\n")
        method = section == "method"
        head = ["key", "type", "default", "allowed"] + (["methods"] if method else []) + ["meaning"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        for key, field in fields.items():
            cells = [f"`{section}.{key}`", KINDS[field.kind], f"`{_value(field.default, field.kind)}`",
                     _allowed(field)] + ([_method_note(key)] if method else []) + [field.help]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    if C.SCHEMA.get("method"):
        lines.append("In the `method` section only the keys of the chosen method apply (column *methods*); where one "
                     "is left out, the method's own default is used.\n")
    return "\n".join(lines).rstrip() + "\n"
