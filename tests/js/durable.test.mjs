// With the room store (storage.dir), a full restart keeps every room's history, seq and
// epoch: the client resumes where it was and says it recovered everything.
import { test } from "node:test";
import assert from "node:assert/strict";
import { control, load, readerAndWriter, server, take, waitUntil } from "./support.mjs";

const { ChatClient } = await load("durable");

test("a full restart of a server with a store: resumed, nothing lost, nothing twice", async () => {
  const url = server("durable").url;
  const { reader, writer, reconnected, joined } = await readerAndWriter(ChatClient, url, "kept", "d");
  try {
    const got = reader.messages();
    for (let i = 0; i < 20; i++) await writer.send("kept", `before${i}`);
    const before = await take(got, 20);
    await control("restart", { server: "durable" });
    await waitUntil(() => reconnected.length > 0, 30, "the reader's reconnect");
    assert.equal(reconnected[0].recovered, true);
    assert.deepEqual(reconnected[0].lost, []);
    assert.equal(joined.at(-1).epochChanged, false);
    for (let i = 0; i < 5; i++) await writer.send("kept", `after${i}`);
    const after = await take(got, 5);
    assert.deepEqual(after.map((m) => m.content), ["after0", "after1", "after2", "after3", "after4"]);
    const last = before.at(-1).seq;
    assert.deepEqual(after.map((m) => m.seq), [last + 1, last + 2, last + 3, last + 4, last + 5]);
  } finally {
    reader.close();
    writer.close();
  }
});
