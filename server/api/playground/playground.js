// The MultiTalk playground: upload, queue, follow and play requests to the ai-avatar endpoints on this server.
// Plain browser JS, no dependencies; the protocol is the one in docs/api.md.
"use strict";

// The endpoints, and each one's fields, limits, choices and defaults, are declared once, in the request contract;
// the page reads them from the OpenAPI schema the server generates from it: every `/queue/<app_id>` POST route
// and the input schema its body refers to. Relative to the page, so a path prefix keeps.
const SCHEMA_PATH = "openapi.json";
const QUEUE_PREFIX = "/queue/";
const DEFAULT_APP_ID = "fal-ai/ai-avatar/multi"; // shown first when the browser has no choice stored
// The page's controls per kind of field; an endpoint's schema says which of them it has (the others are hidden).
const NUMBER_FIELDS = ["num_frames", "seed"];
const CHOICE_FIELDS = ["resolution", "acceleration", "audio_mode", "voice", "voice1", "voice2"];
const TEXT_FIELDS = ["text_input", "first_text_input", "second_text_input"]; // the texts to speak
const AUDIO_FIELDS = ["audio_url", "first_audio_url", "second_audio_url"]; // file inputs `<field>-input`
// Only words for the menus; which entries exist, their order and the default are the schema's.
const CHOICE_LABELS = {
  acceleration: { none: "none (most steps)", high: "high (fewest steps)" },
  audio_mode: { add: "add: take turns", para: "para: speak at once" },
};
const KEY_STORAGE = "multitalk.apiKey";
const ENDPOINT_STORAGE = "multitalk.endpoint";
const HISTORY_STORAGE = "multitalk.history";
const HISTORY_MAX = 50;
const POLL_MS = 1000;
const FPS = 25;
const FACE_SCALE = 0.05; // the server's margin around the default halves (model/person_masks.py)
const COLORS = ["#e4572e", "#2e86de"];

const $ = (id) => document.getElementById(id);

const state = {
  image: null,      // {file, bitmap, width, height}
  boxes: [null, null], // [x_min, y_min, x_max, y_max] in image pixels, per speaker
  drag: null,
  followToken: 0,   // bumped to stop following the previous request
  schema: null,     // a Promise of true once the options are applied from the server's schema, false if not
  endpoints: [],    // [{appId, path, schemaName, model}] from the server's schema
  endpoint: null,   // the chosen one
};

// ---- API calls -------------------------------------------------------------------------------------

