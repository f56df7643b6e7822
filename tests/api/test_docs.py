"""The API's documentation pages work on a host with no network: every script, stylesheet
and icon they load comes from the service itself, not from a CDN."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest

# Where an HTML page or Swagger UI's inline config names something to load.
_REFERENCE = re.compile(r"""(?:\b(?:src|href|spec-url)\s*=\s*|\burl:\s*)["']([^"']+)["']""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_everything_from_the_service(api, page):
    with api.client(None) as c:
        r = c.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        html = r.text
        references = _REFERENCE.findall(html)
        assert any(ref.endswith(".js") for ref in references), html  # the UI itself
        assert any(ref.endswith("openapi.json") for ref in references), html
        for ref in references:
            parts = urlsplit(ref)
            assert not parts.scheme and not parts.netloc, f"{page} loads {ref} from elsewhere"
            asset = c.get(ref)
            assert asset.status_code == 200 and asset.content, (ref, asset.status_code)
    # No other host anywhere in the page (fonts, a validator badge, analytics).
    assert not re.search(r"(?:https?:)?//[\w-]+\.[\w.-]+", html), html
