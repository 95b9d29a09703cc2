"""The models batcher knows, their parameters, and validation of a job against them."""

from batcher.schemas.spec import (
    ModelSpec,
    OutputSpec,
    ParamSpec,
    did_you_mean,
    get_model,
    model_from_json,
    registry,
)
from batcher.schemas.validate import Problem, Validated, coerce, show, validate

__all__ = [
    "ModelSpec",
    "OutputSpec",
    "ParamSpec",
    "Problem",
    "Validated",
    "coerce",
    "did_you_mean",
    "get_model",
    "model_from_json",
    "registry",
    "show",
    "validate",
]
