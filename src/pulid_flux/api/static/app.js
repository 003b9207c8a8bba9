// The playground: uses only the public API of this server, exactly as any fal client would:
// storage upload (initiate + PUT), queue submit, status stream (SSE), result, cancel.
import { snippet } from "./snippets.js";

const ENDPOINT = "fal-ai/flux-pulid";
const BASE = window.location.origin;
// The key lives in sessionStorage: this tab only, gone when it closes. A page of this origin
// opened later (a shared link, another tab) never finds it; localStorage would hand it to every
// one of them, forever. Uploaded files cannot read either: they are served sandboxed.
const KEY_STORE = "pulid-flux:api-key";
const HISTORY_STORE = "pulid-flux:history";
const INPUTS_STORE = "pulid-flux:inputs";
const HISTORY_MAX = 24;

// fal's defaults for fal-ai/flux-pulid (src/pulid_flux/api/schemas.py); the browser test
// compares them with the schema, so they cannot drift silently.
export const DEFAULTS = {
  negative_prompt: "",
  image_size: "landscape_4_3",
  num_inference_steps: 20,
  guidance_scale: 4,
  id_weight: 1,
  true_cfg: 1,
  start_step: 0,
  max_sequence_length: "128",
  enable_safety_checker: true,
  sync_mode: false,
  num_images: 1,
  output_format: "jpeg",
  acceleration: "none",
  end_step: null,
  face_index: null,
  seed: null,
  enable_previews: true, // the schema's default is off; the page opts in
  preview_interval: 2,
};
const CUSTOM_DEFAULT = { width: 1024, height: 768 };

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// --- API access ---------------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, { status = 0, body = null, network = false } = {}) {
    super(message);
    this.status = status;
    this.body = body;
    this.network = network;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = apiKey();
  if (key) headers.Authorization = `Key ${key}`;
  try {
    return await fetch(path, { ...options, headers });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(`Cannot reach the server at ${BASE}. Is \`pulid-flux serve\` running?`,
      { network: true });
  }
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  let message = `HTTP ${response.status}`;
  if (body && typeof body.detail === "string") message = body.detail;
  else if (body && body.error) message = body.error;
  if (response.status === 401) {
    message = apiKey() ? "The server refused this API key." :
      "This server needs an API key: enter it under “API key”.";
  }
  return new ApiError(message, { status: response.status, body });
}

async function apiJson(path, options) {
  const response = await api(path, options);
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

// Server-sent events over fetch (EventSource cannot send the Authorization header).
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield JSON.parse(data); // comment-only blocks (keep-alives) carry no data
    }
  }
}

async function uploadFile(file) {
  const type = file.type || "application/octet-stream";
  const { upload_url: uploadUrl, file_url: fileUrl } = await apiJson(
    "/rest/storage/upload/initiate?storage_type=fal-cdn-v3", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ content_type: type, file_name: file.name || "upload.bin" }),
    });
  let put;
  try {
    // The signed URL needs no credentials, as with fal's own storage.
    put = await fetch(uploadUrl, { method: "PUT", headers: { "Content-Type": type }, body: file });
  } catch {
    throw new ApiError(`Cannot reach the server at ${BASE} to upload.`, { network: true });
  }
  if (!put.ok) throw await errorFrom(put);
  return fileUrl;
}

// --- form fields -------------------------------------------------------------------------

function buildSliders() {
  for (const box of document.querySelectorAll(".slider")) {
    const { name, min, max, step, label } = box.dataset;
    box.id = `f-${name}`;
    box.innerHTML = `
      <label for="${name}" id="${name}-label"></label>
      <div class="row">
        <input type="range" id="${name}-range" min="${min}" max="${max}" step="${step}"
               aria-labelledby="${name}-label">
        <input type="number" id="${name}" name="${name}" min="${min}" max="${max}" step="${step}"
               aria-describedby="err-${name}">
      </div>
      <p class="field-error" id="err-${name}" role="alert"></p>`;
    $(`${name}-label`).textContent = label;
    const range = $(`${name}-range`);
    const number = $(name);
    range.addEventListener("input", () => { number.value = range.value; changed(); });
    number.addEventListener("input", () => { if (number.value !== "") range.value = number.value; });
  }
}

