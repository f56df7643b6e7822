"""One Settings object for the API, the workers and the CLI.

Embedded defaults need no services: SQLite for jobs, Celery over kombu's SQLAlchemy transport
on a SQLite file, artifacts under DISTILLERY_HOME. Set DATABASE_URL / BROKER_URL / STORAGE_DIR
for the distributed mode.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.pipeline.limits import RESIDENT_BYTES, DataSettings, SpecLimits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", env_ignore_empty=True)

    DISTILLERY_HOME: Path = Path(".distillery")
    DATABASE_URL: str | None = None  # default: sqlite file in DISTILLERY_HOME
    BROKER_URL: str | None = None  # default: kombu SQLAlchemy transport on a sqlite file
    # Where uploads, checkpoints and artifacts live (app/core/storage.py): `s3://bucket/prefix`
    # (any S3-compatible store), or a folder shared by API and workers (default STORAGE_DIR).
    STORAGE_URL: str | None = None
    STORAGE_DIR: Path | None = None  # default: DISTILLERY_HOME/storage; shared by API and workers
    # S3: each unset one comes from the standard AWS environment (AWS_ENDPOINT_URL, ...).
    S3_ENDPOINT_URL: str | None = None
    S3_REGION: str | None = None
    S3_ACCESS_KEY_ID: str | None = None
    S3_SECRET_ACCESS_KEY: str | None = None
    S3_CONNECT_TIMEOUT_SECONDS: float = 5.0
    S3_MULTIPART_BYTES: int = Field(64 * 1024**2, ge=5 * 1024**2)  # S3's smallest part: 5 MiB
    # Artifact downloads from a bucket: a redirect to a presigned URL valid this long (the
    # bytes never pass through the API), or `stream` them through the API.
    DOWNLOAD_MODE: Literal["redirect", "stream"] = "redirect"
    PRESIGN_EXPIRY_SECONDS: int = Field(3600, ge=1, le=7 * 24 * 3600)
    # A worker's own folder with a bucket: the jobs it runs and the uploads it read (by sha256).
    WORK_DIR: Path | None = None  # default: DISTILLERY_HOME/work
    # While a job runs on a bucket, its checkpoints go up at each stage's end and at most this
    # often in between: a job resumed on another worker loses at most this much of a stage.
    CHECKPOINT_SYNC_SECONDS: float = 60.0
    # Retention (off while unset): the reaper deletes the files of jobs that ended this many
    # days ago, and uploads no job used for this long (`distillery gc --dry-run` lists them).
    ARTIFACT_TTL_DAYS: float | None = Field(None, gt=0)
    UPLOAD_TTL_DAYS: float | None = Field(None, gt=0)
    # One reaper at a time (of all API and worker processes) looks at most this often, and
    # deletes at most RETENTION_BATCH jobs and as many uploads a pass (more: again shortly).
    RETENTION_INTERVAL_SECONDS: float = Field(3600.0, gt=0)
    RETENTION_BATCH: int = Field(200, ge=1)
    DATA_ROOT: Path | None = None  # torchvision datasets live (or are downloaded) here
    # How jobs read their data (worker/pipeline/limits.py DataSettings): DataLoader worker
    # processes that decode images and read batches (unset: the host's cores less one, at
    # most 8), and the bytes one prediction batch's activations may take (unset: a sixteenth
    # of the host's memory, at most 512 MiB; a quarter of the free GPU memory on CUDA).
    DATA_WORKERS: int | None = Field(None, ge=0)
    DATA_MEMORY_BUDGET_BYTES: int | None = Field(None, ge=1 << 20)
    # A dataset up to this many bytes (as float32) is held in memory; larger ones are read per
    # batch from disk. 0 reads every dataset per batch.
    DATA_RESIDENT_BYTES: int = Field(RESIDENT_BYTES, ge=0)
    ALLOW_DATASET_DOWNLOAD: bool = False  # may jobs ask torchvision to download?

    DISTILLERY_API_KEY: str | None = None  # ensured at start as a key of tenant "default"
    # /metrics counts every tenant's jobs: it answers only `Authorization: Bearer <this>`,
    # and is off (404) while unset.
    METRICS_TOKEN: str | None = None

    # JSON request bodies (job specs); uploads have MAX_UPLOAD_BYTES. 413 above, before parsing.
    MAX_REQUEST_BYTES: int = 1024**2
    MAX_UPLOAD_BYTES: int = 512 * 1024**2  # one request (POST /v1/datasets, /v1/models)
    # Resumable uploads (POST /v1/uploads, in parts): the largest file, the part sizes a client
    # may choose (S3 takes 5 MiB to 5 GiB, at most 10,000 parts), and how long an unfinished one
    # is kept (the reaper removes its parts after).
    MAX_RESUMABLE_UPLOAD_BYTES: int = 20 * 1024**3
    MIN_UPLOAD_PART_BYTES: int = Field(5 * 1024**2, ge=1)
    MAX_UPLOAD_PART_BYTES: int = Field(5 * 1024**3, ge=1)
    UPLOAD_SESSION_TTL_HOURS: float = Field(24.0, gt=0)
    MAX_OPEN_UPLOADS: int = Field(8, ge=1)  # unfinished ones per tenant: each claims its disk
    # The API refuses (507) a file its disk cannot hold with this much to spare, before
    # writing it; and (408) a body that sends nothing for this long (a slow or stalled client).
    UPLOAD_DISK_RESERVE_BYTES: int = Field(256 * 1024**2, ge=0)
    UPLOAD_READ_TIMEOUT_SECONDS: float = Field(60.0, gt=0)
    # An archive whose members expand to more than this many times its own size, once past
    # 64 MiB, is refused as a bomb from its headers before anything is extracted.
    MAX_ARCHIVE_RATIO: float = Field(100.0, gt=1)
    MAX_ARCHIVE_MEMBERS: int = 100_000
    MAX_ARCHIVE_BYTES: int = 4 * 1024**3

    # What one model of a spec may be (worker/pipeline/limits.py SpecLimits has the defaults'
    # reasons); checked at POST, by workers and by `distillery run`, before any model is built.
    MAX_SPEC_LIST_LENGTH: int = SpecLimits.max_list_length
    MAX_SPEC_NESTING: int = SpecLimits.max_nesting
    MAX_SPEC_LAYERS: int = SpecLimits.max_layers
    MAX_SPEC_PARAMS: int = SpecLimits.max_params
    MAX_SEARCH_CANDIDATES: int = SpecLimits.max_candidates

    DEFAULT_QUEUE: str = "default"
    # The queues a job spec may name (`"queue": "gpu"`; names or patterns like `gpu-*`): each
    # needs a worker that reads it (`distillery worker -Q gpu`). DEFAULT_QUEUE is always
    # allowed; WEBHOOK_QUEUE never is.
    JOB_QUEUES: list[str] = Field(default_factory=lambda: ["default", "gpu"])
    HEARTBEAT_SECONDS: float = 5.0
    HEARTBEAT_TIMEOUT_SECONDS: float = 60.0  # no heartbeat for this long: the worker is gone
    REAPER_INTERVAL_SECONDS: float = 10.0
    # A queued job whose message is older than this while its broker queue is empty lost its
    # message (e.g. Redis restarted without persistence): the reaper sends it again.
    RESEND_AFTER_SECONDS: float = 60.0
    MAX_ATTEMPTS: int = 3  # runs of one job (first + re-queues after a lost worker)
    JOB_TIMEOUT_SECONDS: float = 24 * 3600.0
    # Redis redelivers an unacknowledged message after this; it must outlast the longest stage.
    VISIBILITY_TIMEOUT_SECONDS: int = 12 * 3600
    PROGRESS_THROTTLE_SECONDS: float = 1.0
    # An Idempotency-Key names its job for this long (like Stripe's 24 h); after it, the same
    # key makes a new job (a CI re-run must not replay a failed job forever).
    IDEMPOTENCY_TTL_SECONDS: float = 24 * 3600.0

    # Webhooks (docs/service.md#webhooks). Safe by default: https only, and never a private,
    # loopback or link-local address (checked after DNS, at registration and at every send).
    WEBHOOK_ALLOW_HTTP: bool = False
    WEBHOOK_ALLOW_PRIVATE: bool = False
    WEBHOOK_QUEUE: str = "webhooks"  # consumed by `distillery worker -Q webhooks --pool threads`
    WEBHOOK_TIMEOUT_SECONDS: float = 10.0  # connect + answer, per attempt
    # Retries: base * 4^(n-1), each within +-25 %, at most RETRY_MAX apart (below the Redis
    # VISIBILITY_TIMEOUT_SECONDS, which would otherwise redeliver the waiting message), for
    # RETRY_FOR after the event: about ten attempts over a day with the defaults.
    WEBHOOK_RETRY_BASE_SECONDS: float = 5.0
    WEBHOOK_RETRY_MAX_SECONDS: float = 6 * 3600.0
    WEBHOOK_RETRY_FOR_SECONDS: float = 24 * 3600.0
    MAX_WEBHOOKS_PER_TENANT: int = 20

    # Under load (docs/service.md#under-load). Sync routes run on a pool of API_THREADS
    # threads; a request holds a database connection only while it runs on one of them, so
    # the pool is sized from the threads and a wait for a connection means the database itself
    # is slow: after DB_POOL_TIMEOUT_SECONDS the request gets 503 with Retry-After.
    API_THREADS: int = Field(40, ge=1, le=1000)
    DB_POOL_TIMEOUT_SECONDS: float = Field(5.0, gt=0)
    # Quotas per tenant (0: no limit). Requests and event streams are counted per API
    # process; active jobs (queued + running) and submissions across the whole service.
    TENANT_MAX_REQUESTS: int = Field(20, ge=0)  # at once, streams not counted
    TENANT_MAX_STREAMS: int = Field(100, ge=0)  # open GET /v1/jobs/{id}/events at once
    TENANT_MAX_ACTIVE_JOBS: int = Field(500, ge=0)
    TENANT_MAX_SUBMISSIONS_PER_MINUTE: int = Field(300, ge=0)
    # Event streams: one feed per API process reads new events for every open stream. With
    # PostgreSQL it wakes on NOTIFY and looks anyway every EVENTS_FALLBACK_SECONDS; with
    # SQLite it looks every EVENTS_POLL_SECONDS while any stream is open.
    EVENTS_POLL_SECONDS: float = Field(0.5, gt=0)
    EVENTS_FALLBACK_SECONDS: float = Field(5.0, gt=0)
    EVENTS_HEARTBEAT_SECONDS: float = Field(15.0, gt=0)
    # Where clients reach the API (https://distillery.example.com), for the absolute `url` of
    # artifacts; unset, artifact urls are relative to the API (never built from Host).
    PUBLIC_URL: str | None = None

    LOG_LEVEL: str = Field("INFO")

    @cached_property
    def home(self) -> Path:
        return self.DISTILLERY_HOME.resolve()

    @property
    def database_url(self) -> str:
        return self.DATABASE_URL or f"sqlite:///{self.home / 'distillery.db'}"

    @property
    def broker_url(self) -> str:
        return self.BROKER_URL or f"sqla+sqlite:///{self.home / 'broker.db'}"

    def queue_allowed(self, queue: str) -> bool:
        """A job may name DEFAULT_QUEUE or a queue JOB_QUEUES lists (a name, or a pattern
        such as `gpu-*`), never WEBHOOK_QUEUE."""
        if queue == self.WEBHOOK_QUEUE:
            return False
        return queue == self.DEFAULT_QUEUE or any(fnmatchcase(queue, p) for p in self.JOB_QUEUES)

    @property
    def storage_dir(self) -> Path:
        return (self.STORAGE_DIR or self.home / "storage").resolve()

    @property
    def work_dir(self) -> Path:
        return (self.WORK_DIR or self.home / "work").resolve()

    @property
    def data_root(self) -> Path:
        return (self.DATA_ROOT or self.home / "data").resolve()

    def data_settings(self) -> DataSettings:
        return DataSettings(
            workers=self.DATA_WORKERS,
            memory_budget_bytes=self.DATA_MEMORY_BUDGET_BYTES,
            resident_bytes=self.DATA_RESIDENT_BYTES,
        )

    def spec_limits(self) -> SpecLimits:
        # Built at each call, not cached: a test may change a setting of a live app.
        return SpecLimits(
            max_list_length=self.MAX_SPEC_LIST_LENGTH,
            max_nesting=self.MAX_SPEC_NESTING,
            max_layers=self.MAX_SPEC_LAYERS,
            max_params=self.MAX_SPEC_PARAMS,
            max_candidates=self.MAX_SEARCH_CANDIDATES,
        )


settings = Settings()
