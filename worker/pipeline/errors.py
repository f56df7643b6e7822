"""Pipeline errors carry a stable `code` that scripts (and the API's `error.code`) branch on.
The codes and the base class are the contract's (distillery_contract.errors), shared with the
API's errors."""

from __future__ import annotations

from distillery_contract.errors import DistilleryError, ErrorCode


class PipelineError(DistilleryError):
    code = ErrorCode.PIPELINE_ERROR


class DatasetError(PipelineError):
    """The dataset is unreadable, malformed, or its labels/shapes are wrong."""

    code = ErrorCode.INVALID_DATASET


class DatasetIncompatible(PipelineError):
    """The dataset does not fit the teacher or architecture (channels, size, classes)."""

    code = ErrorCode.DATASET_INCOMPATIBLE


class ModelLoadError(PipelineError):
    """An uploaded teacher is corrupt, of the wrong kind, or would need unpickling."""

    code = ErrorCode.INVALID_MODEL


class NanLoss(PipelineError):
    code = ErrorCode.NAN_LOSS


class Cancelled(PipelineError):
    code = ErrorCode.CANCELLED


class SpecError(PipelineError):
    """The spec is valid on its own but does not fit the models (e.g. a layer name)."""

    code = ErrorCode.INVALID_SPEC
