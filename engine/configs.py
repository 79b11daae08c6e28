"""What a deployment is: DirectAI's deploy bodies as validated pydantic models, and the kinds of deployment.

These models are the request bodies of ``/deploy_classifier`` and ``/deploy_detector`` (the API imports them from
here) and, without ``deployed_id``, exactly what the registry stores and ``/model_config`` returns; a stored config
is read back with ``model_validate``. Every default lives here, once, with DirectAI's values.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from errors import Invalid


class Kind(StrEnum):
    """The kinds of deployment; the registry stores the value."""

    CLASSIFIER = "classifier"
    DETECTOR = "detector"


class _Body(BaseModel):
    # A misspelt field is a client bug that would otherwise silently deploy defaults.
    model_config = ConfigDict(extra="forbid")


class ClassifierConfig(_Body):
    """One meta-class: a name, texts that describe it, and texts that must not be taken for it."""

    name: str = Field(min_length=1, max_length=512)
    examples_to_include: list[str]
    examples_to_exclude: list[str] = Field(default_factory=list)


class DetectorConfig(ClassifierConfig):
    detection_threshold: float = Field(default=0.1, ge=0.0, le=1.0)


class DeployClassifierRequest(_Body):
    classifier_configs: list[ClassifierConfig]
    deployed_id: str | None = Field(default=None, max_length=128)
    augment_examples: bool = True

    @property
    def classes(self) -> list[ClassifierConfig]:
        return self.classifier_configs


class DeployDetectorRequest(_Body):
    detector_configs: list[DetectorConfig]
    deployed_id: str | None = Field(default=None, max_length=128)
    nms_threshold: float = Field(default=0.4, ge=0.0, le=1.0)
    class_agnostic_nms: bool = True
    augment_examples: bool = True

    @property
    def classes(self) -> list[DetectorConfig]:
        return self.detector_configs


DeployRequest = DeployClassifierRequest | DeployDetectorRequest

SCHEMAS: dict[Kind, type[DeployClassifierRequest] | type[DeployDetectorRequest]] = {
    Kind.CLASSIFIER: DeployClassifierRequest,
    Kind.DETECTOR: DeployDetectorRequest,
}


def kind_of(body: DeployRequest) -> Kind:
    return Kind.DETECTOR if isinstance(body, DeployDetectorRequest) else Kind.CLASSIFIER


def stored_config(body: DeployRequest) -> dict[str, Any]:
    """What the registry keeps: the validated body with every default filled in, without ``deployed_id``."""
    return body.model_dump(mode="json", exclude={"deployed_id"})


def load_config(kind: Kind, config: dict[str, Any]) -> DeployRequest:
    """A stored config back as its model (validation fills defaults a config stored by an older version lacks)."""
    return SCHEMAS[kind].model_validate(config)


def check_classes(body: DeployRequest) -> None:
    """Rules pydantic does not express: at least one class, unique names, positive examples, no empty example."""
    classes = body.classes
    if not classes:
        raise Invalid("Class list is empty.")
    seen: set[str] = set()
    for c in classes:
        if c.name in seen:
            raise Invalid(f"Duplicate class name: {c.name!r}.")
        seen.add(c.name)
        if not c.examples_to_include:
            raise Invalid(f"Model lacks example_to_include for {c.name} class.")  # DirectAI's wording
        if any(not ex.strip() for ex in (*c.examples_to_include, *c.examples_to_exclude)):
            raise Invalid(f"Class {c.name!r} has an empty example.")
