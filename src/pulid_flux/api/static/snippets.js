// "Copy as code": the current inputs as a curl call, a fal-client (Python) script and an
// @fal-ai/client (JS) script pointed at this server. Keys come from FAL_KEY, never the page.

const ENDPOINT = "fal-ai/flux-pulid";

function shellQuote(text) {
  return "'" + text.replace(/'/g, "'\\''") + "'";
}

// A JSON value as a Python literal (True/False/None differ from JSON).
export function pythonLiteral(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return Number.isFinite(value) ? String(value) : "None";
  if (typeof value === "string") return JSON.stringify(value);
  const inner = indent + "    ";
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return "[\n" + value.map((v) => inner + pythonLiteral(v, inner) + ",\n").join("") + indent + "]";
  }
  const keys = Object.keys(value);
  if (!keys.length) return "{}";
  return "{\n" + keys.map((k) => `${inner}${JSON.stringify(k)}: ${pythonLiteral(value[k], inner)},\n`).join("") +
    indent + "}";
}

function curl(base, input) {
  const body = JSON.stringify(input, null, 2);
  return [
    "# Sync call: waits, then prints the result JSON. FAL_KEY matters only when the server has API keys.",
    `curl -sS -X POST ${shellQuote(base + "/run/" + ENDPOINT)} \\`,
    '  -H "Authorization: Key $FAL_KEY" \\',
    "  -H 'Content-Type: application/json' \\",
    `  -d ${shellQuote(body)}`,
    "",
    "# Or through the queue: submit, follow the status, fetch the result.",
    `REQUEST_ID=$(curl -sS -X POST ${shellQuote(base + "/" + ENDPOINT)} \\`,
    '  -H "Authorization: Key $FAL_KEY" -H \'Content-Type: application/json\' \\',
    `  -d ${shellQuote(JSON.stringify(input))} | python3 -c 'import json,sys; print(json.load(sys.stdin)["request_id"])')`,
    `curl -sS -N -H "Authorization: Key $FAL_KEY" "${base}/${ENDPOINT}/requests/$REQUEST_ID/status/stream?logs=1"`,
    `curl -sS -H "Authorization: Key $FAL_KEY" "${base}/${ENDPOINT}/requests/$REQUEST_ID"`,
  ].join("\n");
}

function python(base, input) {
  return [
    "# pip install fal-client; export FAL_KEY=<an API key of the server> (any value when it has none:",
    "# the client refuses to start without one)",
    "import fal_client",
    "import fal_client.client as fc",
    "",
    "# Point the official client at this server (plain HTTP works this way).",
    `fc.QUEUE_URL_FORMAT = ${JSON.stringify(base + "/")}`,
    `fc.RUN_URL_FORMAT = ${JSON.stringify(base + "/run/")}`,
    `fc.REST_URL = ${JSON.stringify(base + "/rest")}`,
    `fc.CDN_URL = ${JSON.stringify(base + "/cdn")}`,
    "",
    "# A local photo instead of a URL: fal_client.upload_file(\"face.jpg\")",
    "result = fal_client.subscribe(",
    `    ${JSON.stringify(ENDPOINT)},`,
    `    arguments=${pythonLiteral(input, "    ")},`,
    "    with_logs=True,",
    "    on_queue_update=lambda update: print(update),",
    ")",
    'print(result["seed"], [image["url"] for image in result["images"]])',
  ].join("\n");
}

function javascript(base, input) {
  return [
    "// npm install @fal-ai/client   (FAL_KEY in the environment when the server has API keys)",
    'import { createFalClient } from "@fal-ai/client";',
    "",
    `const BASE = ${JSON.stringify(base)};`,
    "// The client's hosts are fixed: rewrite them to this server (queue first, then run, then rest).",
    "const rewrite = (url) => url",
    "  .replace(/^https:\\/\\/queue\\.fal\\.run/, BASE)",
    "  .replace(/^https:\\/\\/fal\\.run/, `${BASE}/run`)",
    "  .replace(/^https:\\/\\/rest\\.fal\\.ai/, `${BASE}/rest`);",
    "const fal = createFalClient({",
    "  credentials: process.env.FAL_KEY,",
    "  requestMiddleware: async (request) => ({ ...request, url: rewrite(request.url) }),",
    "});",
    "",
    `const { data, requestId } = await fal.subscribe(${JSON.stringify(ENDPOINT)}, {`,
    "  input: " + JSON.stringify(input, null, 2).replace(/\n/g, "\n  ") + ",",
    "  logs: true,",
    "  mode: \"streaming\",",
    "  onQueueUpdate: (update) => console.log(update.status, update.logs?.at(-1)?.message ?? \"\"),",
    "});",
    "console.log(requestId, data.seed, data.images.map((image) => image.url));",
  ].join("\n");
}

export function snippet(lang, base, input) {
  // Data URIs would make the snippet unreadable: name them instead.
  const clean = JSON.parse(JSON.stringify(input, (k, v) =>
    typeof v === "string" && v.startsWith("data:") ? "<data URI: upload the file instead>" : v));
  if (lang === "python") return python(base, clean);
  if (lang === "js") return javascript(base, clean);
  return curl(base, clean);
}