function setValue(name, value) {
  const el = $(name);
  if (!el) return;
  if (el.type === "checkbox") el.checked = Boolean(value);
  else el.value = value === null || value === undefined ? "" : String(value);
  const range = $(`${name}-range`);
  if (range && el.value !== "") range.value = el.value;
}

function applyInputs(values) {
  for (const [name, value] of Object.entries(values)) {
    if (name === "image_size") continue;
    if (name === "seed") continue;
    if (name === "reference_image_urls") {
      $("reference_image_urls").value = (value || []).join("\n");
      continue;
    }
    setValue(name, value);
  }
  const size = values.image_size;
  if (size && typeof size === "object") {
    $("image_size").value = "custom";
    setValue("image_size.width", size.width);
    setValue("image_size.height", size.height);
  } else if (size) {
    $("image_size").value = size;
  }
  if ("seed" in values) setSeed(values.seed);
  syncCustomSize();
  if (values.reference_image_url !== undefined) showReferencePreview(values.reference_image_url);
}

function setSeed(seed) {
  const random = seed === null || seed === undefined;
  $("seed-random").checked = random;
  $("seed").disabled = random;
  if (!random) $("seed").value = String(seed);
}

function syncCustomSize() {
  $("custom-size").hidden = $("image_size").value !== "custom";
}

const intOrNull = (text) => (text.trim() === "" ? null : Number(text));

// The request body, as any client would send it. Empty optional fields are left out so that
// the server's defaults apply; invalid ones are sent so the server's 422 explains them.
function collectInput() {
  const input = {
    prompt: $("prompt").value,
    reference_image_url: $("reference_image_url").value.trim(),
  };
  const negative = $("negative_prompt").value;
  if (negative) input.negative_prompt = negative;
  const size = $("image_size").value;
  input.image_size = size === "custom"
    ? { width: intOrNull($("image_size.width").value), height: intOrNull($("image_size.height").value) }
    : size;
  for (const name of ["num_inference_steps", "guidance_scale", "id_weight", "true_cfg", "start_step",
    "num_images", "end_step", "face_index"]) {
    const value = intOrNull($(name).value);
    if (value !== null) input[name] = value;
  }
  if (!$("seed-random").checked) input.seed = intOrNull($("seed").value);
  input.max_sequence_length = $("max_sequence_length").value;
  input.enable_safety_checker = $("enable_safety_checker").checked;
  if ($("sync_mode").checked) input.sync_mode = true;
  input.output_format = $("output_format").value;
  const acceleration = $("acceleration").value;
  if (acceleration !== DEFAULTS.acceleration) input.acceleration = acceleration;
  const more = $("reference_image_urls").value.split("\n").map((s) => s.trim()).filter(Boolean);
  if (more.length) input.reference_image_urls = more;
  if ($("enable_previews").checked) {
    input.enable_previews = true;
    const every = intOrNull($("preview_interval").value);
    if (every !== null) input.preview_interval = every;
  }
  return input;
}

// --- errors next to their fields ---------------------------------------------------------

function clearErrors() {
  for (const p of document.querySelectorAll(".field-error")) p.textContent = "";
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  for (const id of ["form-error", "run-error"]) {
    $(id).hidden = true;
    $(id).textContent = "";
  }
}

function banner(id, message) {
  $(id).textContent = message;
  $(id).hidden = false;
}

function revealField(el) {
  for (let node = el; node; node = node.parentElement) {
    if (node.tagName === "DETAILS") node.open = true;
    if (node.id === "custom-size") node.hidden = false;
  }
}

