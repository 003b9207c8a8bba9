"""The playground page at `/`, end to end in headless Chromium against a live `pulid-flux serve`
(tiny model, API keys on): upload a real face, submit, watch progress and previews, get the
result, see 422 errors next to their fields, and save screenshots for the README."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "playground-test-key"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="chromium is not installed (apt-get install chromium): the playground test drives it",
)


def save_png(data: bytes, path: Path) -> None:
    """A 256-colour palette keeps the README's screenshots small."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, "PNG", optimize=True)


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def check_defaults_match_schema(page) -> None:
    """Every input shows fal's default and range as the API's schema declares them."""
    from pulid_flux.api.schemas import FluxPulidInput

    fields = FluxPulidInput.model_fields
    for name in ("num_inference_steps", "guidance_scale", "id_weight", "true_cfg", "start_step",
                 "num_images", "preview_interval"):
        assert float(page.input_value(f"#{name}")) == fields[name].default, name
    for name in ("num_inference_steps", "guidance_scale", "id_weight", "true_cfg", "start_step",
                 "end_step", "face_index", "preview_interval"):
        bounds = {k: getattr(m, k) for m in fields[name].metadata for k in ("ge", "le") if hasattr(m, k)}
        el = page.locator(f"#{name}")
        assert float(el.get_attribute("min")) == bounds["ge"], name
        assert float(el.get_attribute("max")) == bounds["le"], name
    for name in ("image_size", "max_sequence_length", "output_format", "acceleration"):
        assert page.input_value(f"#{name}") == fields[name].default, name
    options = page.eval_on_selector_all("#image_size option", "els => els.map(e => e.value)")
    from pulid_flux.api.schemas import IMAGE_SIZE_PRESETS

    assert options == [*IMAGE_SIZE_PRESETS, "custom"]
    for name in ("enable_safety_checker", "sync_mode"):
        assert page.is_checked(f"#{name}") is fields[name].default, name
    for name in ("end_step", "face_index", "seed"):
        assert fields[name].default is None and page.input_value(f"#{name}") == "", name
    assert page.is_checked("#seed-random") and page.is_disabled("#seed")
    assert page.input_value("#negative_prompt") == fields["negative_prompt"].default
    # The page opts in to previews; API clients that do not ask get none.
    assert fields["enable_previews"].default is False and page.is_checked("#enable_previews")


