"""Bad input never gets a 5xx, a stack trace, or code execution.

Everything goes through the live API (SQLite and PostgreSQL, real HTTP): the whole OpenAPI
surface fuzzed with schemathesis; pickles that would run code, dressed as every model format;
hostile archives; malformed arrays; and every numeric bound of the job spec, at and just past it.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import os
import pickle
import re
import stat
import struct
import tarfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from sqlalchemy import func, select

from app.core.storage import safe_filename
from app.models import Dataset, Tenant, UploadedModel
from tests.service_support import TINY_SPEC, assert_no_server_path
from worker.pipeline.spec import JobSpec

pytestmark = pytest.mark.reliability


def _refused(r, code: str) -> str:
    """Assert a 422 with the service's error shape and `code`; return its message."""
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code, r.text
    return r.json()["error"]["message"]


# --- 1. the whole OpenAPI surface, fuzzed -------------------------------------------------

# Per operation and generation mode; derandomized so a CI failure reproduces. No shrinking:
# the first failing case is reported as a curl command, which is enough to reproduce it.
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture
def a_live_worker(api):
    """A worker row for the API's queue: without one /readyz answers its documented 503,
    which is readiness, not a server error."""
    from app.jobs import workers

    queues = [api.settings.DEFAULT_QUEUE]
    with api.db.session() as s:
        workers.register_worker(s, worker="fuzz:1", hostname="fuzz", pid=1, queues=queues)
    yield
    with api.db.session() as s:
        workers.forget_worker(s, worker="fuzz:1")


def test_fuzzing_every_operation_gets_no_server_error_and_no_traceback(api, a_live_worker):
    auth = {"Authorization": f"Bearer {api.key('fuzzer')}"}
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json", timeout=10)
    seen: dict[str, set[int]] = {}

    def check(case) -> None:
        # A timeout so no case can hang (the event stream of a job that never ends).
        response = case.call(base_url=api.url, timeout=10)
        seen.setdefault(case.operation.label, set()).add(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])
        assert "Traceback" not in response.text, case.as_curl_command()
        if response.status_code >= 400:  # every refusal in the service's error shape
            assert set(response.json()["error"]) == {"code", "message"}, case.as_curl_command()

    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            run = FUZZ(given(case=operation.as_strategy(generation_mode=mode, headers=auth))(check))
            try:
                run()
            except Unsatisfiable:
                # Nothing in the operation can be made invalid (no parameters, or only free
                # strings): there are no negative cases to send.
                assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
    # The run reached every operation and got past authentication into the handlers.
    assert {op.label for op in operations} <= set(seen)
    assert 201 in seen["POST /v1/jobs"] and 422 in seen["POST /v1/jobs"]
    assert 422 in seen["POST /v1/datasets"] and 422 in seen["POST /v1/models"]


# --- 2. pickles never run -----------------------------------------------------------------


