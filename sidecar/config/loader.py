"""Load a config file: YAML, `${...}` interpolation, validation, errors that name the key.

Every failure raises :class:`ConfigError` whose message reads like
``upstreams.openai.url: not a valid URL: 'htp:/x'``, so an operator can fix a ConfigMap from
the log line alone.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sidecar.config.model import Config

_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")


class ConfigError(ValueError):
    """The config could not be loaded; the message names the key path and the bad value."""


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated config with where it came from and a hash of its source text."""

    config: Config
    source: str
    text_hash: str


def default_config_text() -> str:
    """The embedded default config, used when no --config is given."""
    return (resources.files("sidecar.config") / "default.yaml").read_text(encoding="utf-8")


def load_file(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read and validate a config file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
    return load_text(text, source=str(path), env=env)


def load_default() -> LoadedConfig:
    return load_text(default_config_text(), source="<embedded default>")


def load_text(
    text: str, source: str = "<string>", env: Mapping[str, str] | None = None
) -> LoadedConfig:
    """Parse YAML text, interpolate and validate it."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"the config must be a mapping at the top level, not {type(raw).__name__}"
        )
    interpolated = _interpolate(raw, (), os.environ if env is None else env)
    try:
        config = Config.model_validate(interpolated)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return LoadedConfig(config=config, source=source, text_hash=digest)


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


def _interpolate(value: Any, loc: tuple[Any, ...], env: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: _resolve(m.group(1), loc, env), value)
    if isinstance(value, dict):
        return {k: _interpolate(v, (*loc, k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*loc, i), env) for i, v in enumerate(value)]
    return value


def _resolve(expr: str, loc: tuple[Any, ...], env: Mapping[str, str]) -> str:
    if expr.startswith("file:"):
        path = expr[5:]
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"{_key_path(loc)}: cannot read secret file {path!r}: {exc.strerror}"
            ) from None
    name, sep, default = expr.partition(":-")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConfigError(f"{_key_path(loc)}: bad placeholder '${{{expr}}}'")
    found = env.get(name)
    if found is not None and (found or not sep):
        return found
    if sep:
        return default
    raise ConfigError(f"{_key_path(loc)}: environment variable {name} is not set")


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        loc = tuple(p for p in error["loc"] if not _is_union_tag(p))
        msg = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            msg = "unknown key"
        elif error["type"] != "value_error" and "input" in error:
            shown = error["input"]
            if not isinstance(shown, dict | list):
                msg = f"{msg}: {shown!r}"
        lines.append(f"{_key_path(loc)}: {msg}" if loc else msg)
    return "; ".join(dict.fromkeys(lines))


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the union member's name (e.g. 'str', 'Target') to the location.
    return isinstance(part, str) and (part in ("str", "Target") or part.startswith("function-"))
