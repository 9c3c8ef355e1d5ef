"""Request and response models. Shapes follow OpenAI's files and fine-tuning APIs, plus our own fields.

Field names match the engine's (``citi_engine.training.config``): ``budget.max_steps``,
``components.molora_fraction``, ``method.hyperparameters.lr_molora`` and so on.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from citi_engine import DEFAULT_MODEL
from citi_engine.budget import Budget
from citi_engine.ranges import range_of
from citi_engine.training.config import ComponentsConfig, FinetuneConfig

MAX_INTEGRATIONS = 10
JobStatus = Literal["validating_files", "queued", "running", "cancelling", "paused", "succeeded", "failed",
                    "cancelled"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors ----------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """One problem behind an error (e.g. one bad line of an upload)."""

    model_config = ConfigDict(extra="allow")
    code: str
    message: str
    line: int | None = None
    param: str | None = None


class ErrorBody(BaseModel):
    """The ``error`` object."""

    code: str
    param: str | None = None
    message: str
    type: str
    details: list[ErrorDetail] | None = None


class ErrorResponse(BaseModel):
    """Every error response: ``{"error": {...}}``."""

    error: ErrorBody


# -- files -----------------------------------------------------------------------------------------


class FileObject(BaseModel):
    """An uploaded file (OpenAI's file object, plus what the validator counted), or a succeeded job's result file
    (purpose ``fine-tune-results``: the adapter archive or the report, with the ``job_id``; no counts)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    format: Literal["train", "test"] | None = Field(
        "train", description="'train': training examples; 'test': tool test lines with ground_truth "
        "(usable as validation_file only); null for a result file.")
    n_examples: int | None = None
    n_tool: int | None = None
    n_general: int | None = None
    job_id: str | None = Field(None, description="The job a result file (purpose fine-tune-results) came from.")


class FileList(BaseModel):
    """A page of files, newest first."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class Deleted(BaseModel):
    """Answer to a DELETE."""

    id: str
    object: str
    deleted: bool


# -- jobs ------------------------------------------------------------------------------------------


def _bounded(cls: type, name: str, description: str) -> Any:
    """An optional number field with the engine's range for ``cls.name`` (documented in the schema too)."""
    rng = range_of(cls, name)
    bounds = {"gt" if rng.lo_open else "ge": rng.lo, "lt" if rng.hi_open else "le": rng.hi}
    if rng.whole:
        bounds = {k: int(v) for k, v in bounds.items()}
    return Field(None, **bounds, allow_inf_nan=False, description=f"{description} Range: {rng}.")


class BudgetIn(_Strict):
    """Caps on what a job may spend; the run stops at the first it reaches. Leave one out for no cap."""

    max_steps: int | None = _bounded(Budget, "max_steps", "Optimizer steps, summed over all stages.")
    max_tokens: int | None = _bounded(Budget, "max_tokens", "Trained tokens (padding excluded).")
    max_seconds: float | None = _bounded(Budget, "max_seconds", "Wall-clock seconds for the whole job.")


class ComponentsIn(_Strict):
    """Which components get adapted and how big the adapters are (engine defaults where left out)."""

    molora_fraction: float | None = _bounded(ComponentsConfig, "molora_fraction", "Fraction of components given "
                                             "MOLoRA.")
    uco_fraction: float | None = _bounded(ComponentsConfig, "uco_fraction", "Fraction fully fine-tuned in stage 3 "
                                          "(0: no stage 3, an ablation).")
    num_experts: int | None = _bounded(ComponentsConfig, "num_experts", "LoRA experts per MOLoRA component.")
    rank: int | None = _bounded(ComponentsConfig, "rank", "Rank of each expert.")
    alpha: float | None = _bounded(ComponentsConfig, "alpha", "MOLoRA scaling numerator (alpha/rank).")
    lora_rank: int | None = _bounded(ComponentsConfig, "lora_rank", "Rank of the LoRA baseline (method lora).")
    lora_alpha: float | None = _bounded(ComponentsConfig, "lora_alpha", "Alpha of the LoRA baseline.")
    selection: Literal["importance", "random"] | None = Field(
        None, description="How components are chosen: importance (the method) or random (an ablation).")


_OPENAI_HYPER = ("OpenAI's n_epochs (the tool-learning stage's epochs), batch_size and learning_rate_multiplier "
                 "(times every stage's default learning rate) are accepted too, each a number or 'auto' (README: "
                 "OpenAI's job fields).")


class SupervisedIn(_Strict):
    """OpenAI's ``method.supervised``: its hyperparameters (ours or OpenAI's names)."""

    hyperparameters: dict[str, Any] = Field(default_factory=dict, description="As method.hyperparameters. "
                                            + _OPENAI_HYPER)


class MethodIn(_Strict):
    """The training method and its hyperparameters (see ``citi_engine.training.config.Hyperparameters``)."""

    type: Literal["citi", "lora", "full", "supervised"] = Field(
        "citi", description="citi (the default), lora or full; OpenAI's 'supervised' is citi, with its settings "
        "in method.supervised.hyperparameters.")
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="Any field of the engine's Hyperparameters; each number has a finite "
        "range (GET /ui/api/options lists them with their help), checked at submit time. " + _OPENAI_HYPER)
    supervised: SupervisedIn | None = Field(None, description="OpenAI's place for the hyperparameters of type "
                                            "'supervised'.")


