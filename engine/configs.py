"""What a deployment is: DirectAI's deploy bodies as validated pydantic models, and the kinds of deployment.

These models are the request bodies of ``/deploy_classifier`` and ``/deploy_detector`` (the API imports them from
here) and, without ``deployed_id``, exactly what the registry stores and ``/model_config`` returns; a stored config
is read back with ``model_validate``. Every default lives here, once, with DirectAI's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from errors import Invalid, ZssError


class Kind(StrEnum):
    """The kinds of deployment; the registry stores the value."""

    CLASSIFIER = "classifier"
    DETECTOR = "detector"


def unicode_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode text, or None. JSON's ``"\\ud800"`` (and the raw bytes ``ED A0 80``, which
    ``json`` decodes with ``surrogatepass``) give a lone surrogate, which no UTF-8 encoder takes (the embedding cache's
    key, SQLite, the answer). The message never repeats the text (it must stay encodable)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"text is not valid Unicode: a lone surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}"
    return None


def _first_unicode_problem(value: Any, where: str = "") -> str | None:
    """The first string in ``value`` (a string, or lists and dicts of them) that is not valid Unicode, and why."""
    if isinstance(value, str):
        problem = unicode_problem(value)
        return f"{where}{problem}" if problem else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for i, item in items:
        if problem := _first_unicode_problem(item, f"{where}item {i}: "):
            return problem
    return None


class TextBody(BaseModel):
    """A request body whose every string field is valid Unicode text: a lone surrogate is refused (422) naming the
    field, before it reaches the encoders, the cache or a job."""

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        if problem := _first_unicode_problem(value):
            raise ValueError(problem)
        return value


class _Body(TextBody):
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


@dataclass(frozen=True)
class DeployLimits:
    """The bounds of one deploy's work (settings ``deploy_max_*``): a body over one is refused before any encoding."""

    example_chars: int = 1000
    examples_per_class: int = 1000
    classes: int = 2000
    prompts: int = 100_000

    @classmethod
    def from_settings(cls, s: Any) -> DeployLimits:
        return cls(
            s.deploy_max_example_chars, s.deploy_max_examples_per_class, s.deploy_max_classes, s.deploy_max_prompts
        )


class TooManyPrompts(ZssError):
    """A deploy over ``ZSS_DEPLOY_MAX_PROMPTS`` counting every prompt: the engine then counts only those not cached."""

    status_code = 413


def example_texts(body: DeployRequest) -> list[str]:
    """Every example text of a deploy, in the order the embedder gets them (duplicates kept)."""
    return [t for c in body.classes for t in (*c.texts(True), *c.texts(False))]


def check_limits(body: DeployRequest, limits: DeployLimits, templates: int, uncached_texts: int | None = None) -> None:
    """422 for an example text longer than the limit (refused, never truncated: a longer text is cut by the tokenizer
    at the model's context anyway, so a client sending one has made a mistake worth telling); 413 for a deploy with
    more classes, examples per class or prompts to encode than the server takes. Prompts are texts x ``templates``
    when augmented; ``uncached_texts`` (the distinct texts the embedding cache lacks), when given, is what counts:
    texts already cached cost no encoding. Without it every text counts, and :class:`TooManyPrompts` says so."""
    classes = body.classes
    if len(classes) > limits.classes:
        raise ZssError(f"Too many classes: {len(classes)} (at most {limits.classes}, ZSS_DEPLOY_MAX_CLASSES).", 413)
    texts = 0
    for c in classes:
        for examples in (c.examples_to_include, c.examples_to_exclude):
            if len(examples) > limits.examples_per_class:
                raise ZssError(
                    f"Class {c.name[:64]!r} has {len(examples)} examples in one list (at most "
                    f"{limits.examples_per_class}, ZSS_DEPLOY_MAX_EXAMPLES_PER_CLASS).",
                    413,
                )
        for text in (*c.texts(True), *c.texts(False)):
            if len(text) > limits.example_chars:
                raise Invalid(
                    f"Class {c.name[:64]!r} has an example of {len(text)} characters (at most {limits.example_chars}, "
                    "ZSS_DEPLOY_MAX_EXAMPLE_CHARS; the model reads only its first 77 tokens)."
                )
            texts += 1
    per_text = templates if body.augment_examples else 1
    counted = texts if uncached_texts is None else uncached_texts
    prompts = counted * per_text
    if prompts > limits.prompts:
        what = "example texts" if uncached_texts is None else f"example texts not cached, of {texts}"
        raise TooManyPrompts(
            f"Too many prompts to encode: {prompts} ({counted} {what}"
            f"{f' x {templates} templates' if body.augment_examples else ''}; at most {limits.prompts}, "
            "ZSS_DEPLOY_MAX_PROMPTS).",
        )