// fal's 422 body: {"detail": [{"loc": ["body", field, ...], "msg", "type"}]}.
function showFieldErrors(detail) {
  const unplaced = [];
  let first = null;
  for (const entry of detail) {
    const path = (entry.loc || []).filter((part, i) => !(i === 0 && part === "body"));
    let placed = false;
    for (let n = path.length; n > 0 && !placed; n--) {
      const key = path.slice(0, n).join("-");
      const target = $(`err-${key}`);
      if (!target) continue;
      const suffix = path.slice(n).map((p) => (typeof p === "number" ? `#${p + 1}` : p)).join(" ");
      const text = suffix ? `${suffix}: ${entry.msg}` : entry.msg;
      target.textContent = target.textContent ? `${target.textContent} ${text}` : text;
      const input = $(path.slice(0, n).join(".")) || $(path[0]);
      if (input) {
        input.setAttribute("aria-invalid", "true");
        first = first || input;
      }
      revealField(target);
      placed = true;
    }
    if (!placed) unplaced.push(`${path.join(".") || "input"}: ${entry.msg}`);
  }
  const count = detail.length;
  banner("form-error", `The server rejected ${count === 1 ? "one input" : `${count} inputs`}` +
    (unplaced.length ? `: ${unplaced.join("; ")}` : ": see the messages next to the fields."));
  if (first) first.focus();
}

function showError(err, where = "run-error") {
  if (err.status === 401) {
    $("key-box").open = true;
    $("err-api-key").textContent = err.message;
    $("api-key").setAttribute("aria-invalid", "true");
    $("api-key").focus();
    banner(where, err.message);
  } else if (err.status === 422 && err.body && Array.isArray(err.body.detail)) {
    showFieldErrors(err.body.detail);
    if (where !== "form-error") banner(where, $("form-error").textContent);
  } else {
    banner(where, err.message || String(err));
  }
}

// --- reference image ---------------------------------------------------------------------

let pendingUpload = null; // Promise of the file URL while an upload runs

function showReferencePreview(src) {
  const img = $("ref-preview");
  if (!src) {
    img.hidden = true;
    img.removeAttribute("src");
    return;
  }
  img.hidden = false;
  img.src = src;
}

async function useReferenceFile(file) {
  if (!file) return;
  $("err-reference_image_url").textContent = "";
  $("reference_image_url").removeAttribute("aria-invalid");
  if (file.type && !file.type.startsWith("image/")) {
    $("err-reference_image_url").textContent = `${file.name} is not an image.`;
    return;
  }
  showReferencePreview(URL.createObjectURL(file));
  $("ref-upload").textContent = `Uploading ${file.name}…`;
  $("reference_image_url").value = "";
  const upload = uploadFile(file);
  pendingUpload = upload;
  try {
    const url = await upload;
    if (pendingUpload !== upload) return; // a newer file replaced this one
    $("reference_image_url").value = url;
    $("ref-upload").textContent = `Uploaded ${file.name} to this server's storage.`;
    changed();
  } catch (err) {
    if (pendingUpload !== upload) return;
    $("ref-upload").textContent = "";
    $("err-reference_image_url").textContent = `Upload failed: ${err.message}`;
    $("reference_image_url").setAttribute("aria-invalid", "true");
    if (err.status === 401) showError(err, "form-error");
  } finally {
    if (pendingUpload === upload) pendingUpload = null;
  }
}

