// The client's API against a real 2-shard server: chat across shards, exactly once and
// in order, presence events, history paging, refusals as typed errors, close.
import { test } from "node:test";
import assert from "node:assert/strict";
import { clientsOnShards, load, opts, server, take } from "./support.mjs";

const lib = await load();
const { ChatClient, ChatError, Closed, Refused, Unavailable } = lib;
const url = server().url;

test("two clients on two shards chat, each message once and in order", async () => {
  const [ada, bob] = await clientsOnShards(ChatClient, [0, 1], (i) =>
    ChatClient.connect(url, opts({ user: `ada${i}`, rooms: ["two"] })));
  try {
    assert.notEqual(ada.shard, bob.shard); // welcome.shard: really on two shards
    const adaStream = ada.messages();
    const bobStream = bob.messages();
    const seqs = await Promise.all(Array.from({ length: 50 }, (_, i) =>
      (i % 2 ? bob : ada).send("two", `m${i}`)));
    assert.equal(new Set(seqs).size, 50);
    for (const stream of [adaStream, bobStream]) {
      const got = await take(stream, 50);
      const bySeq = [...got].sort((a, b) => a.seq - b.seq);
      assert.deepEqual(got, bySeq);  // in seq order
      assert.deepEqual(got.map((m) => m.seq), [...seqs].sort((a, b) => a - b));  // each once
    }
  } finally {
    ada.close();
    bob.close();
  }
});

test("presence events, presence and history pages", async () => {
  const ada = await ChatClient.connect(url, opts({ user: "pada", rooms: ["pres"] }));
  const events = [];
  ada.on("join", (e) => events.push(["join", e.user]));
  ada.on("leave", (e) => events.push(["leave", e.user]));
  const grace = await ChatClient.connect(url, opts({ user: "pgrace", rooms: ["pres"] }));
  try {
    const presence = await ada.presence("pres");
    assert.deepEqual([...presence.users].sort(), ["pada", "pgrace"]);
    assert.equal(presence.count, 2);
    for (let i = 1; i <= 30; i++) await grace.send("pres", `h${i}`);
    const latest = await ada.history("pres", { limit: 10 });
    assert.deepEqual(latest.map((m) => m.content), Array.from({ length: 10 }, (_, i) => `h${21 + i}`));
    const older = await ada.history("pres", { limit: 10, before: latest[0].seq });
    assert.deepEqual(older.map((m) => m.content), Array.from({ length: 10 }, (_, i) => `h${11 + i}`));
    // History of a room this client is not in.
    const outsider = await grace.history("pres", { limit: 3 });
    assert.equal(outsider.length, 3);
    grace.close();
    const deadline = Date.now() + 10000;
    while (!events.some((e) => e[0] === "leave") && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.deepEqual(events, [["join", "pgrace"], ["leave", "pgrace"]]);
  } finally {
    ada.close();
    grace.close();
  }
});

test("a refused name is a Refused with the server's status and reason, at once", async () => {
  const started = Date.now();
  await assert.rejects(ChatClient.connect(url, opts({ user: "bad name" })), (error) => {
    assert.ok(error instanceof Refused);
    assert.equal(error.status, 400);
    assert.match(error.reason, /user/);
    return true;
  });
  assert.ok(Date.now() - started < 5000);
});

test("refused requests are ChatErrors; the connection goes on", async () => {
  const ada = await ChatClient.connect(url, opts({ user: "errada", rooms: ["err"] }));
  try {
    await assert.rejects(ada.send("elsewhere", "x"), (e) => e instanceof ChatError && e.code === "not_member");
    await assert.rejects(ada.send("err", "x".repeat(5000)), (e) => e instanceof ChatError && e.code === "too_large");
    assert.ok((await ada.send("err", "still here")) >= 1);
  } finally {
    ada.close();
  }
});

test("nothing listening: Unavailable after the attempts", async () => {
  await assert.rejects(
    ChatClient.connect("ws://127.0.0.1:9/ws", opts({ user: "nobody", attempts: 3, backoff: [10, 20] })),
    (e) => e instanceof Unavailable && e.attempts === 3);
});

test("close() ends the streams and rejects what waits", async () => {
  const ada = await ChatClient.connect(url, opts({ user: "closer", rooms: ["closing"] }));
  const stream = ada.messages();
  const next = stream.next();
  ada.close();
  assert.deepEqual(await next, { value: undefined, done: true });
  await assert.rejects(ada.send("closing", "late"), (e) => e instanceof Closed && e.code === 1000);
});
