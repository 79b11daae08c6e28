"""The HTTP edge's bodies: the deploy bodies (defined with the deployment kinds in engine/configs.py, where the
registry stores them) and the response bodies, in DirectAI's and photofield's shapes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from engine.configs import (
    ClassifierConfig,
    DeployClassifierRequest,
    DeployDetectorRequest,
    DetectorConfig,
    TextBody,
)

__all__ = [
    "ClassifierConfig",
    "ClassifyResult",
    "DeployClassifierRequest",
    "DeployDetectorRequest",
    "DeployResponse",
    "Detection",
    "DetectorConfig",
    "EmbedTextRequest",
    "EmbeddingsResponse",
    "ErrorResponse",
    "PhotofieldImageResponse",
    "PhotofieldTextRequest",
    "PhotofieldTextResponse",
]


class DeployResponse(BaseModel):
    deployed_id: str
    message: str


class JobAccepted(BaseModel):
    """A deploy sent with ``?wait=false``: its job, to poll at ``status_url``."""

    job_id: str
    state: str
    status_url: str


class JobStatus(BaseModel):
    """A deploy job: ``running``, ``done`` (``deployed_id`` set) or ``failed`` (``message`` says why); ``done`` of
    ``total`` example texts looked up so far (each committed to the embedding cache as it is encoded)."""

    job_id: str
    kind: str
    state: str
    done: int
    total: int
    deployed_id: str | None = None
    message: str | None = None
    created_at: float
    finished_at: float | None = None


class JobList(BaseModel):
    jobs: list[JobStatus]


class ClassifyResult(BaseModel):
    scores: dict[str, float]
    pred: str
    raw_scores: dict[str, float]
    rejected: bool | None = Field(default=None, description="With an open set: true when pred is its label")
    probabilities: dict[str, float] | None = Field(
        default=None,
        description="On a sigmoid-loss model (SigLIP): each class's probability sigmoid(scale * cos + bias) from the "
        "score the rule picked (a deciding negative example makes it near 0)",
    )


class Detection(BaseModel):
    tlbr: list[float] = Field(min_length=4, max_length=4)
    score: float
    class_: str = Field(alias="class")


class EmbedTextRequest(TextBody):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(max_length=10_000)
    augment_examples: bool = False


class EmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]


class DeploymentSummary(BaseModel):
    deployed_id: str
    kind: str
    tenant: str
    n_classes: int
    version: int
    created_at: float
    updated_at: float


class DeploymentList(BaseModel):
    deployments: list[DeploymentSummary]


class PhotofieldTextRequest(TextBody):
    model_config = ConfigDict(extra="ignore")  # photofield may add fields; only texts matter
    texts: list[str] = Field(max_length=10_000)


class PhotofieldEmbedding(BaseModel):
    embedding_f16_b64: str
    embedding_inv_norm_f16_uint16: int


class PhotofieldText(PhotofieldEmbedding):
    text: str


class PhotofieldImage(PhotofieldEmbedding):
    field: str
    filename: str | None


class PhotofieldTextResponse(BaseModel):
    texts: list[PhotofieldText]


class PhotofieldImageResponse(BaseModel):
    images: list[PhotofieldImage]


class ErrorResponse(BaseModel):
    status_code: int
    message: str
    data: None = None