class Integration(BaseModel):
    """One of OpenAI's job integrations (e.g. ``{"type": "wandb", "wandb": {...}}``): stored and listed back,
    not acted on."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(..., min_length=1, max_length=64)


class JobCreate(_Strict):
    """Body of ``POST /jobs`` (and ``POST /v1/fine_tuning/jobs``)."""

    model: str = Field(DEFAULT_MODEL, max_length=1024, description="Base model spec (see GET /v1/models).")
    training_file: str = Field(..., max_length=64, description="Id of an uploaded training file.")
    validation_file: str | None = Field(
        None, max_length=64, description="Id of a held-out tool test file; without one the job holds out part of "
        "the training file.")
    general_file: str | None = Field(
        None, max_length=64, description="Id of a file of general (non-tool) examples to mix in.")
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$",
                               description="Up to 64 characters added to the fine_tuned_model id.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(None, description="Up to 16 string pairs kept with the job.")
    method: MethodIn | None = None
    hyperparameters: dict[str, Any] | None = Field(
        None, description="Same as method.hyperparameters (OpenAI's older place for them); method's win.")
    integrations: list[Integration] | None = Field(
        None, max_length=MAX_INTEGRATIONS, description="OpenAI's integrations (e.g. wandb): stored with the job and "
        "listed back; this service runs none of them.")
    budget: BudgetIn | None = None
    components: ComponentsIn | None = None
    test_fraction: float | None = Field(None, ge=0, le=0.5, allow_inf_nan=False,
                                        description="Without validation_file: share of tool examples held out.")
    checkpoint_every: int | None = Field(None, ge=0, le=range_of(FinetuneConfig, "checkpoint_every").hi,
                                         description="Checkpoint every N steps (0: stage ends only).")


class JobError(BaseModel):
    """Why a job failed."""

    model_config = ConfigDict(extra="allow")
    code: str
    param: str | None = None
    message: str


class Progress(BaseModel):
    """Where training is: steps over all stages."""

    model_config = ConfigDict(extra="allow")
    step: int = 0
    total_steps: int | None = None
    stage: str | None = Field(None, description="The job's phase these numbers belong to (a training stage while "
                              "training).")
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None


class Job(BaseModel):
    """OpenAI's ``fine_tuning.job`` plus ``budget``, ``stage``, ``progress``, the selected components and links."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None = None
    status: JobStatus
    model: str
    training_file: str
    validation_file: str | None = None
    general_file: str | None = None
    fine_tuned_model: str | None = None
    error: JobError | None = None
    trained_tokens: int | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    method: dict[str, Any] = Field(default_factory=dict)
    estimated_finish: int | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    seed: int
    suffix: str | None = None
    organization_id: str
    result_files: list[str] = Field(default_factory=list, description="Once succeeded: file ids (Files API, purpose "
                                    "fine-tune-results) of the adapter archive (.tar.gz) and the evaluation report.")
    adapter_files: list[str] = Field(default_factory=list, description="The adapter directory's file names.")
    pause_requested: bool = Field(False, description="A pause was asked: the job stops at its next checkpoint.")
    base_model: str | None = Field(None, description="When model is a fine-tuned model (ft:...) this job continues: "
                                   "the base model it was made from.")
    budget: dict[str, Any] = Field(default_factory=dict)
    components: dict[str, Any] = Field(default_factory=dict)
    stage: str | None = Field(None, description="The job's phase: validating, loading, importance, replay, a "
                              "training stage (router_pretraining, molora, uco; train for lora and full), eval, "
                              "saving, done.")
    progress: Progress | None = None
    selected_components: dict[str, Any] | None = Field(
        None, description="Chosen MOLoRA and UCO components, once importance scoring is done.")
    queue_position: int | None = Field(None, description="1-based place in the queue while queued.")
    attempts: int = 0
    report_url: str | None = None
    adapter_url: str | None = None
    events_url: str
    artifacts_deleted: bool = False


