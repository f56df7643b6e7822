import os
import signal
import subprocess

import httpx
import pytest

from tests.service_support import cli, free_port, wait_until

# Tests run on 2 cores next to a worker and a database; keep torch from oversubscribing.
# (Nothing above imports torch, so this still takes effect.)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("embedded")
    port = free_port()
    log = open(home / "serve.log", "wb")
    # No DATABASE_URL / BROKER_URL: the embedded defaults. A key is made and printed.
    env = {
        "DISTILLERY_HOME": str(home / "home"),
        "OMP_NUM_THREADS": "1",
        "DATABASE_URL": "",
        "BROKER_URL": "",
        "DISTILLERY_API_KEY": "",
        "STORAGE_DIR": "",
    }
    proc = cli("serve", "--port", str(port), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 90, what="distillery serve")
        key = (home / "home" / "api_key").read_text().strip()
        assert f"API key: {key}" in (home / "serve.log").read_text()
        yield url, key, home
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
