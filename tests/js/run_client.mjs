// Drives the unmodified @fal-ai/client against a pulid-flux server and prints one JSON report.
// usage: node run_client.mjs <proxy|middleware> <base-url> <input.json>
// input.json: {"reference": <data URI of a face>, "no_face": <data URI>, "png_base64": <bytes>}
import { readFileSync } from "node:fs";
import { createFalClient, ValidationError, ApiError } from "@fal-ai/client";

const [mode, base, inputPath] = process.argv.slice(2);
const input = JSON.parse(readFileSync(inputPath, "utf8"));
const APP = "fal-ai/flux-pulid";

const rewrite = (u) =>
  u
    .replace(/^https:\/\/queue\.fal\.run/, base)
    .replace(/^https:\/\/fal\.run/, `${base}/run`)
    .replace(/^https:\/\/rest\.fal\.ai/, `${base}/rest`);

const config = { credentials: "js-test-key" };
if (mode === "proxy") {
  config.proxyUrl = { url: `${base}/api/fal/proxy`, when: "always" };
} else {
  config.requestMiddleware = async (req) => ({ ...req, url: rewrite(req.url) });
}
const fal = createFalClient(config);

const small = (extra = {}) => ({
  prompt: "a portrait photo",
  reference_image_url: input.reference,
  image_size: { width: 256, height: 256 },
  num_inference_steps: 4,
  ...extra,
});

const report = {};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function step(name, fn) {
  try {
    report[name] = await fn();
  } catch (err) {
    report[name] = {
      thrown: err?.constructor?.name ?? "Error",
      message: String(err?.message ?? err),
      status: err?.status,
      body: err?.body,
      fieldErrors: err instanceof ValidationError ? err.fieldErrors : undefined,
    };
  }
}

await step("subscribe_polling", async () => {
  const statuses = [];
  let logs = [];
  const res = await fal.subscribe(APP, {
    input: small({ seed: 99 }),
    logs: true,
    pollInterval: 100,
    onQueueUpdate: (u) => {
      statuses.push(u.status);
      // Each update carries the whole log so far (the client accumulates stream events).
      if (u.logs) logs = u.logs.map((l) => l.message);
    },
  });
  return { statuses, logs, requestId: res.requestId, data: res.data };
});

await step("subscribe_streaming", async () => {
  const statuses = [];
  let logs = [];
  const res = await fal.subscribe(APP, {
    input: small(),
    logs: true,
    mode: "streaming",
    onQueueUpdate: (u) => {
      statuses.push(u.status);
      // Each update carries the whole log so far (the client accumulates stream events).
      if (u.logs) logs = u.logs.map((l) => l.message);
    },
  });
  return { statuses, logs, requestId: res.requestId, data: res.data };
});

await step("submit_status_result", async () => {
  const sub = await fal.queue.submit(APP, { input: small() });
  const first = await fal.queue.status(APP, { requestId: sub.request_id, logs: true });
  const stream = await fal.queue.streamStatus(APP, { requestId: sub.request_id, logs: true });
  const events = [];
  stream.on("data", (e) => events.push({ status: e.status, logs: (e.logs ?? []).map((l) => l.message) }));
  const last = await stream.done();
  const res = await fal.queue.result(APP, { requestId: sub.request_id });
  return { submitted: sub, first: first.status, events, last: last.status, requestId: res.requestId, data: res.data };
});

await step("storage_settings", async () => {
  // storageSettings travel as x-fal-object-lifecycle-preference; "immediate" is 60 s
  const sub = await fal.queue.submit(APP, { input: small(), storageSettings: { expiresIn: "immediate" } });
  await fal.queue.cancel(APP, { requestId: sub.request_id });
  return { requestId: sub.request_id };
});

await step("cancel_running", async () => {
  const sub = await fal.queue.submit(APP, { input: small({ num_inference_steps: 50 }) });
  for (let i = 0; i < 300; i++) {
    const s = await fal.queue.status(APP, { requestId: sub.request_id, logs: true });
    if (s.status === "IN_PROGRESS" && (s.logs ?? []).some((l) => l.message.startsWith("step "))) break;
    await sleep(50);
  }
  await fal.queue.cancel(APP, { requestId: sub.request_id });
  let s;
  for (let i = 0; i < 300; i++) {
    s = await fal.queue.status(APP, { requestId: sub.request_id, logs: true });
    if (s.status === "COMPLETED") break;
    await sleep(50);
  }
  return { status: s.status, error: s.error, error_type: s.error_type, logs: (s.logs ?? []).map((l) => l.message) };
});

await step("run", async () => {
  const res = await fal.run(APP, { input: small() });
  return { requestId: res.requestId, data: res.data };
});

await step("stream", async () => {
  const stream = await fal.stream(APP, { input: small() });
  const events = [];
  for await (const ev of stream) events.push(ev);
  const last = await stream.done();
  return { count: events.length, first: events[0], last };
});

await step("upload", async () => {
  const bytes = Buffer.from(input.png_base64, "base64");
  const url = await fal.storage.upload(new Blob([bytes], { type: "image/png" }));
  const fetched = Buffer.from(await (await fetch(url)).arrayBuffer());
  const res = await fal.run(APP, { input: small({ reference_image_url: url }) });
  return { url, same: fetched.equals(bytes), data: res.data };
});

await step("upload_lifecycle", async () => {
  const bytes = Buffer.from(input.png_base64, "base64");
  const url = await fal.storage.upload(new Blob([bytes], { type: "image/png" }), { lifecycle: { expiresIn: "1h" } });
  return { url };
});

await step("run_get", async () => {
  // method "get" sends the input as query parameters: a short file URL, a named size
  const bytes = Buffer.from(input.png_base64, "base64");
  const url = await fal.storage.upload(new Blob([bytes], { type: "image/png" }));
  const res = await fal.run(APP, {
    method: "get",
    input: { prompt: "a portrait photo", reference_image_url: url, image_size: "square", num_inference_steps: 2, seed: 7 },
  });
  return { requestId: res.requestId, data: res.data };
});

await step("auto_blob_upload", async () => {
  const bytes = Buffer.from(input.png_base64, "base64");
  const res = await fal.subscribe(APP, {
    input: small({ reference_image_url: new Blob([bytes], { type: "image/png" }) }),
  });
  return { data: res.data };
});

await step("invalid_input", async () => {
  await fal.run(APP, { input: small({ guidance_scale: 25 }) });
  return { thrown: null };
});

await step("no_face", async () => {
  await fal.subscribe(APP, { input: small({ reference_image_url: input.no_face }), pollInterval: 100 });
  return { thrown: null };
});

console.log(JSON.stringify(report));