class _Trap:
    """Unpickling this makes the directory `path`: proof that a loader ran code it was given."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _pickled(marker: Path) -> bytes:
    return pickle.dumps(_Trap(marker), protocol=2)  # GLOBAL 'posix mkdir', then REDUCE


def _checkpoint(marker: Path) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(_Trap(marker), buf)  # a real torch.save zip: archive/data.pkl
    return buf.getvalue()


def _scripted(marker: Path, protocol: int = 2) -> bytes:
    """Laid out like torch.jit.save output, so a check of the layout alone would pass it."""
    trap = pickle.dumps(_Trap(marker), protocol=protocol)  # protocol 4: STACK_GLOBAL
    return _zip_bytes(
        {
            "archive/code/__torch__/model.py": b"class Model(Module):\n  pass\n",
            "archive/constants.pkl": trap,
            "archive/data.pkl": trap,
            "archive/version": b"3",
        }
    )


NOT_TORCHSCRIPT = "not a TorchScript archive"
PYTHON_PICKLE = "is a Python pickle"
# (file name, body, form fields, what the refusal says)
TRAPS = {
    "pt": ("trap.pt", _pickled, {}, NOT_TORCHSCRIPT),
    "pth": ("trap.pth", _pickled, {}, NOT_TORCHSCRIPT),
    "ts": ("trap.ts", _pickled, {}, NOT_TORCHSCRIPT),
    "onnx": ("trap.onnx", _pickled, {}, "not a valid ONNX model"),
    "safetensors": ("trap.safetensors", _pickled, {"arch": "cnn_tiny"}, "not a safetensors file"),
    "torch.save zip": ("checkpoint.pt", _checkpoint, {}, "a torch.save pickle"),
    "zip with data.pkl": (
        "plain.pt",
        lambda m: _zip_bytes({"data.pkl": _pickled(m)}),
        {},
        "a torch.save pickle",
    ),
    "TorchScript layout": (
        "scripted.pt",
        _scripted,
        {},
        f"{PYTHON_PICKLE} that would call posix.mkdir",
    ),
    "TorchScript layout, protocol 4": (
        "scripted.pt",
        lambda m: _scripted(m, protocol=4),
        {},
        f"{PYTHON_PICKLE} (opcode STACK_GLOBAL)",
    ),
    "format=torchscript": ("trap.pkl", _pickled, {"format": "torchscript"}, NOT_TORCHSCRIPT),
    "format=onnx": ("trap.pkl", _pickled, {"format": "onnx"}, "not a valid ONNX model"),
    "format=safetensors": (
        "trap.pkl",
        _pickled,
        {"format": "safetensors", "arch": "cnn_tiny"},
        "not a safetensors file",
    ),
    "format=torchscript, TorchScript layout": (
        "weights.bin",
        _scripted,
        {"format": "torchscript"},
        f"{PYTHON_PICKLE} that would call posix.mkdir",
    ),
    "no format": ("trap.pkl", _pickled, {}, "Pickled checkpoints are not accepted"),
}


def test_the_trap_runs_code_when_unpickled(tmp_path):
    """The payloads are live: were the API to unpickle one, its marker would appear."""
    pickle.loads(_pickled(tmp_path / "plain"))
    assert (tmp_path / "plain").is_dir()
    buf = io.BytesIO()
    np.savez(buf, x=np.array([_Trap(tmp_path / "npz")], dtype=object))
    np.load(io.BytesIO(buf.getvalue()), allow_pickle=True)["x"]
    assert (tmp_path / "npz").is_dir()


@pytest.mark.parametrize("name,build,fields,message", TRAPS.values(), ids=TRAPS.keys())
def test_pickles_in_every_model_format_are_refused_and_never_run(
    api, tmp_path, name, build, fields, message
):
    marker = tmp_path / "pwned"
    with api.client("pickler") as c:
        r = c.post("/v1/models", files={"file": (name, build(marker))}, data=fields)
    assert message in _refused(r, "invalid_upload")
    assert not marker.exists()
    assert _rows(api, UploadedModel, "pickler", name) == 0


def test_a_pickled_object_array_in_an_npz_is_refused_and_never_run(api, tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    # np.savez pickles object arrays (allow_pickle=True when saving); loading one would run it.
    np.savez(buf, x=np.array([_Trap(marker)] * 4, dtype=object), y=np.arange(4) % 2)
    with api.client("pickler") as c:
        r = c.post("/v1/datasets", files={"file": ("objects.npz", buf.getvalue())})
    assert "holds object arrays" in _refused(r, "invalid_upload")
    assert not marker.exists()
    assert _rows(api, Dataset, "pickler") == 0


# --- 3. hostile archives --------------------------------------------------------------------


def _rows(api, table, tenant: str, filename: str | None = None) -> int:
    """How many upload rows of `table` the tenant has (with that file name, if given)."""
    with api.db.session() as s:
        query = (
            select(func.count())
            .select_from(table)
            .join(Tenant, Tenant.id == table.tenant_id)
            .where(Tenant.name == tenant)
        )
        if filename is not None:
            query = query.where(table.filename == safe_filename(filename))
        return s.scalar(query)


def _tar_bytes(entries: list[tuple[str, bytes, dict]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data, attrs in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for key, value in attrs.items():
                setattr(info, key, value)
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


@functools.cache  # one 67 M-pixel canvas to encode, not one per database
def _blank_png(width: int, height: int) -> bytes:
    """A PNG of a blank canvas: 65 KB for 8200 x 8200, 202 MB once decoded to RGB."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _deflated(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _lying_zip(real: int, claimed: int) -> bytes:
    """One member of `real` zero bytes whose headers claim `claimed` bytes (a zip bomb)."""
    raw = bytearray(_deflated({"zeros.bin": b"\0" * real}))
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    # Uncompressed-size field: offset 22 in the local header, 24 in the central directory.
    for offset in (local + 22, central + 24):
        assert struct.unpack_from("<I", raw, offset)[0] == real
        struct.pack_into("<I", raw, offset, claimed)
    return bytes(raw)


