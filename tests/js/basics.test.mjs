// The client's API against a real 2-shard server: chat across shards, exactly once and
// in order, presence events, history paging, refusals as typed errors, close.
import { test } from "node:test";
import assert from "node:assert/strict";
import { api, clientsOnShards, control, load, ms, opts, server, take, waitUntil } from "./support.mjs";

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
    await waitUntil(() => events.length > 0, 10, "grace's join event");
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

test("disconnected by the server: 4403 stops the client for good, 4400 lets it back", async () => {
  const kicked = await ChatClient.connect(url, opts({ user: "kicked", rooms: ["kick"] }));
  const bounced = await ChatClient.connect(url, opts({ user: "bounced", rooms: ["kick"] }));
  const errors = [];
  const back = [];
  kicked.on("error", (e) => errors.push(e));
  bounced.on("reconnected", (e) => back.push(e));
  try {
    await api("disconnect", { user: "kicked", reason: "banned for spam" });
    await waitUntil(() => kicked.state === "failed", 10, "the 4403");
    assert.ok(kicked.failure instanceof Closed);
    assert.equal(kicked.failure.code, 4403);
    assert.match(kicked.failure.reason, /banned for spam/);
    assert.deepEqual(errors, [kicked.failure]);
    await assert.rejects(kicked.send("kick", "let me in"), (e) => e instanceof Closed && e.code === 4403);
    assert.equal(kicked.reconnects, 0);
    await api("disconnect", { user: "bounced", reconnect: true });
    await waitUntil(() => back.length > 0, 10, "the reconnect after 4400");
    assert.equal(back[0].recovered, true);
    assert.ok((await bounced.send("kick", "back")) >= 1);
    assert.equal(kicked.reconnects, 0); // still not back
  } finally {
    kicked.close();
    bounced.close();
  }
});

test("a publish past a bound is refused at once: overloaded with retryAfter; the rest delivered once", async () => {
  // The room's owner stops for a moment: the forwards of a publisher on the other shard
  // wait for it, and past overload.forwards (256 here) in flight a publish is refused at once.
  const { shard: owner } = await control("owner", { room: "flooded" });
  const [writer] = await clientsOnShards(ChatClient, [1 - owner], (i) =>
    ChatClient.connect(url, opts({ user: `flood${i}`, rooms: ["flooded"] })));
  const reader = await ChatClient.connect(url, opts({ user: "floodreader", rooms: ["flooded"] }));
  const got = reader.messages();
  let outcomes;
  await control("signal", { shard: owner, signal: "STOP" });
  try {
    const sends = Array.from({ length: 400 }, (_, i) => writer.send("flooded", `f${i}`));
    const settled = sends.map((p) => p.then(() => "acked", (e) => e));
    // Refused at once, while the owner is still stopped.
    // The deadline's timer is cleared once the race is decided: left pending, it kept
    // node's test run alive for its whole 10 s after the last test.
    let timer;
    const deadline = new Promise((r) => { timer = setTimeout(r, ms(10), "none"); });
    const first = await Promise.race([...settled, deadline]).finally(() => clearTimeout(timer));
    assert.ok(first instanceof ChatError, `first answer: ${first}`);
    assert.equal(first.code, "overloaded");
    assert.ok(typeof first.retryAfter === "number" && first.retryAfter > 0);
    await control("signal", { shard: owner, signal: "CONT" });
    outcomes = await Promise.allSettled(sends);
  } finally {
    await control("signal", { shard: owner, signal: "CONT" });
  }
  try {
    const refused = outcomes.filter((o) => o.status === "rejected").map((o) => o.reason);
    assert.ok(refused.length >= 400 - 256, `${refused.length} refused`);
    for (const error of refused) assert.equal(error.code, "overloaded", String(error));
    const acked = outcomes.filter((o) => o.status === "fulfilled").map((o) => o.value);
    const messages = await take(got, acked.length);
    assert.deepEqual(messages.map((m) => m.seq), [...acked].sort((x, y) => x - y));
  } finally {
    writer.close();
    reader.close();
  }
});
