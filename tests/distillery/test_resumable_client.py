"""The client's resumable uploads against a live API: a part cut off is sent again alone, and
an upload cut off for good (the CLI killed) is resumed later without its finished parts."""

import hashlib

import httpx
import pytest

from distillery.client import Client

PART = 64 * 1024


class CountingTransport(httpx.HTTPTransport):
    """Counts the bytes of each part PUT; `fail(number, times)` cuts that part's PUTs."""

    def __init__(self, failures: dict[int, int] | None = None) -> None:
        super().__init__()
        self.failures = dict(failures or {})
        self.sent: list[tuple[int, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and "/parts/" in request.url.path:
            number = int(request.url.path.rsplit("/", 1)[1])
            if self.failures.get(number, 0) > 0:
                self.failures[number] -= 1
                raise httpx.WriteError("connection cut", request=request)
            self.sent.append((number, len(request.content)))
        return super().handle_request(request)


@pytest.fixture
def data_file(api, monkeypatch, tmp_path):
    import io

    import numpy as np

    monkeypatch.setattr(api.settings, "MIN_UPLOAD_PART_BYTES", PART)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    np.savez(buf, x=rng.random((700, 1, 8, 8), dtype=np.float32), y=np.arange(700) % 7)
    path = tmp_path / "large.npz"
    path.write_bytes(buf.getvalue())
    return path


def _client(api, transport, retries: int = 3) -> Client:
    return Client(
        api.url, api.key("alice"), transport=transport, retries=retries, sleep=lambda s: None
    )


def test_a_part_cut_off_is_sent_again_alone(api, data_file):
    transport = CountingTransport({2: 1})
    seen = []
    with _client(api, transport) as c:
        ds = c.upload_dataset(
            data_file, resumable=True, part_bytes=PART, on_progress=lambda d, t: seen.append((d, t))
        )
    size = data_file.stat().st_size
    assert ds.sha256 == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert ds.num_samples == 700 and ds.num_classes == 7
    numbers = [n for n, _ in transport.sent]
    assert sorted(numbers) == list(range(1, -(-size // PART) + 1))  # each once, 2 after its cut
    assert sum(b for _, b in transport.sent) == size
    assert seen[-1] == (size, size)


def test_an_upload_cut_off_for_good_resumes_without_its_finished_parts(api, data_file):
    size = data_file.stat().st_size
    parts = -(-size // PART)
    cut = CountingTransport({3: 99})  # part 3 never gets through: the client gives up
    with _client(api, cut, retries=1) as c, pytest.raises(httpx.TransportError):
        c.upload_dataset(data_file, resumable=True, part_bytes=PART)
    assert [n for n, _ in cut.sent] == [1, 2]
    again = CountingTransport()
    with _client(api, again) as c:
        ds = c.upload_dataset(data_file, resumable=True, part_bytes=PART)
    assert [n for n, _ in again.sent] == list(range(3, parts + 1))
    assert sum(b for _, b in again.sent) == size - 2 * PART  # parts 1 and 2 not sent again
    assert ds.sha256 == hashlib.sha256(data_file.read_bytes()).hexdigest()
    # Done: the next upload of the same file starts afresh (nothing remembered).
    fresh = CountingTransport()
    with _client(api, fresh) as c:
        assert c.upload_dataset(data_file, resumable=True, part_bytes=PART).id != ds.id
    assert sum(b for _, b in fresh.sent) == size


def test_the_async_client_uploads_in_parts_too(api, data_file):
    import asyncio

    from distillery.client import AsyncClient

    async def main():
        async with AsyncClient(api.url, api.key("alice")) as c:
            return await c.upload_dataset(data_file, resumable=True, part_bytes=PART)

    ds = asyncio.run(main())
    assert ds.bytes == data_file.stat().st_size and ds.num_samples == 700


def test_a_teacher_goes_up_in_parts_with_its_fields(api, data_file, tmp_path):
    from tests import factories

    path = factories.user_teacher((1, 8, 8), 10, tmp_path / "teacher.onnx", "onnx")
    with _client(api, CountingTransport()) as c:
        m = c.upload_model(path, resumable=True, part_bytes=PART, input_shape=[1, 8, 8])
    assert m.format == "onnx" and m.input_shape == [1, 8, 8] and m.num_classes == 10
    assert m.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
