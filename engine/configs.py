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


class ImageData(_Body):
    """An image example sent inline: base64 (standard or URL-safe) or a ``data:image/...;base64,`` URI."""

    image: str = Field(min_length=1)


class ImageUrl(_Body):
    """An image example the server fetches (only where URL fetching is allowed, through the SSRF-safe fetch)."""

    url: str = Field(min_length=1, max_length=4096)


# An example is a text (DirectAI's form) or an image; stored and returned exactly as given.
Example = str | ImageData | ImageUrl


def is_text(example: Example) -> bool:
    return isinstance(example, str)


class ClassifierConfig(_Body):
    """One meta-class: a name, examples (texts or images) that describe it, and examples that must not be taken for
    it."""

    name: str = Field(min_length=1, max_length=512)
    examples_to_include: list[Example]
    examples_to_exclude: list[Example] = Field(default_factory=list)

    def texts(self, positive: bool) -> list[str]:
        return [e for e in (self.examples_to_include if positive else self.examples_to_exclude) if isinstance(e, str)]

    def images(self, positive: bool) -> list[tuple[int, ImageData | ImageUrl]]:
        """(index in its list, example) of the image examples, in order."""
        examples = self.examples_to_include if positive else self.examples_to_exclude
        return [(i, e) for i, e in enumerate(examples) if not isinstance(e, str)]


class DetectorConfig(ClassifierConfig):
    detection_threshold: float = Field(default=0.1, ge=0.0, le=1.0)


class OpenSet(_Body):
    """ "None of these": an image whose best class's raw score (its two-stage evidence, in [0, 1]) is below
    ``threshold`` gets ``label`` as its prediction and ``"rejected": true``. On a model with probabilities (SigLIP),
    ``min_probability`` instead rejects an image no class of which reaches that probability; it is the rule there when
    neither is given (0.5). A CLIP needs ``threshold``."""

    label: str = Field(default="none of these", min_length=1, max_length=512)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    min_probability: float | None = Field(default=None, ge=0.0, le=1.0)


class DeployClassifierRequest(_Body):
    classifier_configs: list[ClassifierConfig]
    deployed_id: str | None = Field(default=None, max_length=128)
    augment_examples: bool = True
    open_set: OpenSet | None = None

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
    """What the registry keeps: the validated body with every default filled in, without ``deployed_id`` (and without
    ``open_set`` when it is not set, so a DirectAI client sees DirectAI's body)."""
    exclude = {"deployed_id"}
    if isinstance(body, DeployClassifierRequest) and body.open_set is None:
        exclude.add("open_set")
    out = body.model_dump(mode="json", exclude=exclude)
    if isinstance(out.get("open_set"), dict):  # the rule it was given, not the other one as null
        out["open_set"] = {k: v for k, v in out["open_set"].items() if v is not None}
    return out


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
        if any(not ex.strip() for ex in (*c.texts(True), *c.texts(False))):
            raise Invalid(f"Class {c.name!r} has an empty example.")
    open_set = getattr(body, "open_set", None)
    if open_set is not None and open_set.label in seen:
        raise Invalid(f"The open-set label {open_set.label!r} is also a class name.")
