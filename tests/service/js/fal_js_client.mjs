// Drives the unmodified @fal-ai/client against a running `multitalk serve`, for
// tests/service/test_fal_js_client.py: every scenario runs once, in order, and the results are
// printed as one JSON object (a scenario that throws records {"error": ...} and the rest still run).
// With `"family": true` (and a `videoDir` to download into) it also runs "family": one subscribe per
// ai-avatar endpoint with the endpoint's defaults (no num_frames, no seed).
//
// Usage: node fal_js_client.mjs '{"base": "http://127.0.0.1:8000", "image": "people.png", "audio": "speech.wav",
//                                 "family": true, "videoDir": "/tmp/videos"}'
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";

import { fal } from "@fal-ai/client";

const APP = "fal-ai/ai-avatar/multi";
const { base, image, audio, family = false, videoDir } = JSON.parse(process.argv[2]);

// The recipe of docs/api.md ("Clients"): fal's hosts rewritten to this server by a request middleware.
fal.config({
  credentials: "any-key",
  requestMiddleware: async (request) => ({
    ...request,
    url: request.url
      .replace("https://queue.fal.run/", `${base}/queue/`)
      .replace("https://fal.run/", `${base}/`)
      .replace("https://rest.fal.ai/", `${base}/`),
  }),
});

function describeError(error) {
  return { name: error.name, status: error.status, message: error.message, body: error.body };
}

const logKey = (log) => `${log.timestamp} ${log.message}`;

async function upload() {
  const imageUrl = await fal.storage.upload(new Blob([await readFile(image)], { type: "image/png" }));
  const audioUrl = await fal.storage.upload(new Blob([await readFile(audio)], { type: "audio/wav" }));
  const downloaded = await fetch(imageUrl);
  return { imageUrl, audioUrl, downloadStatus: downloaded.status, sameBytes:
    Buffer.from(await downloaded.arrayBuffer()).equals(await readFile(image)) };
}

async function subscribeStreaming(input) {
  // Streaming mode: the client appends each status event's logs to what it has shown so far.
  const updates = [];
  const result = await fal.subscribe(APP, {
    input, logs: true, mode: "streaming",
    onQueueUpdate: (update) => updates.push({ status: update.status, logs: (update.logs ?? []).map(logKey) }),
  });
  const finalStatus = await fal.queue.status(APP, { requestId: result.requestId, logs: true });
  return { requestId: result.requestId, seed: result.data.seed, videoUrl: result.data.video.url, updates,
           serverLogs: finalStatus.logs.map(logKey) };
}

async function submitStatusStreamResult(input) {
  const { request_id: requestId } = await fal.queue.submit(APP, { input });
  const queuedCancel = await fal.queue.submit(APP, { input: { ...input, num_frames: 241 } });
  await fal.queue.cancel(APP, { requestId: queuedCancel.request_id });
  const status = await fal.queue.status(APP, { requestId, logs: true });
  const stream = await fal.queue.streamStatus(APP, { requestId, logs: true });
  const events = [];
  stream.on("data", (event) => events.push({ status: event.status, logs: (event.logs ?? []).map(logKey) }));
  const last = await stream.done();
  const result = await fal.queue.result(APP, { requestId });
  const cancelled = await fal.queue.status(APP, { requestId: queuedCancel.request_id });
  let cancelledResult;
  try {
    cancelledResult = await fal.queue.result(APP, { requestId: queuedCancel.request_id });
  } catch (error) {
    cancelledResult = describeError(error);
  }
  return { requestId, firstStatus: status.status, events, lastStatus: last.status, resultRequestId: result.requestId,
           seed: result.data.seed, cancelled: { status: cancelled.status, errorType: cancelled.error_type },
           cancelledResult };
}

async function run(input) {
  const result = await fal.run(APP, { input: { ...input, seed: 7 } });
  return { requestId: result.requestId, seed: result.data.seed, contentType: result.data.video.content_type };
}

async function expectError(call) {
  try {
    await call();
    return { error: "no error raised" };
  } catch (error) {
    return describeError(error);
  }
}

// Each endpoint of the family with what it needs beyond the image, in short English texts (the limit is 20
// characters per second of the default video: 108 for single-text's 136 frames). multi-text's voices are left to
// their defaults.
const FAMILY_INPUTS = {
  "fal-ai/ai-avatar": (audioUrl) => ({ audio_url: audioUrl, prompt: "a person speaking" }),
  "fal-ai/ai-avatar/single-text": () => ({ text_input: "Good morning, it is lovely to see you.", voice: "Bill",
                                           prompt: "a person speaking" }),
  "fal-ai/ai-avatar/multi": (audioUrl) => ({ first_audio_url: audioUrl, prompt: "a person speaking" }),
  "fal-ai/ai-avatar/multi-text": () => ({ first_text_input: "Do you know what we are eating today?",
                                          second_text_input: "I think it is something called pie.",
                                          prompt: "two friends chat at a table" }),
};

async function subscribeWithDefaults(app, input, videoPath) {
  // Polling mode, as a plain `fal.subscribe` does; every log message any update showed, each once, in order.
  const messages = new Set();
  const result = await fal.subscribe(app, {
    input, logs: true,
    onQueueUpdate: (update) => (update.logs ?? []).forEach((log) => messages.add(log.message)),
  });
  const { video } = result.data;
  const downloaded = await fetch(video.url);
  await writeFile(videoPath, Buffer.from(await downloaded.arrayBuffer()));
  const sent = Object.fromEntries(Object.entries(input).filter(([field]) => !field.endsWith("_url")));
  return { requestId: result.requestId, seed: result.data.seed, videoUrl: video.url, fileSize: video.file_size,
           downloadStatus: downloaded.status, videoPath, sent, logs: [...messages] };
}

async function main() {
  const results = {};
  const scenario = async (name, call, into = results) => {
    try {
      into[name] = await call();
    } catch (error) {
      into[name] = { error: `${error.name}: ${error.message}`, detail: describeError(error) };
    }
  };
  await scenario("upload", upload);
  const input = { image_url: results.upload.imageUrl, first_audio_url: results.upload.audioUrl,
                  prompt: "a person speaking", num_frames: 41 };
  await scenario("subscribe", () => subscribeStreaming(input));
  await scenario("queue", () => submitStatusStreamResult(input));
  await scenario("run", () => run(input));
  await scenario("invalid", () => expectError(() => fal.run(APP, { input: { ...input, num_frames: 5 } })));
  await scenario("stream", () => expectError(async () => (await fal.stream(APP, { input })).done()));
  if (family) {
    results.family = {};
    for (const [index, [app, appInput]] of Object.entries(FAMILY_INPUTS).entries()) {
      const input = { image_url: results.upload.imageUrl, ...appInput(results.upload.audioUrl) };
      await scenario(app, () => subscribeWithDefaults(app, input, join(videoDir, `${index}.mp4`)), results.family);
    }
  }
  process.stdout.write(JSON.stringify(results));
}

await main();