function authHeaders(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Key ${key}` } : extra;
}

async function readBody(response) {
  const text = await response.text();
  try { return JSON.parse(text); } catch { return text; }
}

class ApiError extends Error {
  constructor(response, body) {
    const detail = body && typeof body === "object" ? body.detail : body;
    super(typeof detail === "string" ? detail : `${response.status} ${response.statusText}`);
    this.status = response.status;
    this.body = body;
  }
}

async function api(url, options = {}) {
  const response = await fetch(url, { ...options, headers: authHeaders(options.headers) });
  const body = await readBody(response);
  if (!response.ok && response.status !== 202) throw new ApiError(response, body);
  return body;
}

async function upload(file) {
  const { upload_url, file_url } = await api("/storage/upload/initiate", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ file_name: file.name, content_type: file.type || "application/octet-stream" }),
  });
  const put = await fetch(upload_url, {
    method: "PUT", body: file, headers: { "Content-Type": file.type || "application/octet-stream" },
  });
  if (!put.ok) throw new ApiError(put, await readBody(put));
  return file_url;
}

// ---- endpoints and their request options, from the server's schema ---------------------------------

function queueEndpoints(openapi) {
  // Each queue submit route with a JSON body names its input schema: /queue/<app_id> → #/components/schemas/<name>.
  const schemas = openapi.components?.schemas || {};
  const endpoints = [];
  for (const [path, item] of Object.entries(openapi.paths || {})) {
    const ref = item.post?.requestBody?.content?.["application/json"]?.schema?.$ref;
    if (!path.startsWith(QUEUE_PREFIX) || typeof ref !== "string") continue;
    const schemaName = ref.split("/").pop();
    const model = schemas[schemaName];
    if (model?.properties) endpoints.push({ appId: path.slice(QUEUE_PREFIX.length), path, schemaName, model });
  }
  return endpoints;
}

function endpointHas(name) {
  return Boolean(state.endpoint && name in state.endpoint.model.properties);
}

function fieldSchema(name) {
  // A nullable field (seed) is {anyOf: [{type, minimum, ...}, {type: "null"}], default, ...}.
  const property = state.endpoint.model.properties[name];
  const variant = (property.anyOf || []).find((entry) => entry.type !== "null") || {};
  return { ...variant, ...property };
}

function applyNumberField(name, spec) {
  const input = $(name);
  if (typeof spec.minimum !== "number" || typeof spec.maximum !== "number") {
    throw new Error(`${state.endpoint.schemaName}.${name} has no minimum and maximum`);
  }
  input.min = String(spec.minimum);
  input.max = String(spec.maximum);
  // The endpoint's default: it shows unless the user has typed into the field (then their value stays).
  input.defaultValue = spec.default == null ? "" : String(spec.default);
  $(`${name}-hint`).textContent = `${spec.minimum}–${spec.maximum}${name === "num_frames" ? `, ${FPS} fps` : ""}`;
}

function applyChoiceField(name, spec) {
  if (!Array.isArray(spec.enum) || !spec.enum.length) {
    throw new Error(`${state.endpoint.schemaName}.${name} has no enum`);
  }
  const select = $(name), labels = CHOICE_LABELS[name] || {};
  // A choice the user made (not the default selection) stays when the new endpoint offers it.
  const chosen = [...select.options].some((option) => option.selected !== option.defaultSelected) ? select.value : null;
  const fallback = spec.enum.includes(spec.default) ? spec.default : spec.enum[0];
  const selected = spec.enum.includes(chosen) ? chosen : fallback;
  select.replaceChildren(...spec.enum.map((value) =>
    new Option(labels[value] || String(value), value, value === fallback, value === selected)));
}

function applyTextField(name, spec) {
  if (typeof spec.maxLength === "number") $(name).maxLength = spec.maxLength;
  $(name).placeholder = Array.isArray(spec.examples) && spec.examples.length ? String(spec.examples[0]) : "";
}

function showEndpoint(appId) {
  const endpoint = state.endpoints.find((entry) => entry.appId === appId) || state.endpoints[0];
  state.endpoint = endpoint;
  $("endpoint").value = endpoint.appId;
  $("endpoint-info").textContent = (endpoint.model.description || "").replaceAll("`", "");
  document.querySelectorAll("#form [data-field]").forEach((element) => {
    element.hidden = !endpointHas(element.dataset.field);
  });
  for (const name of NUMBER_FIELDS.filter(endpointHas)) applyNumberField(name, fieldSchema(name));
  for (const name of CHOICE_FIELDS.filter(endpointHas)) applyChoiceField(name, fieldSchema(name));
  for (const name of TEXT_FIELDS.filter(endpointHas)) applyTextField(name, fieldSchema(name));
  clearErrors();
  showFrameSeconds();
  drawPreview();
}

function applySchema(openapi) {
  const endpoints = queueEndpoints(openapi);
  if (!endpoints.length) throw new Error("the schema has no queue endpoint with an input schema");
  state.endpoints = endpoints;
  $("endpoint").replaceChildren(...endpoints.map(({ appId }) => new Option(appId, appId)));
  const stored = localStorage.getItem(ENDPOINT_STORAGE);
  const wanted = [stored, DEFAULT_APP_ID].find((appId) => endpoints.some((entry) => entry.appId === appId));
  showEndpoint(wanted);
}