def drop_file(page, selector: str, data: bytes, name: str, mime: str) -> None:
    """A real drop event carrying a File, as a drag from the desktop produces."""
    page.evaluate(
        """([selector, b64, name, mime]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: mime }));
            const target = document.querySelector(selector);
            target.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
            target.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        [selector, base64.b64encode(data).decode(), name, mime],
    )


def test_playground_end_to_end(make_server, tmp_path, astronaut_png, screenshots_dir):
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright
    from skimage import data as skdata

    astronaut = tmp_path / "astronaut.png"
    astronaut.write_bytes(astronaut_png)
    buf = io.BytesIO()
    Image.fromarray(skdata.coffee()).save(buf, "PNG")  # a real photo without any face
    coffee_png = buf.getvalue()

    # Slow steps so that progress and previews are observable on a busy 2-core machine.
    server = make_server(args=["--model", "tiny", "--host", "127.0.0.1", "--api-key", KEY],
                         env={"PULID_FLUX_STEP_DELAY_S": "0.15", "HF_HUB_OFFLINE": "1"})
    server.start()
    server.wait_ready(timeout=240)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.set_default_timeout(60_000)  # a busy CI machine can be slow
            # Turn file-chooser interception on now: enabled only by `expect_file_chooser`,
            # it can come too late for the chooser that the key press opens (seen: 1 run in 2).
            page.on("filechooser", lambda chooser: None)
            page_errors: list[str] = []
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            # The page's strict CSP must not block anything the page itself does.
            page.on("console", lambda msg: "Content Security Policy" in msg.text
                    and page_errors.append(msg.text))
            expect.set_options(timeout=60_000)

            page.goto(server.url + "/")
            page.wait_for_selector("body[data-ready='true']")
            assert page.title().startswith("PuLID FLUX playground")
            expect(page.locator("#server-text")).to_contain_text("Ready")
            check_defaults_match_schema(page)
            # No external assets: everything the page loads comes from this server.
            urls = page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
            assert urls and all(u.startswith(server.url) for u in urls), urls

            # --- API keys on: the upload is refused until a key is entered -------------------
            page.set_input_files("#ref-file", str(astronaut))
            expect(page.locator("#err-api-key")).to_contain_text("needs an API key")
            expect(page.locator("#err-reference_image_url")).to_contain_text("Upload failed")
            page.fill("#api-key", KEY)
            page.click("#key-save")
            expect(page.locator("#key-state")).to_have_text("(kept in this tab)")
            expect(page.locator("#err-api-key")).to_be_empty()
            assert page.evaluate("sessionStorage.getItem('pulid-flux:api-key')") == KEY
            assert page.evaluate("localStorage.getItem('pulid-flux:api-key')") is None

            # --- the reference by keyboard: Enter on the drop zone opens the file picker -------
            page.focus("#drop")
            with page.expect_file_chooser() as chooser:
                page.keyboard.press("Enter")
            chooser.value.set_files(str(astronaut))
            expect(page.locator("#reference_image_url")).to_have_value(re.compile(r"/files/"), timeout=30_000)
            expect(page.locator("#ref-preview")).to_be_visible()
            uploaded = page.input_value("#reference_image_url")
            assert uploaded.startswith(server.url)
            assert httpx.get(uploaded, timeout=30).content == astronaut_png  # via initiate + PUT

            # --- a custom width out of range: the server's 422 shows next to that field -------
            page.select_option("#image_size", "custom")
            page.fill("#image_size\\.width", "100")
            page.fill("#image_size\\.height", "256")
            page.click("#submit")
            width_error = page.locator("#err-image_size-width")
            expect(width_error).to_contain_text("between 256 and 2048")
            expect(page.locator("#image_size\\.width")).to_have_attribute("aria-invalid", "true")
            expect(page.locator("#form-error")).to_contain_text("rejected")
            assert page.evaluate("document.activeElement.id") == "image_size.width"
            assert page.locator("#err-image_size-height").inner_text() == ""

            # --- a real run: progress, previews, result -------------------------------------
            page.fill("#image_size\\.width", "256")
            page.fill("#num_inference_steps", "10")
            page.fill("#prompt", "portrait of an astronaut, cinematic light")
            page.evaluate("""() => {
                window.__progress = []; window.__previews = [];
                const text = document.getElementById("progress-text");
                new MutationObserver(() => window.__progress.push(
                    [text.textContent, document.getElementById("progress").value])
                ).observe(text, { childList: true, characterData: true, subtree: true });
                const img = document.getElementById("live-img");
                new MutationObserver(() => window.__previews.push(img.getAttribute("src") || ""))
                    .observe(img, { attributes: true, attributeFilter: ["src"] });
            }""")
            page.click("#submit")
            expect(width_error).to_be_empty()
            expect(page.locator("#submit")).to_be_disabled()
            # A mid-run screenshot with the progress bar and a live preview.
            expect(page.locator("#live-img")).to_have_attribute("src", re.compile(r"^data:image/jpeg;base64,"))
            page.evaluate("window.scrollTo(0, 0)")
            save_png(page.screenshot(), screenshots_dir / "playground-progress.png")
            result_img = page.locator(".result-img")
            expect(result_img).to_have_count(1, timeout=90_000)
            wait_until(lambda: page.evaluate(
                "document.querySelector('.result-img').naturalWidth") == 256, 30, what="result image")

            progress = page.evaluate("window.__progress")
            steps = [(int(m.group(1)), int(m.group(2)), value) for text, value in progress
                     if (m := re.match(r"Step (\d+)/(\d+)", text))]
            assert steps and all(total == 10 for _, total, _ in steps)
            assert any(k < 10 and 0 < value < 1 for k, _, value in steps), progress  # seen mid-run
            assert any(text.startswith("In queue") for text, _ in progress), progress
            assert progress[-1][0].startswith("Done in") and progress[-1][1] == 1
            previews = [p for p in page.evaluate("window.__previews") if p]
            assert previews and all(p.startswith("data:image/jpeg;base64,") for p in previews)
            preview = Image.open(io.BytesIO(base64.b64decode(previews[0].split(",", 1)[1])))
            assert preview.format == "JPEG" and preview.size == (256, 256)
            assert page.get_attribute("#progress-text", "aria-live") == "polite"

            results = page.locator("#results")
            expect(results).to_contain_text("seed ")
            expect(results).to_contain_text("inference ")
            expect(results).to_contain_text("NSFW: no")
            seed = int(re.search(r"seed (\d+)", results.inner_text()).group(1))
            link = page.locator("a.download")
            assert "/files/" in link.get_attribute("href") and link.get_attribute("download")
            assert httpx.get(link.get_attribute("href"), timeout=30).content[:3] == b"\xff\xd8\xff"
            expect(page.locator("#logs")).to_contain_text("step 10/10")
            assert "\x1epreview" not in page.inner_text("#logs")  # previews never leak into logs
            expect(page.locator("#history li")).to_have_count(1)
            history = page.evaluate("JSON.parse(localStorage.getItem('pulid-flux:history'))")
            assert history[0]["seed"] == seed and history[0]["prompt"].startswith("portrait of an astronaut")

            # "Reuse this seed" pins the seed for the next request.
            page.click("text=Reuse this seed")
            assert page.input_value("#seed") == str(seed) and not page.is_checked("#seed-random")

            # --- copy as code: current inputs, never the key --------------------------------
            code = page.locator("#code")
            expect(code).to_contain_text(f"{server.url}/run/fal-ai/flux-pulid")
            expect(code).to_contain_text('"num_inference_steps": 10')
            expect(code).to_contain_text(f'"seed": {seed}')
            page.click("#tab-js")
            expect(code).to_contain_text("@fal-ai/client")
            page.keyboard.press("ArrowLeft")  # tabs follow the ARIA keyboard pattern
            expect(page.locator("#tab-python")).to_have_attribute("aria-selected", "true")
            expect(code).to_contain_text("fal_client.subscribe(")
            python_snippet = code.inner_text()
            assert KEY not in python_snippet and KEY not in page.inner_text("body")

            page.evaluate("window.scrollTo(0, 0)")
            save_png(page.screenshot(full_page=True), screenshots_dir / "playground-desktop.png")
            page.set_viewport_size({"width": 390, "height": 844})
            # One column on a phone: nothing wider than the screen.
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            save_png(page.screenshot(full_page=True), screenshots_dir / "playground-phone.png")
            page.set_viewport_size({"width": 1280, "height": 900})

            # The Python snippet runs as shown with the official client (key from FAL_KEY).
            script = tmp_path / "snippet.py"
            script.write_text(python_snippet)
            run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                                 timeout=90, env={**os.environ, "FAL_KEY": KEY})
            assert run.returncode == 0, run.stderr[-2000:]
            assert run.stdout.strip().splitlines()[-1].startswith(f"{seed} ['{server.url}/files/")

            # --- cancel a running request -------------------------------------------------------
            page.fill("#num_inference_steps", "30")
            page.click("#submit")
            expect(page.locator("#progress-text")).to_contain_text("Step ")
            page.click("#cancel")
            expect(page.locator("#run-error")).to_contain_text("cancelled")
            expect(page.locator("#progress-text")).to_contain_text("Failed")
            expect(page.locator("#cancel")).to_be_hidden()
            expect(page.locator("#history li")).to_have_count(1)

            # --- a photo without a face, dropped on the drop zone: error at that field -------
            page.select_option("#image_size", "square")
            page.fill("#num_inference_steps", "2")
            drop_file(page, "#drop", coffee_png, "coffee.png", "image/png")
            expect(page.locator("#ref-upload")).to_contain_text("Uploaded coffee.png")
            page.click("#submit")
            ref_error = page.locator("#err-reference_image_url")
            expect(ref_error).to_contain_text(re.compile("face", re.I), timeout=90_000)
            expect(page.locator("#reference_image_url")).to_have_attribute("aria-invalid", "true")
            expect(page.locator("#run-error")).to_be_visible()
            expect(page.locator("#history li")).to_have_count(1)  # failures are not history

            # --- the history survives a reload (localStorage) -------------------------------
            page.reload()
            page.wait_for_selector("body[data-ready='true']")
            expect(page.locator("#history li")).to_have_count(1)
            assert page.input_value("#api-key") == KEY

            # --- server gone: a clear message instead of a hang ------------------------------
            server.stop()
            page.click("#submit")
            expect(page.locator("#run-error")).to_contain_text("Cannot reach the server")
            expect(page.locator("#submit")).to_be_enabled()

            assert not page_errors, page_errors
        except Exception:
            print("--- server log ---\n" + server.log_tail(80))  # shown by pytest on failure
            raise
        finally:
            browser.close()