class JobList(BaseModel):
    """A page of jobs, newest first."""

    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool


class Event(BaseModel):
    """One job event. ``seq`` (also ``id``) increases by one per event; SSE streams use it as event id.

    Under ``/v1/fine_tuning/jobs`` events come in OpenAI's shape: ``id`` ``ftevent-...``, ``type`` ``message`` or
    ``metrics`` (our type in ``event_type``), ``level`` ``info``/``warn``/``error``."""

    model_config = ConfigDict(extra="allow")
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    seq: int
    created_at: int
    level: str
    type: str
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


class EventList(BaseModel):
    """A page of events, oldest first (pass the last ``seq`` as ``after`` for the next page); under
    ``/v1/fine_tuning/jobs`` newest first (pass the last ``id`` as ``after``)."""

    object: Literal["list"] = "list"
    data: list[Event]
    has_more: bool


class Checkpoint(BaseModel):
    """A checkpoint the job wrote (resume state; removed when the job ends, kept while it is paused)."""

    model_config = ConfigDict(extra="allow")
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuning_job_id: str
    fine_tuned_model_checkpoint: str = Field(..., description="OpenAI's name for it: <fine_tuned_model>:ckpt-step-N "
                                             "(a name only: checkpoints are resume state, not served models).")
    step_number: int
    stage: str | None = Field(None, description="The training stage it was taken in (done after the last).")
    metrics: dict[str, Any] = Field(default_factory=dict)


class CheckpointList(BaseModel):
    """The job's checkpoints, newest first."""

    object: Literal["list"] = "list"
    data: list[Checkpoint]
    has_more: bool = False


class Estimate(BaseModel):
    """What a job would cost: tokens, steps, time, GPU memory, and whether that fits its budget."""

    model_config = ConfigDict(extra="allow")
    object: Literal["fine_tuning.job.estimate"] = "fine_tuning.job.estimate"
    model: str
    method: str
    examples: int
    tool_examples: int
    general_examples: int
    tokens: dict[str, Any]
    steps: dict[str, Any]
    trained_tokens: int
    estimated_seconds: float
    seconds_breakdown: dict[str, float]
    parameters: int | None
    gpus: int = Field(0, description="GPUs the job trains on, data-parallel (0 on CPU).")
    memory: dict[str, Any]
    budget: dict[str, Any]
    notes: list[str] = Field(default_factory=list)


class Health(BaseModel):
    """``GET /healthz``."""

    status: Literal["ok", "degraded"]
    redis: bool
    version: str
