// The client's handling of frames, on a scripted socket (no server): gap notices, seq
// dedupe of resends and replays, cumulative acks, history told apart from live
// messages, a refused rejoin, a changed epoch.
import { test } from "node:test";
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

const here = dirname(fileURLToPath(import.meta.url));
const { ChatClient, ChatError } = await import(join(here, "../../shardchat/static/shardchat.js"));

/** A WebSocket the test drives: what the client sends is kept, what it gets is pushed. */
class ScriptedSocket {
  static last = null;
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    ScriptedSocket.last = this;
    queueMicrotask(() => { this.readyState = 1; this.onopen?.({}); });
  }
  send(data) { this.sent.push(JSON.parse(data)); }
  close(code = 1000, reason = "") { this.drop(code, reason); }
  push(frame) { this.onmessage?.({ data: JSON.stringify(frame) }); }
  drop(code, reason = "") {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  frames(type) { return this.sent.filter((f) => f.type === type); }
}

const tick = () => new Promise((r) => setTimeout(r, 0));
const message = (seq, content = `m${seq}`) =>
  ({ type: "message", room: "r", seq, content, sender: "s", timestamp: 1, id: `x${seq}` });

async function started(options = {}) {
  const client = new ChatClient("ws://test/ws", { WebSocket: ScriptedSocket, user: "u", rooms: ["r"],
                                                  ackDelay: 1, backoff: [1, 2], ...options });
  const start = client.start();
  await tick();
  const ws = ScriptedSocket.last;
  ws.push({ type: "welcome", user: "u", shard: 0, heartbeat: 30, protocol: 1 });
  ws.push({ type: "joined", room: "r", seq: 0, epoch: "e1", count: 1, users: ["u"] });
  await start;
  return { client, ws };
}

test("a gap is an event; messages go on in seq order, each once", async () => {
  const { client, ws } = await started();
  const got = [];
  const gaps = [];
  client.on("message", (m) => got.push(m.seq));
  client.on("gap", (g) => gaps.push(g));
  ws.push(message(1));
  ws.push(message(1)); // a resend
  ws.push({ type: "gap", room: "r", first: 2, last: 4 });
  ws.push(message(5));
  ws.push(message(3)); // late, below what was delivered: dropped
  assert.deepEqual(got, [1, 5]);
  assert.deepEqual(gaps, [{ room: "r", first: 2, last: 4 }]);
  await new Promise((r) => setTimeout(r, 10));
  // Reliable mode from the join (ack of joined.seq), then one cumulative ack.
  assert.deepEqual(ws.frames("ack").map((f) => f.seq), [0, 5]);
  client.close();
});

test("a history page is told apart from live messages by seq", async () => {
  const { client, ws } = await started();
  const live = [];
  client.on("message", (m) => live.push(m.seq));
  ws.push(message(1));
  ws.push(message(2));
  const page = client.history("r", { limit: 10 });
  ws.push(message(3)); // live, sent before the server took the request
  ws.push(message(1)); // the page: at or below what was delivered
  ws.push(message(2));
  ws.push(message(3));
  ws.push({ type: "history_end", room: "r", seq: 3 });
  assert.deepEqual((await page).map((m) => m.seq), [1, 2, 3]);
  assert.deepEqual(live, [1, 2, 3]);
  assert.deepEqual(ws.frames("history").map((f) => f.limit), [10]);
  client.close();
});

test("after a drop: rejoin with since and epoch, resend with the same key, a new epoch restarts", async () => {
  const { client, ws } = await started();
  const joined = [];
  client.on("joined", (e) => joined.push(e));
  ws.push(message(1));
  ws.push(message(2));
  const sent = client.send("r", "hello");
  const first = ws.frames("message")[0];
  assert.equal(first.key, first.id);
  ws.drop(1006);
  await new Promise((r) => setTimeout(r, 20));
  const ws2 = ScriptedSocket.last;
  assert.notEqual(ws2, ws);
  ws2.push({ type: "welcome", user: "u", shard: 1, heartbeat: 30, protocol: 1 });
  assert.deepEqual(ws2.frames("join").map(({ room, since, epoch }) => ({ room, since, epoch })),
                   [{ room: "r", since: 2, epoch: "e1" }]);
  assert.deepEqual(ws2.frames("message").map((f) => [f.key, f.content]), [[first.key, "hello"]]);
  ws2.push({ type: "joined", room: "r", seq: 3, epoch: "e2", count: 1, users: ["u"], recovered: false });
  assert.equal(joined.at(-1).epochChanged, true);
  const got = [];
  client.on("message", (m) => got.push(m.seq));
  ws2.push(message(1, "new run")); // a new epoch: seqs start again, taken from 1
  ws2.push({ type: "ack", id: first.id, room: "r", seq: 2 });
  assert.equal(await sent, 2);
  assert.deepEqual(got, [1]);
  client.close();
});

test("a rejoin refused after a reconnect is an event; the other rooms go on", async () => {
  const { client, ws } = await started({ rooms: ["r"] });
  const refused = [];
  client.on("refused", (e) => refused.push(e));
  const reconnected = [];
  client.on("reconnected", (e) => reconnected.push(e));
  ws.drop(1001, "shutdown");
  await new Promise((r) => setTimeout(r, 20));
  const ws2 = ScriptedSocket.last;
  ws2.push({ type: "welcome", user: "u", shard: 0, heartbeat: 30, protocol: 1 });
  const join = ws2.frames("join")[0];
  ws2.push({ type: "error", code: "room_full", reason: "the room is full", id: join.id });
  assert.equal(refused.length, 1);
  assert.ok(refused[0].error instanceof ChatError && refused[0].error.code === "room_full");
  assert.equal(reconnected.length, 1);
  assert.equal(client.rooms.has("r"), false);
  client.close();
});

test("overloaded carries retryAfter; the publish is not resent", async () => {
  const { client, ws } = await started();
  const sent = client.send("r", "busy");
  const request = ws.frames("message")[0];
  ws.push({ type: "error", code: "overloaded", reason: "server overloaded", retry_after: 1.5,
            id: request.id });
  await assert.rejects(sent, (e) => e instanceof ChatError && e.code === "overloaded" && e.retryAfter === 1.5);
  ws.drop(1006);
  await new Promise((r) => setTimeout(r, 20));
  ScriptedSocket.last.push({ type: "welcome", user: "u", shard: 0, heartbeat: 30, protocol: 1 });
  assert.deepEqual(ScriptedSocket.last.frames("message"), []);
  client.close();
});