function setupReference() {
  const drop = $("drop");
  const picker = $("ref-file");
  drop.addEventListener("click", () => picker.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      picker.click();
    }
  });
  picker.addEventListener("change", () => {
    const file = picker.files[0];
    picker.value = ""; // so that choosing the same file again (e.g. after a 401) fires change
    useReferenceFile(file);
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (file) useReferenceFile(file);
    else {
      const url = e.dataTransfer.getData("text/uri-list") || e.dataTransfer.getData("text/plain");
      if (url) {
        $("reference_image_url").value = url.trim();
        showReferencePreview(url.trim());
        changed();
      }
    }
  });
  // Pasting an image anywhere (outside text fields) uses it as the reference.
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file && !["INPUT", "TEXTAREA"].includes(document.activeElement?.tagName)) {
      e.preventDefault();
      useReferenceFile(file);
    }
  });
  $("reference_image_url").addEventListener("change", () => {
    pendingUpload = null;
    $("ref-upload").textContent = "";
    showReferencePreview($("reference_image_url").value.trim());
  });
  $("ref-preview").addEventListener("error", () => {
    if ($("ref-preview").getAttribute("src")) {
      $("ref-upload").textContent = "The browser cannot show this image (the server may still fetch it).";
    }
  });
  $("more-files").addEventListener("change", async () => {
    const files = [...$("more-files").files];
    $("err-reference_image_urls").textContent = "";
    for (const file of files) {
      try {
        const url = await uploadFile(file);
        const box = $("reference_image_urls");
        box.value = (box.value.trim() ? box.value.trim() + "\n" : "") + url;
        changed();
      } catch (err) {
        $("err-reference_image_urls").textContent = `Upload of ${file.name} failed: ${err.message}`;
      }
    }
    $("more-files").value = "";
  });
}

// --- a run -------------------------------------------------------------------------------

let running = null; // {id, cancelled}

function setProgress(value, text) {
  const bar = $("progress");
  if (value === null) bar.removeAttribute("value"); // indeterminate while queued
  else bar.value = value;
  $("progress-text").textContent = text;
}

function appendLogs(entries) {
  if (!entries || !entries.length) return;
  const pre = $("logs");
  for (const entry of entries) {
    const time = (entry.timestamp || "").slice(11, 19);
    pre.textContent += `${time} ${entry.level || "INFO"} ${entry.message}\n`;
  }
  pre.scrollTop = pre.scrollHeight;
}

let lastStep = null;

function onStatus(event, seenLogs) {
  if (event.status === "IN_QUEUE") {
    const ahead = event.queue_position ?? 0;
    setProgress(null, ahead === 0 ? "In queue: next to run." :
      `In queue: position ${ahead + 1} (${ahead} ahead).`);
  }
  const logs = event.logs || [];
  const fresh = logs.slice(Math.max(0, seenLogs.skip));
  seenLogs.skip = Math.max(0, seenLogs.skip - logs.length);
  seenLogs.count += fresh.length;
  appendLogs(fresh);
  for (const entry of fresh) {
    const m = /^step (\d+)\/(\d+)/.exec(entry.message);
    if (m) lastStep = [Number(m[1]), Number(m[2])];
  }
  if (event.status === "IN_PROGRESS") {
    if (lastStep) setProgress(lastStep[0] / lastStep[1], `Step ${lastStep[0]}/${lastStep[1]}`);
    else setProgress(0, "Running: preparing the face and the prompt…");
  }
  if (event.preview) {
    $("live").hidden = false;
    $("live-img").src = event.preview;
    $("live-caption").textContent = lastStep ?
      `Preview after step ${lastStep[0]}/${lastStep[1]} (a quick approximation, not the final image)` :
      "Preview (a quick approximation)";
  }
}

// Follows the status stream until COMPLETED; reconnects when the connection drops.
async function followStatus(requestId) {
  const seen = { count: 0, skip: 0 };
  for (let attempt = 0; ; attempt++) {
    let response;
    try {
      response = await api(`/${ENDPOINT}/requests/${requestId}/status/stream?logs=1`,
        { headers: { Accept: "text/event-stream" } });
    } catch (err) {
      if (!err.network || attempt >= 20) throw err;
      setProgress(null, "Connection lost: reconnecting…");
      await sleep(Math.min(5000, 500 * (attempt + 1)));
      continue;
    }
    if (!response.ok) throw await errorFrom(response);
    seen.skip = seen.count; // a new stream starts the logs from the beginning
    try {
      for await (const event of sseEvents(response)) {
        onStatus(event, seen);
        if (event.status === "COMPLETED") return event;
      }
    } catch (err) {
      if (attempt >= 20) throw err;
    }
    await sleep(Math.min(5000, 500 * (attempt + 1)));
  }
}

