"""The dashboard's files as the API serves them: everything from this origin, the examples
its editor starts from are the repository's examples, and the page shadows no API route."""

from __future__ import annotations

import json
import re

from app.testing import TINY_SPEC
from tests.service_support import REPO

STATIC = REPO / "app" / "dashboard" / "static"


def _example(name: str) -> dict:
    return json.loads((REPO / "examples" / f"{name}.json").read_text())


def test_the_editors_examples_are_the_repositorys_as_the_service_takes_them():
    shipped = {x["name"]: x["spec"] for x in json.loads((STATIC / "examples.json").read_text())}
    tabular, own = _example("tabular"), _example("torchscript_teacher")
    # The service reads no server path: files are uploads, CIFAR-10 is in its own data root.
    tabular["dataset"] = {"source": "upload", "id": "ds_…", "test_fraction": 0.25}
    own["teacher"] = {"source": "upload", "id": "mdl_…"}
    cifar = {
        **_example("cifar10_resnet18"),
        "dataset": {"source": "torchvision", "name": "CIFAR10"},
    }
    assert shipped == {
        "tiny": TINY_SPEC,
        "digits": _example("digits"),
        "search": _example("search_digits"),
        "defaults": {},
        "tabular": tabular,
        "own-teacher": own,
        "cifar10": cifar,
    }


def test_every_module_and_asset_the_page_names_is_shipped_and_local():
    html = (STATIC / "index.html").read_text()
    named = re.findall(r'(?:src|href)="([^"#]+)"', html)
    modules = list(STATIC.rglob("*.js"))
    for module in modules:
        if "vendor" not in module.parts:
            named += [
                (module.parent / m).resolve().relative_to(STATIC).as_posix()
                for m in re.findall(r'from "(\.[^"]+)"', module.read_text())
            ]
    assert named
    for ref in named:
        assert not re.match(r"^(https?:)?//", ref), ref  # no CDN
        if ref.startswith("/") and not ref.startswith("/dashboard/"):
            continue  # a link to the API's own pages (/docs)
        assert (STATIC / ref.removeprefix("/dashboard/")).is_file(), ref


def test_the_page_does_not_shadow_the_api(api):
    with api.client(None) as c:
        assert c.get("/").headers["content-type"].startswith("text/html")
        assert c.head("/").status_code == 200
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/v1/jobs").json()["error"]["code"] == "unauthorized"
        assert c.get("/openapi.json").json()["info"]["title"] == "Distillery"
        assert c.get("/dashboard/nothing.js").status_code == 404
        assert "/" not in c.get("/openapi.json").json()["paths"]  # not an API route
