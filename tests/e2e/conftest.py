"""Real processes: `distillery api` + `distillery worker` on PostgreSQL and Redis."""

import pytest

from tests.service_support import running_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("stack")) as s:
        yield s