function setRunning(state) {
  running = state;
  $("submit").disabled = Boolean(state);
  $("submit").textContent = state ? "Generating…" : "Generate";
  $("cancel").hidden = !state;
  $("form").setAttribute("aria-busy", state ? "true" : "false");
}

async function submit(event) {
  event.preventDefault();
  if (running) return;
  clearErrors();
  if (pendingUpload) {
    setProgress(null, "Waiting for the upload…");
    try {
      await pendingUpload;
    } catch {
      setProgress(0, "Idle.");
      return; // the upload's error is already next to the field
    }
  }
  const input = collectInput();
  saveInputs(input);
  setRunning({ id: null });
  lastStep = null;
  $("logs").textContent = "";
  $("results").innerHTML = "";
  $("live").hidden = true;
  $("live-img").removeAttribute("src");
  setProgress(null, "Submitting…");
  const started = performance.now();
  try {
    const queued = await apiJson(`/${ENDPOINT}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(input),
    });
    running.id = queued.request_id;
    setProgress(null, `In queue: position ${(queued.queue_position ?? 0) + 1}.`);
    const final = await followStatus(queued.request_id);
    const response = await api(`/${ENDPOINT}/requests/${queued.request_id}`);
    const body = await response.json().catch(() => null);
    if (!response.ok || final.error) {
      const err = new ApiError(final.error || (body && body.detail) || `HTTP ${response.status}`,
        { status: response.status, body });
      setProgress(1, `Failed: ${final.error || err.message}`);
      showError(err);
      if (err.status === 422) banner("run-error", `The request failed: ${final.error || "invalid input"}`);
      return;
    }
    const seconds = (performance.now() - started) / 1000;
    setProgress(1, `Done in ${seconds.toFixed(1)} s.`);
    $("live").hidden = true;
    showResult(queued.request_id, body, input, seconds);
    addHistory(queued.request_id, body, input, seconds);
  } catch (err) {
    setProgress(0, "Failed.");
    showError(err, err.status === 422 ? "form-error" : "run-error");
  } finally {
    setRunning(null);
  }
}

async function cancel() {
  if (!running || !running.id) return;
  setProgress(null, "Cancelling…");
  try {
    const response = await api(`/${ENDPOINT}/requests/${running.id}/cancel`, { method: "PUT" });
    if (!response.ok && response.status !== 400) throw await errorFrom(response);
  } catch (err) {
    showError(err);
  }
}

// --- results and history -----------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function showResult(requestId, output, input, seconds) {
  const box = $("results");
  box.innerHTML = "";
  const n = output.images.length;
  output.images.forEach((image, i) => {
    const nsfw = Boolean(output.has_nsfw_concepts?.[i]);
    const name = image.file_name || `pulid-${output.seed}-${i}.${(image.content_type || "image/jpeg").split("/")[1]}`;
    box.append(el("figure", { class: "result" },
      el("img", {
        src: image.url, width: image.width, height: image.height, class: "result-img",
        alt: `Result ${i + 1} of ${n} for “${output.prompt}”`,
      }),
      el("figcaption", {},
        el("span", { text: `${image.width}×${image.height}` }),
        el("span", { text: `seed ${output.seed}`, class: "seed" }),
        el("span", { text: `inference ${output.timings.inference.toFixed(2)} s · total ${seconds.toFixed(1)} s` }),
        el("span", { text: nsfw ? "NSFW: flagged" : "NSFW: no", class: nsfw ? "badge warn" : "badge" }),
        el("a", { href: image.url, download: name, class: "download", text: `Download ${name}` }))));
  });
  box.append(el("p", { class: "muted small" },
    `Request ${requestId} · `,
    el("button", {
      type: "button", class: "link", text: "Reuse this seed",
      onclick: () => { setSeed(output.seed); changed(); $("seed").focus(); },
    })));
}

function loadHistory() {
  try {
    const list = JSON.parse(localStorage.getItem(HISTORY_STORE) || "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

function saveHistory(list) {
  for (;;) {
    try {
      localStorage.setItem(HISTORY_STORE, JSON.stringify(list));
      return;
    } catch {
      if (!list.length) return;
      list.pop(); // over the storage quota: drop the oldest
    }
  }
}

// Data URIs (sync_mode) are too big for localStorage: keep a small JPEG thumbnail instead.
function thumbnail(url) {
  return new Promise((resolve) => {
    if (!url.startsWith("data:")) return resolve(url);
    const img = new Image();
    img.onload = () => {
      const scale = Math.min(1, 320 / Math.max(img.width, img.height));
      const canvas = document.createElement("canvas");
      canvas.width = Math.round(img.width * scale);
      canvas.height = Math.round(img.height * scale);
      canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
      resolve(canvas.toDataURL("image/jpeg", 0.8));
    };
    img.onerror = () => resolve(null);
    img.src = url;
  });
}

async function addHistory(requestId, output, input, seconds) {
  const images = [];
  for (const [i, image] of output.images.entries()) {
    images.push({ url: await thumbnail(image.url), width: image.width, height: image.height,
      nsfw: Boolean(output.has_nsfw_concepts?.[i]), inline: image.url.startsWith("data:") });
  }
  const list = loadHistory();
  list.unshift({ id: requestId, at: Date.now(), prompt: output.prompt, seed: output.seed,
    inference: output.timings.inference, seconds, images, input: { ...input, seed: output.seed } });
  saveHistory(list.slice(0, HISTORY_MAX));
  renderHistory();
}

function renderHistory() {
  const list = loadHistory();
  const ol = $("history");
  ol.innerHTML = "";
  $("history-empty").hidden = list.length > 0;
  $("history-clear").hidden = list.length === 0;
  for (const entry of list) {
    const when = new Date(entry.at);
    const figs = entry.images.map((image, i) => {
      const img = el("img", { src: image.url || "", alt: `History: ${entry.prompt} (${i + 1})`, loading: "lazy",
        width: image.width, height: image.height });
      img.addEventListener("error", () => img.replaceWith(el("span", { class: "expired",
        text: "Image expired on the server" })));
      return img;
    });
    ol.append(el("li", { class: "card" },
      el("div", { class: "thumbs" }, ...figs),
      el("p", { class: "prompt", text: entry.prompt, title: entry.prompt }),
      el("p", { class: "muted small",
        text: `seed ${entry.seed} · ${entry.inference.toFixed(2)} s · ${when.toLocaleString()}` }),
      el("div", { class: "row" },
        el("button", { type: "button", class: "secondary small", text: "Load inputs",
          "aria-label": `Load the inputs of “${entry.prompt}”`,
          onclick: () => { applyInputs(entry.input); changed(); $("prompt").focus(); } }),
        el("button", { type: "button", class: "secondary small", text: "Remove",
          "aria-label": `Remove “${entry.prompt}” from the history`,
          onclick: () => { saveHistory(loadHistory().filter((e) => e.id !== entry.id)); renderHistory(); } }))));
  }
}

// --- inputs kept between visits, code snippets ------------------------------------------

function saveInputs(input) {
  const kept = { ...input };
  if ((kept.reference_image_url || "").startsWith("data:")) delete kept.reference_image_url;
  localStorage.setItem(INPUTS_STORE, JSON.stringify(kept));
}

let lang = "curl";
let pending = 0;

function changed() {
  clearTimeout(pending);
  pending = setTimeout(() => { $("code").textContent = snippet(lang, BASE, collectInput()); }, 100);
}

function setupTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const select = (tab) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", on ? "true" : "false");
      t.tabIndex = on ? 0 : -1;
    }
    lang = tab.dataset.lang;
    $("code").setAttribute("aria-labelledby", tab.id);
    $("code").textContent = snippet(lang, BASE, collectInput());
    $("copy-state").textContent = "";
  };
  for (const tab of tabs) {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (e) => {
      const i = tabs.indexOf(tab);
      const next = e.key === "ArrowRight" ? tabs[(i + 1) % tabs.length] :
        e.key === "ArrowLeft" ? tabs[(i - 1 + tabs.length) % tabs.length] : null;
      if (next) {
        e.preventDefault();
        next.focus();
        select(next);
      }
    });
  }
  $("copy").addEventListener("click", async () => {
    const text = $("code").textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      // No clipboard permission (e.g. plain HTTP on a LAN address): select the text instead.
      const range = document.createRange();
      range.selectNodeContents($("code"));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      $("copy-state").textContent = "Selected: press Ctrl+C to copy.";
      return;
    }
    $("copy-state").textContent = "Copied.";
  });
}

// --- server state, API key ---------------------------------------------------------------

async function checkHealth() {
  const box = $("server");
  try {
    const response = await fetch("/health", { cache: "no-store" });
    const health = await response.json();
    const model = health.model || health.model_name || "unknown model";
    box.dataset.state = health.ready ? "ready" : "waiting";
    $("server-text").textContent = health.ready ?
      `Ready · ${model} · ${health.queue.in_queue} queued` :
      "Server up, no worker ready yet (loading the model?)";
    if (health.random_weights) box.title = "Random weights: images are noise, for testing only";
  } catch {
    box.dataset.state = "down";
    $("server-text").textContent = `Server unreachable at ${BASE}`;
  }
}

function setupKey() {
  const input = $("api-key");
  const state = () => {
    $("key-state").textContent = apiKey() ? "(kept in this tab)" : "(none set)";
  };
  localStorage.removeItem(KEY_STORE); // where earlier versions kept it
  input.value = apiKey();
  state();
  const save = () => {
    const value = input.value.trim();
    if (value) sessionStorage.setItem(KEY_STORE, value);
    else sessionStorage.removeItem(KEY_STORE);
    $("err-api-key").textContent = "";
    input.removeAttribute("aria-invalid");
    state();
  };
  input.addEventListener("change", save);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    save();
    if (apiKey()) $("key-box").open = false;
  });
  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    input.value = "";
    state();
  });
}

function resetForm() {
  applyInputs({ ...DEFAULTS, reference_image_urls: [] });
  setValue("image_size.width", CUSTOM_DEFAULT.width);
  setValue("image_size.height", CUSTOM_DEFAULT.height);
  clearErrors();
  changed();
}

function init() {
  buildSliders();
  resetForm();
  try {
    const saved = JSON.parse(localStorage.getItem(INPUTS_STORE) || "null");
    if (saved) applyInputs(saved);
  } catch {
    localStorage.removeItem(INPUTS_STORE);
  }
  setupReference();
  setupKey();
  setupTabs();
  $("image_size").addEventListener("change", () => { syncCustomSize(); changed(); });
  $("seed-random").addEventListener("change", () => {
    $("seed").disabled = $("seed-random").checked;
    if (!$("seed-random").checked) $("seed").focus();
    changed();
  });
  $("form").addEventListener("input", changed);
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("reset").addEventListener("click", resetForm);
  $("history-clear").addEventListener("click", () => { saveHistory([]); renderHistory(); });
  renderHistory();
  changed();
  checkHealth();
  setInterval(checkHealth, 15000);
  document.body.dataset.ready = "true"; // lets tests wait for the module to have run
}

init();
