from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    kind: Literal["npz", "imagefolder"]
    bytes: int
    sha256: str
    num_samples: int
    num_classes: int
    input_shape: list[int]
    class_names: list[str]
    created_at: datetime


class ModelPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    format: Literal["torchscript", "onnx", "safetensors"]
    arch: str | None
    arch_kwargs: dict[str, Any]
    bytes: int
    sha256: str
    input_shape: list[int] | None
    num_classes: int | None
    created_at: datetime
