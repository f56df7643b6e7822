"""The statuses a client reads (`distillery.JobStatus`, `distillery.states.TERMINAL`): their
home is the contract package the service and the worker share (distillery_contract.states)."""

from __future__ import annotations

from distillery_contract.states import TERMINAL, JobStatus, StageStatus

__all__ = ["TERMINAL", "JobStatus", "StageStatus"]