async function loadSchema() {
  const form = $("form"), status = $("schema-status");
  try {
    const response = await fetch(SCHEMA_PATH, { headers: { Accept: "application/json" } });
    const body = await readBody(response);
    if (!response.ok) throw new ApiError(response, body);
    if (!body || typeof body !== "object") throw new Error("the answer is not JSON");
    applySchema(body);
    form.dataset.schema = "ready";
    status.hidden = true;
    status.textContent = "";
    return true;
  } catch (error) {
    form.dataset.schema = "failed";
    status.hidden = false;
    status.className = "schema-status failed";
    status.textContent = `Could not load the request options (endpoints, limits, choices, defaults) from the `
      + `server's schema, ${new URL(SCHEMA_PATH, document.baseURI).pathname}: ${error.message}. `
      + "Nothing can be submitted; reload the page to try again.";
    $("submit").disabled = true;
    return false;
  }
}

// ---- image preview and speaker regions ------------------------------------------------------------

function speakers() {
  // As the server counts them: a second person where the endpoint takes a second speech (multi-text requires
  // it) and it is given, unless `use_only_first_audio` switches it off.
  const second = endpointHas("second_text_input")
    || (endpointHas("second_audio_url") && $("second_audio_url-input").files.length > 0);
  return second && !(endpointHas("use_only_first_audio") && $("use_only_first_audio").checked) ? 2 : 1;
}

function placement() {
  return document.querySelector('input[name="placement"]:checked').value;
}

function defaultBoxes(w, h) {
  const half = Math.floor(w / 2);
  const top = Math.floor(h * FACE_SCALE), bottom = Math.floor(h * (1 - FACE_SCALE));
  return [
    [Math.floor(half * FACE_SCALE), top, Math.floor(half * (1 - FACE_SCALE)), bottom],
    [Math.floor(half * FACE_SCALE + half), top, Math.floor(half * (1 - FACE_SCALE) + half), bottom],
  ];
}

function canvasScale() {
  const canvas = $("preview");
  return state.image ? canvas.width / state.image.width : 1;
}

function drawPreview() {
  const canvas = $("preview"), ctx = canvas.getContext("2d");
  if (!state.image) {
    ctx.fillStyle = "#eef0f3"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.fillStyle = "#889"; ctx.font = "15px sans-serif"; ctx.textAlign = "center";
    ctx.fillText("no image yet", canvas.width / 2, canvas.height / 2);
    return;
  }
  const { bitmap, width, height } = state.image;
  canvas.height = Math.round(canvas.width * height / width);
  ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  const scale = canvasScale(), mode = placement(), count = speakers();
  let regions = [];
  if (mode === "faces") {
    banner(ctx, "speakers: detected on the server (faces; left/right halves if none)");
  } else if (count === 1 && mode === "halves") {
    regions = [[0, 0, width, height]];
    banner(ctx, "one speaker: person 1 is the whole image");
  } else if (mode === "halves") {
    regions = defaultBoxes(width, height);
  } else {
    regions = state.boxes.slice(0, count);
  }
  regions.forEach((box, i) => {
    if (!box) return;
    const [x0, y0, x1, y1] = box.map((v) => v * scale);
    ctx.lineWidth = 3; ctx.strokeStyle = COLORS[i];
    ctx.fillStyle = COLORS[i] + "33";
    ctx.fillRect(x0, y0, x1 - x0, y1 - y0); ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    ctx.fillStyle = COLORS[i]; ctx.fillRect(x0, y0, 22, 22);
    ctx.fillStyle = "#fff"; ctx.font = "bold 15px sans-serif"; ctx.textAlign = "center";
    ctx.fillText(String(i + 1), x0 + 11, y0 + 16);
    if (mode === "boxes") { ctx.fillStyle = COLORS[i]; ctx.fillRect(x1 - 8, y1 - 8, 8, 8); }
  });
  $("boxes-text").textContent = mode === "boxes"
    ? `speaker_boxes: ${JSON.stringify(state.boxes.slice(0, count).map((b) => b || null))}` : "";
}

function banner(ctx, text) {
  ctx.fillStyle = "rgba(0,0,0,.6)"; ctx.fillRect(0, 0, ctx.canvas.width, 26);
  ctx.fillStyle = "#fff"; ctx.font = "14px sans-serif"; ctx.textAlign = "left";
  ctx.fillText(text, 8, 18);
}

