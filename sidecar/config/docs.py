"""Generate the key reference of docs/CONFIG.md from the config models' field docs.

``python -m sidecar.config.docs`` prints it, ``--write docs/CONFIG.md`` updates the file in
place; a test keeps docs/CONFIG.md in step.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from sidecar.config.model import Config

BEGIN = "<!-- BEGIN GENERATED REFERENCE -->"
END = "<!-- END GENERATED REFERENCE -->"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return "null" if annotation is type(None) else annotation.__name__
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    text = str(annotation).replace("typing.", "").replace("sidecar.config.model.", "")
    return text.replace("NoneType", "null")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        return "{}" if isinstance(value, BaseModel | dict) else repr(value)
    if field.default is PydanticUndefined:
        return "required"
    if isinstance(field.default, tuple):
        return "[" + ", ".join(str(v) for v in field.default) + "]"
    return repr(field.default) if field.default is not None else "unset"


def reference() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            nested = _models_in(field.annotation)
            doc = (
                field.description or (nested[0].__doc__ or "").split("\n")[0]
                if nested
                else field.description or ""
            )
            type_name = _type_name(field.annotation).replace("|", "\\|")
            rows.append(f"| `{key}` | {type_name} | {_default(field)} | {doc} |")
            origin = typing.get_origin(field.annotation)
            for sub in nested:
                if sub.__name__ in ("Target",):
                    continue
                if origin is dict:
                    walk(sub, f"{key}.<name>.")
                elif origin is tuple:
                    walk(sub, f"{key}[].")
                else:
                    walk(sub, f"{key}.")

    walk(Config, "")
    return "\n".join(rows)


def write(path: str) -> None:
    """Replace the generated block of ``path`` (docs/CONFIG.md) with the current reference."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    before, _, rest = text.partition(BEGIN)
    _, _, after = rest.partition(END)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{before}{BEGIN}\n{reference()}\n{END}{after}")


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        write(sys.argv[2])
    else:
        print(reference())
