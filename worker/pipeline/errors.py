"""Pipeline errors carry a stable `code` that scripts (and the API's `error.code`) branch on."""


class PipelineError(Exception):
    code = "pipeline_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DatasetError(PipelineError):
    """The dataset is unreadable, malformed, or its labels/shapes are wrong."""

    code = "invalid_dataset"


class DatasetIncompatible(PipelineError):
    """The dataset does not fit the teacher or architecture (channels, size, classes)."""

    code = "dataset_incompatible"


class ModelLoadError(PipelineError):
    """An uploaded teacher is corrupt, of the wrong kind, or would need unpickling."""

    code = "invalid_model"


class NanLoss(PipelineError):
    code = "nan_loss"


class Cancelled(PipelineError):
    code = "cancelled"


class SpecError(PipelineError):
    """The spec is valid on its own but does not fit the models (e.g. a layer name)."""

    code = "invalid_spec"
