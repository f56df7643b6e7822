"""A job's statuses and the moves between them, as data. The statuses themselves live in the
contract package (distillery_contract.states) the API, the worker and the client share."""

from __future__ import annotations

from distillery_contract.states import TERMINAL, JobStatus, StageStatus

__all__ = [
    "ACTIVE",
    "TERMINAL",
    "TRANSITIONS",
    "IllegalTransition",
    "JobStatus",
    "StageStatus",
    "check_transition",
]


ACTIVE = frozenset({JobStatus.RUNNING, JobStatus.CANCELLING})  # a worker owns the job

# Every move a job may make. Anything else is a bug, and raises IllegalTransition.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset(
        {
            JobStatus.RUNNING,  # claimed by a worker
            JobStatus.CANCELLED,  # cancelled before it started
        }
    ),
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.RUNNING,  # re-claimed: its worker stopped heartbeating
            JobStatus.QUEUED,  # released: its worker died, attempts remain
            JobStatus.CANCELLING,
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,  # the pipeline failed, or the worker was lost too often
            JobStatus.CANCELLED,  # the worker stopped it (cancel, or lost ownership)
        }
    ),
    JobStatus.CANCELLING: frozenset(
        {
            JobStatus.CANCELLED,
            JobStatus.SUCCEEDED,  # it finished before it saw the cancel
            JobStatus.FAILED,
        }
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    def __init__(self, job_id: str, frm: str, to: str) -> None:
        super().__init__(f"job {job_id}: {frm} -> {to} is not an allowed transition")
        self.frm, self.to = frm, to


def check_transition(job_id: str, frm: str, to: JobStatus) -> None:
    if to not in TRANSITIONS[JobStatus(frm)]:
        raise IllegalTransition(job_id, frm, to)


def sources(to: JobStatus) -> frozenset[JobStatus]:
    """The statuses a job may reach `to` from: the WHERE of a conditional UPDATE."""
    return frozenset(s for s, targets in TRANSITIONS.items() if to in targets)
