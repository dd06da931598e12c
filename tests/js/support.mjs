// What the node tests share: the servers pytest started, their control port, the
// client module as the server serves it, and deadlines that scale like pytest's.
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import WebSocket from "ws";

export const FACTOR = Number(process.env.SHARDCHAT_TEST_TIMEOUT_FACTOR || "1");
const CONTROL = process.env.SHARDCHAT_CONTROL;
let servers = JSON.parse(process.env.SHARDCHAT_SERVERS || "{}");

export function server(name = "main") {
  const s = servers[name];
  if (!s) throw new Error(`no server ${name}: run these tests through pytest (tests/js/test_node_client.py)`);
  return s;
}

/** Ask pytest's control port to act on a server (kill, wait_started, restart). */
export async function control(action, body = {}) {
  const answer = await fetch(`${CONTROL}/${action}`, { method: "POST", body: JSON.stringify(body) });
  const data = await answer.json();
  if (answer.status !== 200) throw new Error(`control ${action}: ${data.error}`);
  if (action === "restart") servers = data;
  return data;
}

/** A call of the server API (POST /api/<method> with the key): its result. */
export async function api(method, body, name = "main") {
  const s = server(name);
  const answer = await fetch(`${s.http}/api/${method}`, {
    method: "POST", headers: { "X-API-Key": s.api_key, "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const data = await answer.json();
  if (answer.status !== 200) throw new Error(`api ${method}: ${JSON.stringify(data)}`);
  return data.result;
}

export async function status(name = "main") {
  return (await fetch(`${server(name).admin}/status`)).json();
}

// The module exactly as the server serves it at /shardchat.js (imported from a
// temporary file, so that stack traces name a file and a line).
export async function load(name = "main") {
  const answer = await fetch(`${server(name).http}/shardchat.js`);
  if (answer.headers.get("content-type") !== "text/javascript; charset=utf-8") {
    throw new Error(`/shardchat.js served as ${answer.headers.get("content-type")}`);
  }
  const dir = await mkdtemp(join(tmpdir(), "shardchat-js-"));
  const file = join(dir, "shardchat.js");
  await writeFile(file, await answer.text());
  try {
    return await import(pathToFileURL(file).href);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export const ms = (seconds) => seconds * 1000 * FACTOR;

/** Wait until `predicate()` is true, or fail after `seconds` (scaled). */
export async function waitUntil(predicate, seconds = 10, what = "a condition") {
  const deadline = Date.now() + ms(seconds);
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A WebSocket class that records its instances, so that a test can pause one. */
export class TrackedWebSocket extends WebSocket {
  static instances = [];
  constructor(...args) {
    super(...args);
    TrackedWebSocket.instances.push(this);
  }
}

/** Options every client of the tests takes. */
export function opts(extra = {}) {
  return { WebSocket, backoff: [20, 500], ...extra };
}

/** Connect clients until each listed shard has one (the kernel picks the shard). */
export async function clientsOnShards(ChatClient, shards, make) {
  const found = new Map();
  const spare = [];
  for (let attempt = 0; attempt < 200 && found.size < shards.length; attempt++) {
    const client = await make(attempt);
    if (shards.includes(client.shard) && !found.has(client.shard)) found.set(client.shard, client);
    else spare.push(client);
  }
  for (const c of spare) c.close();
  if (found.size < shards.length) throw new Error(`no clients on shards ${shards}`);
  return shards.map((s) => found.get(s));
}

/** A reader and a writer in `room` (users `${prefix}reader`, `${prefix}writer`), and the
 * reader's "reconnected" and "joined" events as they come: a restart's witnesses. */
export async function readerAndWriter(ChatClient, url, room, prefix) {
  const reader = await ChatClient.connect(url, opts({ user: `${prefix}reader`, rooms: [room] }));
  const writer = await ChatClient.connect(url, opts({ user: `${prefix}writer`, rooms: [room] }));
  const reconnected = [];
  const joined = [];
  reader.on("reconnected", (e) => reconnected.push(e));
  reader.on("joined", (e) => joined.push(e));
  return { reader, writer, reconnected, joined };
}

/** The next `count` messages from a client's iterator (kept open for more). */
export async function take(iterator, count, seconds = 30) {
  const got = [];
  const deadline = Date.now() + ms(seconds);
  while (got.length < count) {
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`got ${got.length} of ${count} messages`)),
                         Math.max(0, deadline - Date.now()));
    });
    try {
      const next = await Promise.race([iterator.next(), timeout]);
      if (next.done) throw new Error(`the stream ended after ${got.length} of ${count}`);
      got.push(next.value);
    } finally {
      clearTimeout(timer);
    }
  }
  return got;
}
