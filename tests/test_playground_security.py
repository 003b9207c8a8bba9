"""Uploaded files against the playground, in headless Chromium against a live `pulid-flux serve`
(API keys on): an HTML or SVG upload opened from its URL, even from the playground's own tab
(which hands a popup a copy of its sessionStorage), runs no script and reads no key. The files'
sandboxing CSP is tested on its own too, with the browser made to render them as pages; a
control without the CSP shows that the test sees a leak when there is one, and that a separate
file origin stops it even then."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
import pytest

from test_playground import CHROMIUM, CHROMIUM_FLAGS, pytestmark  # noqa: F401  (skip without chromium)

KEY = "playground-secret-key"
STORE = "pulid-flux:api-key"


# What a stored-XSS payload does: read the key and send it away. Chromium's local-network rules
# would block sending it to a loopback collector, so the payload leaves what it read in the
# title, where the test looks.
STEALER = (f"var k; try {{ k = sessionStorage.getItem('{STORE}') + '|' + localStorage.getItem('{STORE}'); }}"
           f" catch (e) {{ k = 'denied:' + e.name; }}"
           " fetch('/exfiltrate?k=' + encodeURIComponent(k)); document.title = 'ran:' + k;")


def uploads(server) -> dict[str, tuple[str, str]]:
    script = STEALER
    files = {
        "html": (b"<!doctype html><title>page</title><script>" + script.encode() + b"</script>", "text/html"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg"><script>' + script.encode() + b"</script></svg>",
                "image/svg+xml"),
    }
    out = {}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Key {KEY}"}) as http:
        for name, (body, declared) in files.items():
            r = http.post("/cdn/files/upload", content=body,
                          headers={"content-type": declared, "x-fal-file-name": f"x.{name}"})
            out[name] = (r.json()["access_url"], declared)
    return out


def open_from_playground(page, url):
    """window.open from the playground's tab: the popup starts with a copy of its sessionStorage."""
    with page.expect_popup() as info:
        page.evaluate("url => { window.open(url); }", url)
    popup = info.value
    popup.wait_for_load_state()
    popup.wait_for_timeout(500)  # time for any script to run
    return popup


@pytest.mark.parametrize("file_origin", [False, True], ids=["same-origin", "file-origin"])
def test_uploaded_pages_run_no_script_and_read_no_key(make_server, file_origin):
    from playwright.sync_api import sync_playwright

    server = make_server(args=["--host", "127.0.0.1", "--api-key", KEY],
                         env={"PULID_FLUX_LOCAL_WORKERS": "0"})
    if file_origin:  # the recommended deployment: the same server under another origin for files
        server.env["PULID_FLUX_FILES_PUBLIC_URL"] = f"http://localhost:{server.port}"
    server.start()
    server.wait_ready(timeout=120, need_worker=False)
    files = uploads(server)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(accept_downloads=True)
            page = context.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("body[data-ready='true']")
            page.click("#key-box summary")
            page.fill("#api-key", KEY)
            page.click("#key-save")
            assert page.evaluate(f"sessionStorage.getItem('{STORE}')") == KEY

            # As served: a download, never a page.
            downloads = []
            page.on("download", lambda d: downloads.append(d))
            context.on("page", lambda p: p.on("download", lambda d: downloads.append(d)))
            for name, (url, _) in files.items():
                count = len(downloads)
                page.evaluate("url => { window.open(url); }", url)
                for _ in range(100):
                    if len(downloads) > count:
                        break
                    page.wait_for_timeout(100)
                assert downloads[count:] and downloads[count].suggested_filename == f"x.{name}", name
                page.wait_for_timeout(1000)
            assert not [p.title() for p in context.pages if p.title().startswith("ran")]

            # Rendered as a page anyway (a proxy that rewrites the type, an old browser):
            # the CSP sandbox still runs no script, and storage is another origin's.
            def as_page(route, keep_csp):
                response = route.fetch()
                headers = {k: v for k, v in response.headers.items()
                           if k.lower() not in ("content-disposition", "content-type")
                           and (keep_csp or k.lower() != "content-security-policy")}
                declared = next(d for u, d in files.values() if urlsplit(u).path == urlsplit(route.request.url).path)
                route.fulfill(status=200, body=response.body(), headers={**headers, "content-type": declared})

            for name, (url, _) in files.items():
                context.route(url, lambda route: as_page(route, keep_csp=True))
                popup = open_from_playground(page, url)
                assert not popup.title().startswith("ran"), name
                denied = popup.evaluate(
                    f"() => {{ try {{ return sessionStorage.getItem('{STORE}'); }}"
                    " catch (e) { return 'denied:' + e.name; } }")
                assert denied == "denied:SecurityError", (name, denied)
                popup.close()
                context.unroute(url)

            # Control: without the CSP, the same page does steal the key (the test can fail).
            url = files["html"][0]
            context.route(url, lambda route: as_page(route, keep_csp=False))
            popup = open_from_playground(page, url)
            # On the file origin the script runs but finds no key: it is another origin's.
            expected = "ran:null|null" if file_origin else f"ran:{KEY}|null"
            assert popup.title() == expected
            popup.close()
        finally:
            browser.close()
