"""Issue 10 (files, uploads, tokens, malformed input) through the HTTP interface, in-process:
files are served as data, only an upload's initiator writes it and only while unfinished,
bodies are bounded, tokens never outlive their parent, malformed JSON is a 4xx, and HEAD is
answered wherever GET is. The browser side is in test_playground_security.py."""

from __future__ import annotations

import base64
import json
import re
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from pulid_flux.api.app import STATIC_DIR, create_app
from pulid_flux.config import Settings
from pulid_flux.storage.base import KIND_OUTPUT

EP = "/fal-ai/flux-pulid"
A = {"Authorization": "Key alpha"}
B = {"Authorization": "Key beta"}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
HTML = b"<!doctype html><script>fetch('/x?k='+sessionStorage.getItem('pulid-flux:api-key'))</script>"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.domain)</script></svg>'


def client(tmp_path, **settings) -> TestClient:
    settings = Settings(data_dir=tmp_path, local_workers=0, api_keys="alpha,beta", **settings)
    return TestClient(create_app(settings, run_loops=False))


@pytest.fixture
def api(tmp_path):
    with client(tmp_path) as c:
        yield c


def svc(c):
    return c.app.state.services


def cdn_multipart(c, headers=A, name="big.bin"):
    r = c.post("/cdn/files/upload/multipart", headers={**headers, "x-fal-file-name": name})
    assert r.status_code == 200, r.text
    return r.json()["access_url"], r.json()["uploadId"]


def deep(n: int) -> str:
    return "[" * n + "]" * n


# --- 1. files are data, never pages ----------------------------------------------------------

def assert_served_as_data(r, *, inline_type=None):
    assert r.headers["x-content-type-options"] == "nosniff"
    csp = r.headers["content-security-policy"]
    assert "sandbox" in csp and "default-src 'none'" in csp
    if inline_type:
        assert r.headers["content-type"] == inline_type
        assert r.headers["content-disposition"].startswith("inline")
    else:
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-disposition"].startswith("attachment")


def test_uploaded_pages_are_downloads_and_images_are_decided_by_their_bytes(api):
    page = api.post("/cdn/files/upload", content=HTML,
                    headers={**A, "content-type": "text/html", "x-fal-file-name": "x.html"})
    init = api.post("/rest/storage/upload/initiate", headers=A,
                    json={"content_type": "image/svg+xml", "file_name": "x.svg"}).json()
    assert api.put(init["upload_url"], content=SVG, headers={"content-type": "image/svg+xml"}).status_code == 200
    disguised = api.post("/cdn/files/upload", content=PNG,  # a real PNG declared as HTML
                         headers={**A, "content-type": "text/html", "x-fal-file-name": "y.html"})
    for url, inline_type, body in ((page.json()["access_url"], None, HTML),
                                   (init["file_url"], None, SVG),
                                   (disguised.json()["access_url"], "image/png", PNG)):
        got = api.get(url)
        assert got.status_code == 200 and got.content == body
        assert_served_as_data(got, inline_type=inline_type)
        head = api.head(url)
        assert head.status_code == 200 and head.content == b""
        assert_served_as_data(head, inline_type=inline_type)
    missing = api.get(f"/files/{'x' * 24}/nothing.bin")  # even a 404 is sandboxed
    assert missing.status_code == 404 and "sandbox" in missing.headers["content-security-policy"]


@pytest.mark.parametrize("declared", ["text/html\r\nX-Injected: 1", "text/html\nx", "image/png\x00",
                                      "html", "a/b c", "image/" + "p" * 300, "a/b; q=\"\x7f\""])
