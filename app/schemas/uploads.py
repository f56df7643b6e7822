"""What the API says about uploads: the public models of the thin client package."""

from __future__ import annotations

from distillery.schemas import DatasetPublic, DatasetsPublic, ModelPublic, ModelsPublic

__all__ = ["DatasetPublic", "DatasetsPublic", "ModelPublic", "ModelsPublic"]
