// The client rides out what happens to servers: a kill -9 of a shard mid-stream, a full
// restart, a reader too slow for the server. Every message arrives once and in order,
// and what could not be recovered is said.
import { test } from "node:test";
import assert from "node:assert/strict";
import { clientsOnShards, control, load, opts, readerAndWriter, server, status, take, TrackedWebSocket, waitUntil } from "./support.mjs";

const lib = await load();
const { ChatClient } = lib;

/** Publish `count` messages `${tag}${i}${body}` with up to `window` sends in flight (the
 * server refuses a flood beyond its bounds as overloaded). */
async function stream(client, room, tag, count, window = 16, onAck = () => {}, body = "") {
  const inFlight = new Set();
  for (let i = 0; i < count; i++) {
    const p = client.send(room, `${tag}${i}${body}`).then((seq) => { inFlight.delete(p); onAck(i, seq); });
    inFlight.add(p);
    if (inFlight.size >= window) await Promise.race(inFlight);
  }
  await Promise.all(inFlight);
}

test("kill -9 of the reader's shard, then of the writer's: every message once, in order", async () => {
  const url = server().url;
  const [reader, writer] = await clientsOnShards(ChatClient, [0, 1], (i) =>
    ChatClient.connect(url, opts({ user: `k9u${i}`, rooms: ["killed"] })));
  const events = [];
  reader.on("reconnected", (e) => events.push(["reader", e.recovered, e.shard]));
  writer.on("reconnected", (e) => events.push(["writer", e.recovered, e.shard]));
  try {
    const got = reader.messages();
    const total = 600;
    const kills = [];
    await stream(writer, "killed", "k", total, 16, (i) => {
      // Mid-stream: the reader's shard at 150 acks, the writer's at 400.
      if (i === 150) kills.push(control("kill", { shard: 0 }));
      if (i === 400) kills.push(Promise.all(kills).then(() => control("kill", { shard: 1 })));
    });
    await Promise.all(kills);
    const messages = await take(got, total, 60);
    assert.deepEqual(messages.map((m) => m.content), Array.from({ length: total }, (_, i) => `k${i}`));
    const seqs = messages.map((m) => m.seq);
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
    assert.equal(new Set(seqs).size, total);
    assert.ok(events.some((e) => e[0] === "reader"), "the reader reconnected");
    assert.ok(events.some((e) => e[0] === "writer"), "the writer reconnected");
    assert.ok(events.every((e) => e[1] === true), `recovered: ${JSON.stringify(events)}`);
  } finally {
    reader.close();
    writer.close();
    await waitUntil(async () => (await status()).shards.every((s) => s.alive && s.uptime > 0), 30, "both shards back");
  }
});

test("a full restart: the client comes back by itself and says the history was lost", async () => {
  const url = server().url;
  const { reader, writer, reconnected, joined } = await readerAndWriter(ChatClient, url, "restarted", "rs");
  try {
    const got = reader.messages();
    await stream(writer, "restarted", "before", 20);
    assert.equal((await take(got, 20)).length, 20);
    await control("restart");
    await waitUntil(() => reconnected.length > 0, 30, "the reader's reconnect");
    assert.equal(reconnected[0].recovered, false);
    assert.deepEqual(reconnected[0].lost, ["restarted"]);
    const rejoin = joined.at(-1);
    assert.equal(rejoin.epochChanged, true);
    assert.equal(rejoin.recovered, false);
    await stream(writer, "restarted", "after", 5);
    const after = await take(got, 5);
    assert.deepEqual(after.map((m) => m.content), ["after0", "after1", "after2", "after3", "after4"]);
    assert.deepEqual(after.map((m) => m.seq), [1, 2, 3, 4, 5]); // a new run of seqs
  } finally {
    reader.close();
    writer.close();
  }
});

test("a reader too slow for the server is cut (4429), resumes, and loses nothing", async () => {
  const url = server().url;
  const reader = await ChatClient.connect(url, opts({ user: "slowreader", rooms: ["slow"], WebSocket: TrackedWebSocket }));
  const writer = await ChatClient.connect(url, opts({ user: "slowwriter", rooms: ["slow"] }));
  const closes = [];
  reader.on("disconnected", (e) => closes.push(e.reason));
  try {
    const got = reader.messages();
    reader._ws._socket.pause(); // the reader stops reading: the server's queue for it fills
    const total = 1500;
    const body = "x".repeat(4000);
    await stream(writer, "slow", "s", total, 32, () => {}, ` ${body}`);
    reader._ws._socket.resume();
    const messages = await take(got, total, 60);
    assert.deepEqual(messages.map((m) => m.content.split(" ")[0]), Array.from({ length: total }, (_, i) => `s${i}`));
    assert.ok(closes.some((r) => r.includes("4429")), `closes: ${closes}`);
  } finally {
    reader.close();
    writer.close();
  }
});