async function setImage(file) {
  if (!file) return;
  try {
    const bitmap = await createImageBitmap(file);
    state.image = { file, bitmap, width: bitmap.width, height: bitmap.height };
    state.boxes = defaultBoxes(bitmap.width, bitmap.height);
    $("image-info").textContent = `${file.name}: ${bitmap.width}×${bitmap.height} px`;
    setError("image_url", "");
  } catch {
    state.image = null;
    setError("image_url", `${file.name} is not an image this browser can show`);
  }
  drawPreview();
}

function imagePoint(event) {
  const canvas = $("preview"), rect = canvas.getBoundingClientRect();
  const scale = canvasScale() * rect.width / canvas.width;
  const clamp = (v, max) => Math.max(0, Math.min(max, Math.round(v)));
  return [clamp((event.clientX - rect.left) / scale, state.image.width),
          clamp((event.clientY - rect.top) / scale, state.image.height)];
}

function onPointerDown(event) {
  if (!state.image || placement() !== "boxes") return;
  const [x, y] = imagePoint(event);
  const handle = 12 / canvasScale();
  const count = speakers();
  let drag = null;
  for (let i = count - 1; i >= 0 && !drag; i--) {
    const box = state.boxes[i];
    if (!box) continue;
    if (Math.abs(x - box[2]) < handle && Math.abs(y - box[3]) < handle) drag = { kind: "resize", i, box: [...box] };
    else if (x >= box[0] && x <= box[2] && y >= box[1] && y <= box[3]) drag = { kind: "move", i, box: [...box] };
  }
  if (!drag) {
    const i = Math.min(Number(document.querySelector('input[name="box-target"]:checked').value), count - 1);
    drag = { kind: "draw", i, box: [x, y, x, y], previous: state.boxes[i] };
  }
  drag.start = [x, y];
  state.drag = drag;
  $("preview").setPointerCapture(event.pointerId);
  event.preventDefault();
}

function onPointerMove(event) {
  const drag = state.drag;
  if (!drag) return;
  const [x, y] = imagePoint(event), [sx, sy] = drag.start, { width, height } = state.image;
  const [x0, y0, x1, y1] = drag.box;
  let box;
  if (drag.kind === "draw") {
    box = [Math.min(sx, x), Math.min(sy, y), Math.max(sx, x), Math.max(sy, y)];
  } else if (drag.kind === "resize") {
    box = [x0, y0, Math.max(x0 + 1, x), Math.max(y0 + 1, y)];
  } else {
    const dx = Math.max(-x0, Math.min(width - x1, x - sx)), dy = Math.max(-y0, Math.min(height - y1, y - sy));
    box = [x0 + dx, y0 + dy, x1 + dx, y1 + dy];
  }
  state.boxes[drag.i] = box;
  drawPreview();
}

function onPointerUp() {
  const drag = state.drag;
  state.drag = null;
  if (drag && drag.kind === "draw") {
    const box = state.boxes[drag.i];
    if (box[2] - box[0] < 2 || box[3] - box[1] < 2) state.boxes[drag.i] = drag.previous || null;
  }
  drawPreview();
}

// ---- audio -----------------------------------------------------------------------------------------

function setAudio(field) {
  const file = $(`${field}-input`).files[0], player = $(`${field}-player`), clear = $(`${field}-clear`);
  if (player.src) URL.revokeObjectURL(player.src);
  $(`${field}-duration`).textContent = "";
  if (file) player.src = URL.createObjectURL(file);
  else player.removeAttribute("src");
  player.hidden = !file;
  if (clear) clear.hidden = !file;
  drawPreview();
}

function showDuration(field) {
  const seconds = $(`${field}-player`).duration;
  if (Number.isFinite(seconds)) {
    $(`${field}-duration`).textContent = `${seconds.toFixed(2)} s (${Math.round(seconds * FPS)} frames)`;
  }
}

function showFrameSeconds() {
  const frames = Number($("num_frames").value);
  $("num_frames-seconds").textContent = Number.isFinite(frames) && frames > 0 ? `≈ ${(frames / FPS).toFixed(2)} s` : "";
}

