"""Dagster resources: the store, and one resource per configuration section.

Each section resource is generated from its core dataclass (``core/config.py``,
``core/schema.py``): same field names, same defaults, same help, and ``config()`` returns
the frozen dataclass the stages take. The values reach the CLI and the UI alike through
the home's ``icons.json`` (``home.py``).
"""

from __future__ import annotations

import typing
from dataclasses import fields
from typing import Any, Optional

from dagster import ConfigurableResource
from pydantic import Field

from icons_dagster.core.schema import SECTIONS, default_json, field_types, section_from_json
from icons_dagster.core.storage.artifacts import ArtifactStore

#: The sections the assets read (store, automation and scale-out shape the definitions instead).
ASSET_SECTIONS = ("data", "model", "lora", "warmup", "gradients", "influence", "selection", "embedder", "ofa", "evaluation")


class StoreResource(ConfigurableResource):
    """Root folder of every artifact, export and the Dagster instance; ``remote``: an fsspec
    URL (s3://, gs://, file:// on a shared disk) that every machine shares artifacts through."""

    root: str
    remote: str = ""

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root, self.remote or None)


def _resource_type(annotation: Any, mapping: bool) -> Any:
    """The Dagster config type holding a field's JSON form."""
    if mapping:
        return dict[str, typing.get_args(typing.get_args(annotation)[0])[1]]
    if typing.get_origin(annotation) is tuple:
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return list[args[0]]
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType")):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return Optional[inner[0]]
    return annotation


def section_resource(section: str) -> type[ConfigurableResource]:
    """A ConfigurableResource with the section dataclass's fields, defaults and help."""
    cls = SECTIONS[section]
    types = field_types(cls)
    defaults = default_json(cls)
    namespace: dict[str, Any] = {"__annotations__": {}, "__doc__": cls.__doc__, "__module__": __name__}
    for f in fields(cls):
        namespace["__annotations__"][f.name] = _resource_type(types[f.name], f.metadata.get("mapping", False))
        namespace[f.name] = Field(default=defaults[f.name], description=f.metadata.get("help"))

    def config(self):
        return section_from_json(cls, self.model_dump(), f"resource {section}")

    config.__doc__ = f"The frozen ``{cls.__name__}`` these fields describe."
    namespace["config"] = config
    name = "".join(part.title() for part in section.split("_")) + "Resource"
    return type(name, (ConfigurableResource,), namespace)


DataResource = section_resource("data")
ModelResource = section_resource("model")
LoraResource = section_resource("lora")
WarmupResource = section_resource("warmup")
GradientsResource = section_resource("gradients")
InfluenceResource = section_resource("influence")
SelectionResource = section_resource("selection")
EmbedderResource = section_resource("embedder")
OFAResource = section_resource("ofa")
EvaluationResource = section_resource("evaluation")

SECTION_RESOURCES: dict[str, type[ConfigurableResource]] = {
    "data": DataResource,
    "model": ModelResource,
    "lora": LoraResource,
    "warmup": WarmupResource,
    "gradients": GradientsResource,
    "influence": InfluenceResource,
    "selection": SelectionResource,
    "embedder": EmbedderResource,
    "ofa": OFAResource,
    "evaluation": EvaluationResource,
}