def test_declared_content_types_are_validated(api, declared):
    r = api.post("/rest/storage/upload/initiate", headers=A,
                 json={"content_type": declared, "file_name": "x.png"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "content_type"]


def test_declared_content_type_header_is_validated(api):
    for declared in ("html", "image/png; ", "a/b;c", "/png"):
        r = api.post("/cdn/files/upload", content=PNG, headers={**A, "content-type": declared})
        assert r.status_code == 422, declared
        assert r.json()["detail"][0]["loc"] == ["header", "content-type"]
    ok = api.post("/cdn/files/upload", content=PNG,
                  headers={**A, "content-type": 'text/plain; charset="utf-8"'})
    assert ok.status_code == 200


def test_a_separate_file_origin(tmp_path):
    files = "http://files.example:8000"
    with client(tmp_path, files_public_url=files) as api:
        url = api.post("/cdn/files/upload", content=PNG, headers=A).json()["access_url"]
        assert url.startswith(files + "/files/")
        init = api.post("/rest/storage/upload/initiate", headers=A, json={"file_name": "i.png"}).json()
        assert init["file_url"].startswith(files + "/files/")
        assert urlsplit(init["upload_url"]).netloc == "testserver"  # writes stay on the API
        path = urlsplit(url).path
        # The API origin never serves file bytes: it sends readers to the file origin.
        r = api.get(path, follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == files + path
        got = api.get(path, headers={"host": "files.example:8000"})
        assert got.status_code == 200 and got.content == PNG
        assert_served_as_data(got, inline_type="image/png")
        # Results point there too, and a reference on the file origin is read locally.
        meta = svc(api).storage.put(PNG, content_type="image/png", file_name="o.png", kind=KIND_OUTPUT)
        assert svc(api).file_url(meta.path, "http://testserver") == files + meta.path
        assert svc(api).own_file_resolver(None)(files + meta.path) == PNG


def test_playground_page_has_a_strict_csp_and_no_inline_code(api):
    r = api.get("/")
    csp = r.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    # The CSP holds only because the page needs nothing inline.
    html = (STATIC_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=|javascript:", html, re.I)
    js = "".join(p.read_text() for p in STATIC_DIR.glob("*.js"))
    assert not re.search(r"\son[a-z]+=|style=|eval\(|new Function", js)
    assert "localStorage.setItem(KEY_STORE" not in js and "sessionStorage.setItem(KEY_STORE" in js


# --- 2. write ownership -------------------------------------------------------------------------

def test_only_the_initiator_writes_an_upload_and_only_until_it_is_finished(api):
    url, upload_id = cdn_multipart(api)
    base = urlsplit(url).path
    part = f"{base}/multipart/{upload_id}/1"
    complete = f"{base}/multipart/{upload_id}/complete"
    file_id = base.split("/")[2]
    # Another key, the file's own id as upload id (all the file URL reveals), no credential.
    assert api.put(part, content=b"evil", headers=B).status_code == 404
    assert api.post(complete, json={"parts": [{"partNumber": 1}]}, headers=B).status_code == 404
    assert api.put(f"{base}/multipart/{file_id}/1", content=b"evil", headers=A).status_code == 404
    assert api.put(part, content=b"evil").status_code == 401
    assert api.put(part.replace("/big.bin/", "/other.bin/"), content=b"x", headers=A).status_code == 404
    etag = api.put(part, content=b"good", headers=A).json()["etag"]
    done = api.post(complete, json={"parts": [{"partNumber": 1, "etag": etag}]}, headers=A)
    assert done.status_code == 200
    # Finished: immutable, for its owner too, on every route.
    assert api.put(part, content=b"again", headers=A).status_code == 403
    assert api.post(complete, json={"parts": [{"partNumber": 1, "etag": etag}]}, headers=A).status_code == 403
    assert api.get(url).content == b"good"


def test_signed_upload_urls_write_once(api):
    init = api.post("/rest/storage/upload/initiate", headers=A, json={"file_name": "a.png"}).json()
    assert api.put(init["upload_url"], content=PNG).status_code == 200
    assert api.put(init["upload_url"], content=b"replaced").status_code == 403
    assert api.get(init["file_url"]).content == PNG

    init = api.post("/rest/storage/upload/initiate-multipart", headers=A, json={"file_name": "m.bin"}).json()
    path, query = init["upload_url"].split("?")
    etag = api.put(f"{path}/1?{query}", content=b"one").json()["etag"]
    assert api.post(f"{path}/complete?{query}", json={"parts": [{"partNumber": 1, "etag": etag}]}).status_code == 200
    assert api.put(f"{path}/1?{query}", content=b"two").status_code == 403
    assert api.post(f"{path}/complete?{query}", json={"parts": [{"partNumber": 1, "etag": etag}]}).status_code == 403
    # A signature names one file: it opens no other.
    other = api.post("/rest/storage/upload/initiate", headers=A, json={"file_name": "b.png"}).json()
    other_id = urlsplit(other["upload_url"]).path.rsplit("/", 1)[1]
    assert api.put(f"/files/upload/{other_id}?{urlsplit(init['upload_url']).query}", content=b"x").status_code == 403


def test_generated_files_cannot_be_written(api):
    meta = svc(api).storage.put(PNG, content_type="image/png", file_name="o.png", kind=KIND_OUTPUT)
    upload_id = svc(api).auth.upload_id(meta.id)  # even knowing what an attacker cannot
    assert api.put(f"/files/{meta.id}/o.png/multipart/{upload_id}/1", content=b"x", headers=A).status_code == 404
    assert api.post(f"/files/{meta.id}/o.png/multipart/{upload_id}/complete", headers=A,
                    json={"parts": [{"partNumber": 1}]}).status_code == 404
    query = svc(api).auth.sign_path(f"/files/upload/{meta.id}", time.time() + 60)
    assert api.put(f"/files/upload/{meta.id}?{query}", content=b"x").status_code == 404
    assert svc(api).storage.read(meta.id) == PNG


def test_without_keys_a_file_url_still_opens_no_upload(tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path, local_workers=0), run_loops=False)) as api:
        url, upload_id = cdn_multipart(api, headers={})
        base = urlsplit(url).path
        file_id = base.split("/")[2]
        assert api.put(f"{base}/multipart/{file_id}/1", content=b"evil").status_code == 404
        assert api.put(f"{base}/multipart/{upload_id}/1", content=b"mine").status_code == 200


# --- 5. bounded bodies, parts and sizes -------------------------------------------------------

def test_complete_bodies_are_capped(tmp_path):
    with client(tmp_path, max_complete_body_bytes=2048) as api:
        url, upload_id = cdn_multipart(api)
        complete = f"{urlsplit(url).path}/multipart/{upload_id}/complete"
        big = json.dumps({"parts": [{"partNumber": 1, "etag": "x" * 4096}]}).encode()
        assert api.post(complete, content=big, headers=A).status_code == 413

        def chunked():  # no Content-Length: the cap holds while reading
            yield big[:1000]
            yield big[1000:]

        assert api.post(complete, content=chunked(), headers=A).status_code == 413


def test_part_lists_are_unique_and_well_formed(api):
    url, upload_id = cdn_multipart(api)
    base = f"{urlsplit(url).path}/multipart/{upload_id}"
    etags = {n: api.put(f"{base}/{n}", content=bytes([n]) * 10, headers=A).json()["etag"] for n in (1, 2)}
    for parts in ([{"partNumber": 1, "etag": etags[1]}] * 3,
                  [{"partNumber": 2, "etag": etags[2]}, {"partNumber": 1, "etag": etags[1]},
                   {"partNumber": 2, "etag": etags[2]}],
                  [], [{"partNumber": "1"}], [{"partNumber": True}], [7], [{"partNumber": 1, "etag": 5}],
                  [{"partNumber": 3}]):
        r = api.post(f"{base}/complete", json={"parts": parts}, headers=A)
        assert r.status_code == 422, parts
        assert r.json()["detail"][0]["loc"][:2] == ["body", "parts"]
    for body in (b"not json", b"[]", b'{"parts": {}}', deep(5000).encode()):
        assert api.post(f"{base}/complete", content=body, headers=A).status_code == 422, body[:20]
    assert api.put(f"{base}/0", content=b"x", headers=A).status_code == 422
    assert api.put(f"{base}/99999999", content=b"x", headers=A).status_code == 422
    # Any order (fal's Python client lists parallel parts as they finish); joined ascending.
    ok = api.post(f"{base}/complete", headers=A,
                  json={"parts": [{"partNumber": n, "etag": etags[n]} for n in (2, 1)]})
    assert ok.status_code == 200 and api.get(url).content == b"\x01" * 10 + b"\x02" * 10


def test_final_size_is_within_the_upload_limit_and_nothing_is_kept(tmp_path):
    with client(tmp_path, max_upload_bytes=4096) as api:
        url, upload_id = cdn_multipart(api)
        base = f"{urlsplit(url).path}/multipart/{upload_id}"
        assert api.put(f"{base}/1", content=b"a" * 3000, headers=A).status_code == 200
        assert api.put(f"{base}/2", content=b"b" * 3000, headers=A).status_code == 413
        # Parts sent side by side each pass; the completion catches the total.
        storage = svc(api).storage
        storage.max_file_bytes = 10_000
        assert api.put(f"{base}/2", content=b"b" * 3000, headers=A).status_code == 200
        storage.max_file_bytes = 4096
        r = api.post(f"{base}/complete", headers=A, json={"parts": [{"partNumber": 1}, {"partNumber": 2}]})
        assert r.status_code == 413
        assert api.get(url).status_code == 404
        assert api.put(f"{base}/1", content=b"a", headers=A).status_code == 404
        # A single upload over the limit, with or without a Content-Length, leaves nothing.
        before = sorted(p.name for p in svc(api).settings.files_dir.iterdir())

        def chunked():
            for _ in range(5):
                yield b"c" * 1000

        assert api.post("/cdn/files/upload", content=chunked(), headers=A).status_code == 413
        assert api.post("/cdn/files/upload", content=b"c" * 5000, headers=A).status_code == 413
        assert sorted(p.name for p in svc(api).settings.files_dir.iterdir()) == before


# --- 6. tokens and malformed input --------------------------------------------------------------

def claims(token: str) -> dict:
    body = token.rsplit(".", 1)[0]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def test_tokens_never_outlive_their_parent(tmp_path):
    with client(tmp_path, mint_tokens_from_tokens=True) as api:
        short = api.post("/rest/tokens/", headers=A, json={"token_expiration": 30}).json()
        parent_exp = claims(short)["e"]
        bearer = {"Authorization": f"Bearer {short}"}
        child = api.post("/rest/tokens/", headers=bearer, json={"token_expiration": 3600}).json()
        assert claims(child)["e"] <= parent_exp
        cdn = api.post("/rest/storage/auth/token", headers=bearer, json={}).json()
        assert claims(cdn["token"])["e"] <= parent_exp
        init = api.post(f"/rest/storage/upload/initiate?fal_jwt_token={short}", json={"file_name": "a"}).json()
        assert int(parse_qs(urlsplit(init["upload_url"]).query)["exp"][0]) <= parent_exp
        # A key mints full-length tokens.
        full = api.post("/rest/storage/auth/token", headers=A, json={}).json()
        assert claims(full["token"])["e"] > parent_exp + 3000


def test_minting_from_a_token_is_off_by_default(api):
    short = api.post("/rest/tokens/", headers=A, json={"token_expiration": 60}).json()
    bearer = {"Authorization": f"Bearer {short}"}
    assert api.post("/rest/tokens/", headers=bearer, json={}).status_code == 403
    assert api.post("/rest/storage/auth/token", headers=bearer, json={}).status_code == 403
    # It still does what it was made for: uploads, streams.
    assert api.post("/rest/storage/upload/initiate", headers=bearer, json={}).status_code == 200


@pytest.mark.parametrize("header", ["x-fal-object-lifecycle", "x-fal-object-lifecycle-preference"])
def test_deep_or_bad_lifecycle_headers_are_422(api, astronaut_uri, header):
    for value in (deep(5000), '{"a":' * 40 + "1" + "}" * 40, "{", "[1]"):
        r = api.post("/cdn/files/upload", content=PNG, headers={**A, header: value})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["header", header]
    r = api.post(EP, headers={**A, "x-fal-object-lifecycle-preference": deep(5000)},
                 json={"prompt": "p", "reference_image_url": astronaut_uri})
    assert r.status_code == 422


def test_deep_json_in_bodies_and_queries_is_4xx(api):
    for path in (EP, "/rest/storage/upload/initiate", "/rest/tokens/"):
        for body in (deep(100_000), '{"prompt":' * 5000 + "1" + "}" * 5000):
            r = api.post(path, content=body, headers={**A, "content-type": "application/json"})
            assert 400 <= r.status_code < 500, (path, r.status_code)
    r = api.get(f"/run{EP}", params={"prompt": "p", "image_size": deep(2000)}, headers=A)
    assert r.status_code == 422


def test_head_is_answered_on_every_get_route(api, astronaut_uri):
    request_id = api.post(EP, headers=A, json={"prompt": "p", "reference_image_url": astronaut_uri}
                          ).json()["request_id"]
    paths = ["/health", "/", "/static/app.js", "/.well-known/jwks.json", "/metrics", "/openapi.json",
             f"{EP}/requests/{request_id}/status", f"{EP}/requests/{request_id}/status/stream",
             f"{EP}/requests/{request_id}"]
    for path in paths:
        get = api.get(path, headers=A) if not path.endswith("/stream") else None
        head = api.head(path, headers=A)
        assert head.status_code != 405 and head.status_code < 500, path
        assert head.content == b"", path
        if get is not None:
            assert head.status_code == get.status_code, path
            assert head.headers.get("content-type") == get.headers.get("content-type"), path
    assert api.get("/health").status_code == 200
