"""The whole configuration: one section per stage family, each a frozen dataclass.

``icons.json`` under the home is ``IconsConfig.to_json()``; the resources, the CLI's flags
and each asset's code version are generated from the same sections, so a setting is
declared once (its section dataclass) and reaches every consumer by its one name.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from icons_dagster.core.config import (
    AutomationConfig,
    CatalogConfig,
    DataConfig,
    GradientConfig,
    InfluenceConfig,
    LoraSettings,
    ModelConfig,
    ScaleoutConfig,
    SelectionConfig,
    StoreConfig,
    WarmupConfig,
    field_default,
)
from icons_dagster.core.ofa.embedding import EmbedderConfig
from icons_dagster.core.evaluation.methods import EvaluationConfig
from icons_dagster.core.ofa.selector import OFAConfig


@dataclass(frozen=True)
class IconsConfig:
    """Every section of the configuration (field name = section name in ``icons.json``)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    gradients: GradientConfig = field(default_factory=GradientConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    ofa: OFAConfig = field(default_factory=OFAConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    automation: AutomationConfig = field(default_factory=AutomationConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    scaleout: ScaleoutConfig = field(default_factory=ScaleoutConfig)

    @classmethod
    def from_json(cls, document: dict[str, Any], source: str = "config") -> IconsConfig:
        """Sections from a JSON object; an unknown section or field, or a bad value, is an
        error naming ``source`` and the setting."""
        if not isinstance(document, dict):
            raise ValueError(f"{source}: expected a JSON object of sections, got {type(document).__name__}")
        unknown = sorted(set(document) - set(SECTIONS))
        if unknown:
            raise ValueError(f"{source}: unknown sections {unknown}; known: {list(SECTIONS)}")
        sections = {}
        for name, values in document.items():
            if not isinstance(values, dict):
                raise ValueError(f"{source}: section {name!r} must be a JSON object, got {type(values).__name__}")
            sections[name] = section_from_json(SECTIONS[name], values, f"{source}: {name}")
        return cls(**sections)

    def to_json(self) -> dict[str, Any]:
        """Every section with every field (defaults included), JSON-ready."""
        return {name: section_to_json(getattr(self, name)) for name in SECTIONS}

    def replace(self, **sections: dict[str, Any]) -> IconsConfig:
        """A copy with some fields of some sections changed: ``replace(selection={"p": 0.3})``."""
        document = self.to_json()
        for name, values in sections.items():
            if name not in SECTIONS:
                raise ValueError(f"unknown section {name!r}; known: {list(SECTIONS)}")
            document[name].update(values)
        return IconsConfig.from_json(document)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(IconsConfig)}  # type: ignore[misc]


def field_types(section: type) -> dict[str, Any]:
    """Each field's resolved type annotation."""
    return typing.get_type_hints(section)


def _to_json_value(f: dataclasses.Field, value: Any) -> Any:
    if f.metadata.get("mapping"):
        return {k: _to_json_value_plain(v) for k, v in value}
    return _to_json_value_plain(value)


def _to_json_value_plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json_value_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json_value_plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def section_to_json(config: object) -> dict[str, Any]:
    return {f.name: _to_json_value(f, getattr(config, f.name)) for f in fields(config)}  # type: ignore[arg-type]


def _from_json_value(annotation: Any, value: Any) -> Any:
    """A JSON value as the field's type holds it (lists become tuples, recursively)."""
    origin = typing.get_origin(annotation)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json_value(args[0], v) for v in value)
        return tuple(_from_json_value(a, v) for a, v in zip(args, value, strict=False))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def section_from_json(section: type, values: dict[str, Any], source: str = "") -> Any:
    """One section from its JSON object (missing fields take their defaults)."""
    known = {f.name: f for f in fields(section)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown settings {unknown}; known: {sorted(known)}")
    types = field_types(section)
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = value if known[name].metadata.get("mapping") else _from_json_value(types[name], value)
    try:
        return section(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from error


def default_json(section: type) -> dict[str, Any]:
    """A section's defaults as JSON values."""
    return {f.name: _to_json_value(f, field_default(f)) for f in fields(section)}


def read_config_document(path: Path) -> dict[str, Any]:
    """A configuration file's JSON object; malformed JSON or another value fails naming the file."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON ({error})") from error
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object of sections {list(SECTIONS)}")
    return document


def load_config_file(path: Path) -> IconsConfig:
    """``icons.json``: malformed JSON or a bad setting fails naming the file."""
    return IconsConfig.from_json(read_config_document(path), str(path))
