"""Dagster resources: the store, and one resource per configuration section.

Each section resource is generated from its core dataclass (``core/config.py``,
``core/schema.py``): same field names, same defaults, same help, and ``config()`` returns
the frozen dataclass the stages take. The values reach the CLI and the UI alike through
the home's ``icons.json`` (``home.py``).
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from typing import Any, Optional

from dagster import ConfigurableResource
from pydantic import Field

from icons_dagster.core.schema import SECTIONS, default_json, field_types, section_from_json
from icons_dagster.core.storage.artifacts import ArtifactStore, clean_leftovers

#: The sections the assets read (store, automation and scale-out shape the definitions instead).
ASSET_SECTIONS = ("data", "model", "lora", "warmup", "gradients", "influence", "selection", "embedder", "ofa", "evaluation")


class StoreResource(ConfigurableResource):
    """Root folder of every artifact, export and the Dagster instance; ``remote``: an fsspec
    URL (s3://, gs://, file:// on a shared disk) that every machine shares artifacts through."""

    root: str
    remote: str = ""

    def setup_for_execution(self, context) -> None:
        """At the start of every run (CLI or UI): record this process as the run's worker, fail
        runs whose worker died here and free their pool slots (run_guard.py), and remove what
        dead writers on this machine left."""
        from icons_dagster.run_guard import release_dead_runs, tag_worker
        from icons_dagster.scaleout import SHARD_TAG

        if context.instance is not None and context.run_id:
            # A shard run may execute its step elsewhere (the Celery executor), so this process
            # need not be its worker; shard runs hold no pool slot, so they need no tag.
            if context.dagster_run is not None and SHARD_TAG not in context.dagster_run.tags:
                tag_worker(context.instance, context.run_id)
            failed = release_dead_runs(context.instance)
            if failed and context.log is not None:
                context.log.info(f"marked {len(failed)} run(s) failed whose worker died on this machine: {', '.join(failed)}")
        removed, _ = clean_leftovers(self.root)
        if removed and context.log is not None:
            context.log.info(f"removed {len(removed)} temporary leftover(s) of interrupted writes under {self.root}")

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root, self.remote or None)


def _resource_type(annotation: Any, mapping: bool) -> Any:
    """The Dagster config type holding a field's JSON form."""
    if mapping:
        return dict[str, typing.get_args(typing.get_args(annotation)[0])[1]]
    if typing.get_origin(annotation) is tuple:
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return list[args[0]]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return Optional[inner[0]]
    return annotation


def section_resource(section: str) -> type[ConfigurableResource]:
    """A ConfigurableResource with the section dataclass's fields, defaults and help."""
    cls = SECTIONS[section]
    annotations = field_types(cls)
    defaults = default_json(cls)
    namespace: dict[str, Any] = {"__annotations__": {}, "__doc__": cls.__doc__, "__module__": __name__}
    for f in fields(cls):
        namespace["__annotations__"][f.name] = _resource_type(annotations[f.name], f.metadata.get("mapping", False))
        namespace[f.name] = Field(default=defaults[f.name], description=f.metadata.get("help"))

    def config(self):
        return section_from_json(cls, self.model_dump(), f"resource {section}")

    config.__doc__ = f"The frozen ``{cls.__name__}`` these fields describe."
    namespace["config"] = config
    name = "".join(part.title() for part in section.split("_")) + "Resource"
    return type(name, (ConfigurableResource,), namespace)


SECTION_RESOURCES: dict[str, type[ConfigurableResource]] = {section: section_resource(section) for section in ASSET_SECTIONS}

# The names asset parameters are annotated with (Dagster finds resources by annotation).
DataResource = SECTION_RESOURCES["data"]
ModelResource = SECTION_RESOURCES["model"]
LoraResource = SECTION_RESOURCES["lora"]
WarmupResource = SECTION_RESOURCES["warmup"]
GradientsResource = SECTION_RESOURCES["gradients"]
InfluenceResource = SECTION_RESOURCES["influence"]
SelectionResource = SECTION_RESOURCES["selection"]
EmbedderResource = SECTION_RESOURCES["embedder"]
OFAResource = SECTION_RESOURCES["ofa"]
EvaluationResource = SECTION_RESOURCES["evaluation"]
