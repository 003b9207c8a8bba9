"""`/docs` (Swagger UI) works offline: the page names only this server's URLs, and they answer."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from pulid_flux.api.app import create_app
from pulid_flux.config import Settings


@pytest.fixture
def api(tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path, local_workers=0), run_loops=False)) as c:
        yield c


def test_docs_page_loads_only_local_assets(api):
    r = api.get("/docs")
    assert r.status_code == 200
    urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", r.text)
    assert {"/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css",
            "/openapi.json"} <= set(urls), urls
    assert not re.search(r"https?://", r.text), "a remote URL on the docs page"
    for url in urls:
        assert url.startswith("/"), url
        assert api.get(url).status_code == 200, url
    # Swagger UI 5 (OpenAPI 3.1, which FastAPI writes) is what the page loads.
    assert api.get("/openapi.json").json()["openapi"].startswith("3.1")
    assert "SwaggerUIBundle" in api.get("/docs-assets/swagger-ui-bundle.js").text


def test_redoc_is_not_served(api):
    assert api.get("/redoc").status_code == 404