// ---- errors ----------------------------------------------------------------------------------------

function setError(field, message) {
  const element = $(`error-${field}`);
  if (element) element.textContent = message;
  return Boolean(element);
}

function clearErrors() {
  // The form's own; an error of the request being followed stays with it.
  document.querySelectorAll("#form .error").forEach((element) => { element.textContent = ""; });
}

function showValidationErrors(detail) {
  const unplaced = [];
  const byField = {};
  for (const item of detail) {
    const field = Array.isArray(item.loc) && item.loc[0] === "body" ? item.loc[1] : item.loc && item.loc[0];
    (byField[field] = byField[field] || []).push(item.msg);
  }
  for (const [field, messages] of Object.entries(byField)) {
    if (!setError(field, messages.join("; "))) unplaced.push(...messages);
  }
  $("form-error").textContent = unplaced.length ? unplaced.join("; ") : "The server refused the input; see the marked fields.";
}

function errorMessages(body) {
  if (body && Array.isArray(body.detail)) return body.detail.map((item) => item.msg).join("; ");
  if (body && typeof body === "object") return [body.detail, body.error_type && `(${body.error_type})`].filter(Boolean).join(" ");
  return String(body);
}

// ---- submit ----------------------------------------------------------------------------------------

function collectOptions() {
  const body = { prompt: $("prompt").value };
  const frames = $("num_frames").value.trim();
  if (frames !== "") body.num_frames = /^-?\d+$/.test(frames) ? Number(frames) : frames;
  if ($("seed-random").checked) body.seed = null;
  else {
    const seed = $("seed").value.trim();
    if (seed !== "") body.seed = /^\d+$/.test(seed) ? Number(seed) : seed;
  }
  if (endpointHas("use_only_first_audio")) body.use_only_first_audio = $("use_only_first_audio").checked;
  for (const name of CHOICE_FIELDS.filter(endpointHas)) body[name] = $(name).value;
  // An empty text is left out, so the server's 422 says the field is required.
  for (const name of TEXT_FIELDS.filter(endpointHas)) if ($(name).value.trim()) body[name] = $(name).value;
  const negative = $("negative_prompt").value.trim();
  if (negative) body.negative_prompt = negative;
  const mode = placement();
  if (mode === "faces") body.speaker_placement = "faces";
  if (mode === "boxes") body.speaker_boxes = state.boxes.slice(0, speakers()).filter(Boolean);
  return body;
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const button = $("submit");
  button.disabled = true;
  try {
    // Submitted before the options arrived: wait for them (the endpoint and the selects are unknown until then).
    if ($("form").dataset.schema === "loading") button.textContent = "Loading options…";
    if (!await state.schema) {
      $("form-error").textContent = "The request options could not be loaded from the server; reload the page.";
      return;
    }
    const endpoint = state.endpoint;
    const image = $("image-input").files[0] || (state.image && state.image.file);
    const audios = AUDIO_FIELDS.filter(endpointHas).map((field) => [field, $(`${field}-input`).files[0]]);
    let missing = false;
    if (!image) { setError("image_url", "image_url: choose an image"); missing = true; }
    for (const [field, file] of audios) {
      if (!file && endpoint.model.required?.includes(field)) {
        setError(field, `${field}: choose a file with the speech`);
        missing = true;
      }
    }
    if (missing) { $("form-error").textContent = "Some inputs are missing."; return; }

    button.textContent = "Uploading…";
    const body = collectOptions();
    body.image_url = await upload(image);
    for (const [field, file] of audios) if (file) body[field] = await upload(file);
    button.textContent = "Submitting…";
    const queued = await api(endpoint.path, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const entry = {
      id: queued.request_id, time: new Date().toISOString(), prompt: body.prompt, status: queued.status,
      endpoint: endpoint.appId,
      video_url: null, status_url: queued.status_url, response_url: queued.response_url, cancel_url: queued.cancel_url,
    };
    saveEntry(entry);
    follow(entry);
  } catch (error) {
    if (error instanceof ApiError && error.status === 422 && Array.isArray(error.body && error.body.detail)) {
      showValidationErrors(error.body.detail);
    } else if (error instanceof ApiError && error.status === 401) {
      $("form-error").textContent = `${error.message} — set the API key at the top of the page.`;
    } else {
      $("form-error").textContent = `Could not submit: ${error.message}`;
    }
  } finally {
    button.disabled = $("form").dataset.schema === "failed";
    button.textContent = "Generate";
  }
}

// ---- following a request ---------------------------------------------------------------------------

const PROGRESS_LINE = /clip (\d+)\/(\d+) step (\d+)\/(\d+)/;

function showProgress(logs, status) {
  let fraction = status === "COMPLETED" ? 1 : 0, label = "";
  for (const { message } of logs || []) {
    const match = PROGRESS_LINE.exec(message);
    if (!match) continue;
    const [clip, clips, step, steps] = match.slice(1).map(Number);
    fraction = ((clip - 1) + step / steps) / clips;
    label = `clip ${clip}/${clips} · step ${step}/${steps}`;
  }
  $("progress").value = fraction;
  $("progress-label").textContent = status === "COMPLETED" ? "" : label || `${Math.round(fraction * 100)}%`;
}

function resetJobPanel(entry) {
  $("job-id").textContent = entry.id;
  $("status").textContent = entry.status || "…";
  $("queue-position").textContent = "";
  $("progress").value = 0;
  $("progress-label").textContent = "";
  $("logs").textContent = "";
  $("job-error").textContent = "";
  $("result").hidden = true;
  $("result-video").removeAttribute("src");
  $("cancel").hidden = true;
}

async function follow(entry) {
  const token = ++state.followToken;
  const active = () => token === state.followToken;
  resetJobPanel(entry);
  $("cancel").onclick = () => cancel(entry);
  while (active()) {
    let status;
    try {
      status = await api(`${entry.status_url}${entry.status_url.includes("?") ? "&" : "?"}logs=1`);
    } catch (error) {
      if (!active()) return;
      $("job-error").textContent = `Status unavailable: ${error.message}`;
      if (error instanceof ApiError && error.status === 404) { updateEntry(entry.id, { status: "NOT_FOUND" }); return; }
      await sleep(POLL_MS * 3);
      continue;
    }
    if (!active()) return;
    $("job-error").textContent = "";
    $("status").textContent = status.status;
    $("queue-position").textContent = status.status === "IN_QUEUE" && status.queue_position != null
      ? `position ${status.queue_position} in the queue` : "";
    $("logs").textContent = (status.logs || []).map((line) => line.message).join("\n");
    $("logs").scrollTop = $("logs").scrollHeight;
    showProgress(status.logs, status.status);
    $("cancel").hidden = status.status === "COMPLETED";
    if (status.status === "COMPLETED") { await showResult(entry, status); return; }
    updateEntry(entry.id, { status: status.status });
    await sleep(POLL_MS);
  }
}

async function showResult(entry, status) {
  if (status.error) {
    $("job-error").textContent = `Failed: ${status.error}${status.error_type ? ` (${status.error_type})` : ""}`;
    updateEntry(entry.id, { status: status.error_type === "client_cancelled" ? "CANCELLED" : "FAILED" });
    return;
  }
  try {
    const result = await api(entry.response_url);
    const video = result.video;
    $("result-video").src = video.url;
    $("result-download").href = video.url;
    $("result-download").setAttribute("download", video.file_name || `${entry.id}.mp4`);
    $("result-seed").textContent = `seed ${result.seed}`;
    $("result").hidden = false;
    updateEntry(entry.id, { status: "COMPLETED", video_url: video.url });
  } catch (error) {
    $("job-error").textContent = `Failed: ${error instanceof ApiError ? errorMessages(error.body) : error.message}`;
    updateEntry(entry.id, { status: "FAILED" });
  }
}

async function cancel(entry) {
  try {
    const answer = await api(entry.cancel_url, { method: "PUT" });
    $("queue-position").textContent = `cancel: ${answer.status || answer}`;
  } catch (error) {
    $("job-error").textContent = `Cancel failed: ${error.message}`;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---- history ---------------------------------------------------------------------------------------

function loadHistory() {
  try { return JSON.parse(localStorage.getItem(HISTORY_STORAGE)) || []; } catch { return []; }
}

function storeHistory(entries) {
  localStorage.setItem(HISTORY_STORAGE, JSON.stringify(entries.slice(0, HISTORY_MAX)));
  renderHistory();
}

function saveEntry(entry) {
  storeHistory([entry, ...loadHistory().filter((e) => e.id !== entry.id)]);
}

function updateEntry(id, changes) {
  const entries = loadHistory();
  const entry = entries.find((e) => e.id === id);
  if (!entry || Object.entries(changes).every(([k, v]) => entry[k] === v)) return;
  Object.assign(entry, changes);
  storeHistory(entries);
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  const entries = loadHistory();
  if (!entries.length) {
    const empty = document.createElement("li");
    empty.className = "muted"; empty.textContent = "none yet";
    list.append(empty);
  }
  for (const entry of entries) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button"; button.className = "history-entry"; button.dataset.id = entry.id;
    const time = new Date(entry.time).toLocaleString();
    button.innerHTML = "<span class=status></span> <span class=time></span> <span class=endpoint></span>"
      + "<br><span class=prompt></span>";
    button.querySelector(".status").textContent = entry.status || "";
    button.querySelector(".status").dataset.status = entry.status || "";
    button.querySelector(".time").textContent = time;
    button.querySelector(".endpoint").textContent = entry.endpoint || "";
    button.querySelector(".prompt").textContent = entry.prompt || "(no prompt)";
    button.title = entry.id;
    button.onclick = () => follow(entry);
    item.append(button);
    if (entry.video_url) {
      const link = document.createElement("a");
      link.href = entry.video_url; link.textContent = "video"; link.target = "_blank";
      item.append(" ", link);
    }
    list.append(item);
  }
}

// ---- wiring ----------------------------------------------------------------------------------------

function init() {
  const keyInput = $("api-key");
  keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
  keyInput.addEventListener("input", () => localStorage.setItem(KEY_STORAGE, keyInput.value.trim()));

  $("image-input").addEventListener("change", () => setImage($("image-input").files[0]));
  const drop = $("image-drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (!file) return;
    const transfer = new DataTransfer();
    transfer.items.add(file);
    $("image-input").files = transfer.files;
    setImage(file);
  });

  const canvas = $("preview");
  canvas.addEventListener("pointerdown", onPointerDown);
  canvas.addEventListener("pointermove", onPointerMove);
  canvas.addEventListener("pointerup", onPointerUp);
  canvas.addEventListener("pointercancel", onPointerUp);

  document.querySelectorAll('input[name="placement"]').forEach((radio) => radio.addEventListener("change", () => {
    $("box-tools").hidden = placement() !== "boxes";
    drawPreview();
  }));
  $("boxes-reset").addEventListener("click", () => {
    if (state.image) state.boxes = defaultBoxes(state.image.width, state.image.height);
    drawPreview();
  });

  $("endpoint").addEventListener("change", () => {
    localStorage.setItem(ENDPOINT_STORAGE, $("endpoint").value);
    showEndpoint($("endpoint").value);
  });
  for (const field of AUDIO_FIELDS) {
    $(`${field}-input`).addEventListener("change", () => setAudio(field));
    $(`${field}-player`).addEventListener("loadedmetadata", () => showDuration(field));
  }
  $("second_audio_url-clear").addEventListener("click", () => {
    $("second_audio_url-input").value = "";
    setAudio("second_audio_url");
  });
  $("use_only_first_audio").addEventListener("change", drawPreview);

  $("num_frames").addEventListener("input", showFrameSeconds);
  $("seed-random").addEventListener("change", () => { $("seed").disabled = $("seed-random").checked; });
  $("form").addEventListener("submit", submit);
  $("history-clear").addEventListener("click", () => storeHistory([]));

  state.schema = loadSchema();
  showFrameSeconds();
  drawPreview();
  renderHistory();
}

document.addEventListener("DOMContentLoaded", init);