def _damaged_zip() -> bytes:
    """A deflated member whose compressed bytes are flipped: zlib, not zipfile, notices."""
    raw = bytearray(_deflated({"cats/a.txt": b"meow " * 20000}))
    start = raw.find(b"cats/a.txt") + len("cats/a.txt") + 20
    for i in range(start, start + 64):
        raw[i] ^= 0x5A
    return bytes(raw)


def _symlink_zip(outside: Path) -> bytes:
    link = zipfile.ZipInfo("escape")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(link, str(outside))
        zf.writestr("escape/evil.txt", b"pwned")  # through the link, were it made
    return buf.getvalue()


def _escape(target: Path) -> str:
    """A member name that climbs out of any extraction folder to `target`."""
    return "../" * 40 + str(target).lstrip("/")


@dataclass
class Hostile:
    name: str
    body: bytes
    message: str
    absent: Path | None = None  # where a naive extractor would write; must not exist after


PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


def _cut(body: bytes) -> bytes:
    return body[: len(body) // 2]  # random bytes do not compress: the cut lands in member data


# Each built inside a test's tmp folder, which holds outside/ (empty) and secret.txt: a naive
# extractor would write to tmp/target.txt, into outside/, or over secret.txt.
HOSTILE = {
    "zip-slip": lambda tmp: Hostile(
        "slip.zip",
        _deflated({"cats/0.png": PNG, _escape(tmp / "target.txt"): b"pwned"}),
        "points outside the archive (..)",
        tmp / "target.txt",
    ),
    "tar-slip": lambda tmp: Hostile(
        "slip.tar.gz",
        _tar_bytes([("cats/0.png", PNG, {}), (_escape(tmp / "target.txt"), b"pwned", {})]),
        "points outside the archive (..)",
        tmp / "target.txt",
    ),
    "zip-absolute": lambda tmp: Hostile(
        "abs.zip",
        _deflated({str(tmp / "target.txt"): b"pwned"}),
        "has an absolute path",
        tmp / "target.txt",
    ),
    "tar-absolute": lambda tmp: Hostile(
        "abs.tar.gz",
        _tar_bytes([(str(tmp / "target.txt"), b"pwned", {})]),
        "has an absolute path",
        tmp / "target.txt",
    ),
    "zip-symlink": lambda tmp: Hostile(
        "link.zip", _symlink_zip(tmp / "outside"), "is a symbolic link", tmp / "outside/evil.txt"
    ),
    "tar-symlink": lambda tmp: Hostile(
        "link.tar.gz",
        _tar_bytes(
            [
                ("escape", b"", {"type": tarfile.SYMTYPE, "linkname": str(tmp / "outside")}),
                ("escape/evil.txt", b"pwned", {}),
            ]
        ),
        "is a link",
        tmp / "outside/evil.txt",
    ),
    "tar-hardlink": lambda tmp: Hostile(
        "hard.tar.gz",
        _tar_bytes(
            [
                ("h", b"", {"type": tarfile.LNKTYPE, "linkname": str(tmp / "secret.txt")}),
                ("h", b"pwned", {}),
            ]
        ),
        "is a link",
    ),
    "tar-fifo": lambda tmp: Hostile(
        "fifo.tar.gz",
        _tar_bytes([("cats/pipe", b"", {"type": tarfile.FIFOTYPE})]),
        "is not a regular file",
    ),
    # The test caps MAX_ARCHIVE_BYTES at 1 MiB: these are a few KB that expand to 5 MB.
    "zip-bomb-lying-header": lambda tmp: Hostile(
        "bomb.zip", _lying_zip(5 << 20, 100), "corrupt or truncated archive (Bad CRC-32"
    ),
    "zip-compressible": lambda tmp: Hostile(
        "zeros.zip",
        _deflated({"cats/zeros.bin": b"\0" * (5 << 20)}),
        f"archive expands to {5 << 20} bytes; the cap is {1 << 20}",
    ),
    "tar-compressible": lambda tmp: Hostile(
        "zeros.tar.gz",
        _tar_bytes([("cats/zeros.bin", b"\0" * (5 << 20), {})]),
        f"archive expands past the {1 << 20} byte cap",
    ),
    "zip-too-many-members": lambda tmp: Hostile(
        "many.zip",
        _deflated({f"cats/{i}.png": PNG for i in range(11)}),
        "archive has 11 members; the cap is 10",
    ),
    "zip-truncated": lambda tmp: Hostile(
        "cut.zip",
        _cut(_deflated({"cats/a.bin": os.urandom(64 << 10)})),
        "cut.zip: corrupt or truncated archive",
    ),
    "tar-truncated": lambda tmp: Hostile(
        "cut.tar.gz",
        _cut(_tar_bytes([("cats/a.bin", os.urandom(64 << 10), {})])),
        "cut.tar.gz: corrupt or truncated archive",
    ),
    "zip-damaged-data": lambda tmp: Hostile(
        "damaged.zip", _damaged_zip(), "damaged.zip: corrupt or truncated archive"
    ),
    # The OS refuses to write these members; its error names the target on the server.
    "zip-name-too-long": lambda tmp: Hostile(
        "long.zip",
        _deflated({f"cats/{'a' * 300}.png": PNG}),
        f"long.zip: cannot extract member 'cats/{'a' * 300}.png' (File name too long)",
    ),
    "zip-file-and-folder": lambda tmp: Hostile(
        "clash.zip",
        _deflated({"cats": b"a file", "cats/0.png": PNG}),
        "clash.zip: cannot extract member 'cats' (File exists)",
    ),
    "zip-pixel-bomb": lambda tmp: Hostile(
        "canvas.zip",
        _deflated({"cats/canvas.png": _blank_png(8200, 8200)}),
        "cannot decode cats/canvas.png (8200x8200 pixels is over the limit of 67108864",
    ),
}


def _storage_entries(api) -> set[Path]:
    """Every file, folder and link under the storage root (uploads and the API's scratch space)."""
    return set(api.settings.storage_dir.rglob("*"))


@pytest.mark.parametrize("build", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_archives_are_refused_and_write_nothing(api, tmp_path, monkeypatch, build):
    monkeypatch.setattr(api.settings, "MAX_ARCHIVE_BYTES", 1 << 20)
    monkeypatch.setattr(api.settings, "MAX_ARCHIVE_MEMBERS", 10)
    (tmp_path / "outside").mkdir()
    (tmp_path / "secret.txt").write_bytes(b"original")
    hostile = build(tmp_path)
    name = f"{uuid.uuid4().hex[:8]}-{hostile.name}"
    before = _storage_entries(api)
    with api.client("archivist") as c:
        r = c.post("/v1/datasets", files={"file": (name, hostile.body)})
    message = _refused(r, "invalid_upload")
    assert hostile.message in message
    assert_no_server_path(message, api.settings)
    if hostile.absent is not None:
        assert not os.path.lexists(hostile.absent)
    assert not list((tmp_path / "outside").iterdir())
    assert (tmp_path / "secret.txt").read_bytes() == b"original"  # a hard link's target
    assert _storage_entries(api) == before  # no upload kept, no extraction left behind
    assert _rows(api, Dataset, "archivist", name) == 0


# --- 4. arrays that are not a dataset -------------------------------------------------------


def _rows_x(n: int = 12, d: int = 3) -> np.ndarray:
    return np.random.default_rng(0).random((n, d), dtype=np.float32)


def _labels(n: int = 12, k: int = 3) -> np.ndarray:
    return np.arange(n) % k


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _raw_member_npz() -> bytes:
    """x is a zip member without the .npy header: np.load would hand back its bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", b"not an array at all")
        with zf.open("y.npy", "w") as f:
            np.save(f, _labels())
    return buf.getvalue()


def _with(x: np.ndarray, index, value) -> np.ndarray:
    x = x.astype(np.float64)
    x[index] = value
    return x


BAD_ARRAYS = {
    "object x": (
        lambda: _npz(x=np.array([{"a": 1}] * 12, dtype=object), y=_labels()),
        "holds object arrays",
    ),
    "string x": (lambda: _npz(x=np.array([["a"] * 3] * 12), y=_labels()), "x has dtype <U1"),
    "complex x": (
        lambda: _npz(x=_rows_x() * (1 + 1j), y=_labels()),
        "x has dtype complex64; expected a numeric array",
    ),
    "string y": (
        lambda: _npz(x=_rows_x(), y=np.array(["cat", "dog", "eel"] * 4)),
        "y has dtype <U3; expected integer class labels",
    ),
    "complex y": (
        lambda: _npz(x=_rows_x(), y=_labels() + 0j),
        "y has dtype complex128; expected integer class labels",
    ),
    "NaN in x": (lambda: _npz(x=_with(_rows_x(), (3, 1), np.nan), y=_labels()), "NaN or infinite"),
    "inf in x": (lambda: _npz(x=_with(_rows_x(), (5, 0), -np.inf), y=_labels()), "NaN or infinite"),
    "x overflows float32": (
        lambda: _npz(x=_with(_rows_x(), (0, 0), 1e300), y=_labels()),
        "NaN or infinite",
    ),
    "label beyond the named classes": (
        lambda: _npz(x=_rows_x(), y=_labels(k=4), classes=np.array(["a", "b", "c"])),
        "label 3 is out of range for 3 classes",
    ),
    "a class with no samples": (
        lambda: _npz(x=_rows_x(), y=_labels(k=3) * 2),
        "classes [1, 3] have no samples",
    ),
    "a label of 2**40": (
        lambda: _npz(x=_rows_x(), y=np.r_[_labels(11), 2**40]),
        "1099511627777 classes but only 12 samples",
    ),
    "negative label": (
        lambda: _npz(x=_rows_x(), y=np.r_[_labels(11), -1]),
        "label -1 is out of range",
    ),
    "float labels": (lambda: _npz(x=_rows_x(), y=_labels() + 0.5), "non-integer values"),
    "NaN label": (
        lambda: _npz(x=_rows_x(), y=np.r_[_labels(11), np.nan]),
        "non-integer values",
    ),
    "empty arrays": (
        lambda: _npz(x=np.zeros((0, 3), np.float32), y=np.zeros(0, np.int64)),
        "the dataset is empty",
    ),
    "rows without features": (
        lambda: _npz(x=np.zeros((12, 0), np.float32), y=_labels()),
        "x has shape (12, 0): each sample is empty",
    ),
    "images without pixels": (
        lambda: _npz(x=np.zeros((12, 1, 0, 0), np.float32), y=_labels()),
        "x has shape (12, 1, 0, 0): each sample is empty",
    ),
    "mismatched lengths": (
        lambda: _npz(x=_rows_x(), y=_labels(11)),
        "x has 12 samples but y has 11 labels",
    ),
    "x with 3 dims": (
        lambda: _npz(x=np.zeros((12, 4, 4), np.float32), y=_labels()),
        "x has shape (12, 4, 4); expected images (N,C,H,W) or feature rows (N,D)",
    ),
    "x with 1 dim": (
        lambda: _npz(x=np.zeros(12, np.float32), y=_labels()),
        "x has shape (12,); expected images",
    ),
    "y with 2 dims": (
        lambda: _npz(x=_rows_x(), y=_labels().reshape(6, 2)),
        "y has shape (6, 2); expected one label per sample",
    ),
    "channels last": (
        lambda: _npz(x=np.zeros((12, 32, 32, 3), np.uint8), y=_labels()),
        "x has 32 channels (shape (12, 32, 32, 3)); images must be N,C,H,W with C first",
    ),
    "missing y": (lambda: _npz(x=_rows_x()), "missing array(s) ['y']"),
    "one class": (lambda: _npz(x=_rows_x(), y=np.zeros(12, np.int64)), "at least 2 classes"),
    "a class with one sample": (
        lambda: _npz(x=_rows_x(), y=np.r_[_labels(11, 2), 2]),
        "class 2 has 1 sample(s)",
    ),
    "x not a .npy member": (_raw_member_npz, "x must be .npy arrays"),
    "arrays expanding past MAX_ARCHIVE_BYTES": (
        # ~1 MB of zeros, which np.savez_compressed shrinks to a few KB; the cap is 256 KiB.
        lambda: _compressed(x=np.zeros((1024, 256), np.float32), y=_labels(1024)),
        "its arrays expand to",
    ),
}


def _compressed(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("build,message", BAD_ARRAYS.values(), ids=BAD_ARRAYS.keys())
def test_malformed_arrays_are_refused_naming_the_problem(api, monkeypatch, build, message):
    monkeypatch.setattr(api.settings, "MAX_ARCHIVE_BYTES", 256 << 10)
    name = f"{uuid.uuid4().hex[:8]}.npz"
    with api.client("arrays") as c:
        r = c.post("/v1/datasets", files={"file": (name, build())})
    assert message in _refused(r, "invalid_upload")
    assert _rows(api, Dataset, "arrays", name) == 0


def test_boolean_features_are_a_dataset(api):
    """0/1 features are numeric data (one-hot, flags), so bool x is accepted as 0.0/1.0."""
    with api.client("arrays") as c:
        r = c.post(
            "/v1/datasets",
            files={"file": ("flags.npz", _npz(x=_rows_x() > 0.5, y=_labels()))},
        )
    assert r.status_code == 201, r.text
    assert r.json()["input_shape"] == [3] and r.json()["num_classes"] == 3


# --- 5. every numeric bound of the spec -----------------------------------------------------

PHRASES = {
    "minimum": "greater than or equal to",
    "maximum": "less than or equal to",
    "exclusiveMinimum": "greater than",
    "exclusiveMaximum": "less than",
}


@dataclass(frozen=True)
class Bound:
    loc: tuple[str, ...]  # as validation errors name the field: union tags included
    tags: frozenset[int]  # positions in loc that are a union's tag (its `source`), not a key
    kind: str  # minimum | maximum | exclusiveMinimum | exclusiveMaximum
    value: float
    integer: bool

    def __str__(self) -> str:
        return f"{'.'.join(self.loc)}-{self.kind}={self.value}"

    def step(self, inward: bool) -> float:
        """The nearest representable value just past the bound (or just inside it)."""
        up = self.kind in ("maximum", "exclusiveMaximum")
        outward = 1 if up else -1
        direction = -outward if inward else outward
        if self.integer:
            return int(self.value) + direction
        return math.nextafter(self.value, math.inf * direction)


def _spec_bounds() -> list[Bound]:
    """Every numeric field of JobSpec with a bound, found by walking its JSON schema."""
    schema = JobSpec.model_json_schema()
    defs = schema["$defs"]

    def resolve(node: dict) -> dict:
        return defs[node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else node

    out: list[Bound] = []

    def walk(node: dict, loc: tuple[str, ...], tags: frozenset[int]) -> None:
        node = resolve(node)
        if "oneOf" in node:  # a tagged union: errors name the branch by its source
            for option in node["oneOf"]:
                tag = resolve(option)["properties"]["source"]["const"]
                walk(option, (*loc, tag), tags | {len(loc)})
        for option in node.get("anyOf", []):  # X | None
            walk(option, loc, tags)
        for name, prop in node.get("properties", {}).items():
            walk(prop, (*loc, name), tags)
        if node.get("type") in ("integer", "number"):
            for kind in PHRASES:
                if kind in node:
                    out.append(Bound(loc, tags, kind, node[kind], node["type"] == "integer"))

    walk(schema, (), frozenset())
    return out


BOUNDS = _spec_bounds()

# A small valid spec per union branch and for optional objects with required fields.
BRANCHES = {
    ("dataset", "builtin"): {"source": "builtin", "name": "digits", "max_samples": 300},
    ("dataset", "torchvision"): {"source": "torchvision", "name": "MNIST"},
    ("dataset", "npz"): {"source": "npz", "path": "/srv/data.npz"},
    ("dataset", "imagefolder"): {"source": "imagefolder", "path": "/srv/images.zip"},
    ("dataset", "upload"): {"source": "upload", "id": "<uploaded>"},
    ("teacher", "train"): {"source": "train", "arch": "cnn_tiny", "epochs": 2},
}
OBJECTS = {("distill", "feature"): {"teacher_layer": "features.0", "student_layer": "features.0"}}
# The service refuses these sources for every value: they read a path on the server.
SERVER_PATHS = {("dataset", "npz"), ("dataset", "imagefolder")}


def _spec_with(bound: Bound, value, dataset_id: str) -> dict:
    spec = copy.deepcopy(TINY_SPEC)
    node, keys = spec, ()
    for i, part in enumerate(bound.loc[:-1]):
        if i in bound.tags:
            continue
        keys = (*keys, part)
        if i + 1 in bound.tags:
            node[part] = copy.deepcopy(BRANCHES[(*keys, bound.loc[i + 1])])
            if node[part].get("source") == "upload":
                node[part]["id"] = dataset_id
        else:
            node[part] = {**OBJECTS.get(keys, {}), **(node.get(part) or {})}
        node = node[part]
    node[bound.loc[-1]] = value
    return spec


def _stored(job: dict, bound: Bound):
    node = job["spec"]
    for i, part in enumerate(bound.loc):
        if i not in bound.tags:
            node = node[part]
    return node


def test_the_walk_finds_the_bounds_of_nested_and_union_fields():
    found = {".".join(b.loc) for b in BOUNDS}
    assert {
        "dataset.builtin.test_fraction",
        "dataset.upload.image_size",
        "teacher.train.lr",
        "distill.feature.weight",
        "prune.amount",
        "quantize.calibration_samples",
        "evaluate.threads",
        "seed",
    } <= found
    assert len(BOUNDS) > 50


@pytest.fixture(scope="module")
def image_dataset(api) -> str:
    """An ImageFolder upload of tenant 'bounds', so dataset.upload.image_size matters."""
    from PIL import Image

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for cls, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
            for i in range(3):
                img = io.BytesIO()
                Image.new("RGB", (10, 10), colour).save(img, format="PNG")
                zf.writestr(f"{cls}/{i}.png", img.getvalue())
    with api.client("bounds") as c:
        r = c.post("/v1/datasets", files={"file": ("colours.zip", buf.getvalue())})
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.mark.parametrize("bound", BOUNDS, ids=str)
def test_every_numeric_spec_bound_holds_exactly(api, image_dataset, bound):
    dotted = ".".join(bound.loc)
    # The whole message: one problem, this field, this side ("greater than" must not pass for
    # "greater than or equal to").
    out_of_bounds = re.escape(f"{dotted}: Input should be {PHRASES[bound.kind]} ") + r"-?[\d.e+]+"
    server_path = bound.loc[:2] in SERVER_PATHS
    exclusive = bound.kind.startswith("exclusive")

    def accepted(value) -> None:
        r = c.post("/v1/jobs", json=_spec_with(bound, value, image_dataset))
        if server_path:
            # In range, so the schema passes it; the service then refuses the server path.
            assert f"dataset.source: '{bound.loc[1]}' reads a path on the server" in _refused(
                r, "invalid_spec"
            )
        else:
            assert r.status_code == 201, r.text
            assert _stored(r.json(), bound) == value

    def refused(value) -> None:
        r = c.post("/v1/jobs", json=_spec_with(bound, value, image_dataset))
        assert re.fullmatch(out_of_bounds, _refused(r, "invalid_spec")), (value, r.text)

    with api.client("bounds") as c:
        refused(bound.step(inward=False))
        if exclusive:
            refused(bound.value)
            accepted(bound.step(inward=True))
        else:
            accepted(bound.value)


# --- found while writing this module: each was a 5xx (or a hang-up) before its fix ----------


def test_values_a_database_cannot_hold_are_refused_not_a_server_error(api):
    with api.client("fuzzer") as c:
        for path in (
            "/v1/jobs/job_%00",
            "/v1/jobs/job_%00/events",
            "/v1/datasets/ds_%00",
            "/v1/models/mdl_%00",
        ):
            r = c.get(path)
            # SQLite looks the id up and finds nothing; PostgreSQL cannot hold a NUL at all.
            assert r.status_code in (404, 422) and set(r.json()) == {"error"}, (path, r.text)
        assert c.get("/v1/jobs", params={"after": "job_\x00"}).status_code in (404, 422)
        for spec, field in (
            ({**TINY_SPEC, "name": "a\x00b"}, "name: Value error, must not contain NUL"),
            (
                {**TINY_SPEC, "dataset": {"source": "upload", "id": "ds_\x00"}},
                "dataset.upload.id: Value error, must not contain NUL",
            ),
        ):
            assert field in _refused(c.post("/v1/jobs", json=spec), "invalid_spec")
        for body, field in (
            (b'{"gates": {"min_accuracy": NaN}}', "gates.min_accuracy: Input should be a finite"),
            (
                b'{"distill": {"feature": {"teacher_layer": "features.0", '
                b'"student_layer": "features.0", "weight": Infinity}}}',
                "distill.feature.weight: Input should be a finite number",
            ),
            (
                b'{"dataset": {"source": "upload", "id": "x"}, "student": {"arch": "mlp", '
                b'"arch_kwargs": {"dropout": NaN}}}',
                "student: Value error, arch_kwargs hold nan",
            ),
            (b"\xb6\xfc", "body: not a readable JSON document"),  # not UTF-8
            (b"[" * 100_000, "body: not a readable JSON document"),  # past the parser's depth
        ):
            r = c.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
            assert field in _refused(r, "invalid_spec"), body[:40]


def test_model_upload_fields_that_broke_the_server_are_refused(api, tmp_path):
    from worker.pipeline.archs import build_model
    from worker.pipeline.export import export_safetensors

    model = build_model("cnn_tiny", (1, 8, 8), 4)
    path = export_safetensors(model, tmp_path / "t.safetensors", arch="cnn_tiny", arch_kwargs={})
    weights = path.read_bytes()
    with api.client("fuzzer") as c:
        # '²' passes str.isdigit but not int(); 5000 digits pass neither int() nor a DB column.
        for value in ("²", "9" * 5000, "99999999999", "1"):
            r = c.post("/v1/models", files={"file": ("m.onnx", b"xx")}, data={"num_classes": value})
            assert "num_classes: expected an integer from 2 to" in _refused(r, "invalid_upload")
        for kwargs, message in (
            ("[" * 100_000, "arch_kwargs: nested too deeply"),
            ('{"widths": [NaN]}', "arch_kwargs: arch_kwargs hold nan"),
        ):
            r = c.post(
                "/v1/models",
                files={"file": ("t.safetensors", weights)},
                data={"arch": "cnn_tiny", "arch_kwargs": kwargs},
            )
            assert message in _refused(r, "invalid_upload")
        # zlib, not zipfile, notices flipped bytes in a deflated member.
        r = c.post("/v1/models", files={"file": ("damaged.pt", _damaged_zip())})
        assert "damaged.pt: corrupt TorchScript archive" in _refused(r, "invalid_upload")
        # Laid out like TorchScript, with 64 MB of zeros deflated to ~64 KB: refused from the
        # declared sizes, before the CRC check would inflate it.
        bomb = _deflated({"m/code/m.py": b"", "m/constants.pkl": b"", "m/data/0": bytes(64 << 20)})
        r = c.post("/v1/models", files={"file": ("bomb.pt", bomb)})
        assert "bomb.pt: archive would expand to 67,108,864 bytes" in _refused(r, "invalid_upload")
