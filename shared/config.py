"""Typed configuration: one pydantic model per service, read from YAML once, with command-line overrides.

Every leaf field of a config model becomes a flag named by its dotted path (``--port``, ``--kl.target``); a flag's
value is parsed as YAML, so ``--top_k 5``, ``--enabled false`` and ``--stop '[1, 2]'`` all mean what they say.
"""

from __future__ import annotations

import argparse
import enum
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config and domain model: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False, protected_namespaces=())


class ConfigError(ValueError):
    """A config file or flag that does not validate; the message names the field."""


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and, for a bad row, its line."""


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    paths = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths.extend(_leaf_paths(annotation, f"{prefix}{name}."))
        else:
            paths.append((f"{prefix}{name}", field))
    return paths


def add_config_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """Adds ``--config FILE`` and one ``--dotted.path VALUE`` flag per leaf field of ``model``."""
    parser.add_argument(
        "--config",
        type=Path,
        action="append",
        default=None,
        help="YAML config file; given again, later files are merged over earlier ones (mappings key by key); "
        "flags override them all",
    )
    group = parser.add_argument_group(f"{model.__name__} fields (override the file)")
    for path, field in _leaf_paths(model):
        annotation = field.annotation
        choices = ""
        if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            choices = " one of: " + ", ".join(str(m.value) for m in annotation)
        if field.is_required():
            shown = "required"
        else:
            default = field.get_default(call_default_factory=True)
            default = default.value if isinstance(default, enum.Enum) else default
            shown = f"default: {'none' if default is None else default}"
        help_text = f"{field.description or ''}{choices} ({shown})".strip()
        group.add_argument(f"--{path}", dest=f"cfg::{path}", default=None, metavar="V", help=help_text)


def _set_dotted(target: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{path}: '{key}' is not a section")
    target[leaf] = value


def _merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base``: mappings key by key, anything else replaced."""
    merged = dict(base)
    for key, value in over.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def load_config(
    model: type[C], path: Path | str | list[Path | str] | None = None, overrides: dict[str, Any] | None = None
) -> C:
    """Reads ``path`` (YAML; several are merged in order, e.g. a role's config then a TLS add-on; may be None),
    applies dotted-path ``overrides`` and validates into ``model``."""
    paths = [Path(p) for p in (path if isinstance(path, list) else [path] if path is not None else [])]
    data: dict = {}
    for one in paths:
        data = _merge(data, _read_yaml(one))
    path = ", ".join(str(p) for p in paths) or None
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid {model.__name__}{where}: {problems}") from None


def config_from_args(model: type[C], args: argparse.Namespace) -> C:
    """Builds the config from parsed ``--config`` and per-field flags (added by ``add_config_flags``)."""
    overrides = {}
    for key, raw in vars(args).items():
        if key.startswith("cfg::") and raw is not None:
            overrides[key.removeprefix("cfg::")] = yaml.safe_load(raw)
    return load_config(model, getattr(args, "config", None), overrides)
