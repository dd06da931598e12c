// Tokens: a missing one is refused (401) at once; one that expires ends the connection
// (4401), and the client asks getToken for a fresh one and resumes its rooms.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { load, opts, server, take, waitUntil } from "./support.mjs";

const { ChatClient, Refused } = await load("tokens");
const { url, token_secret: secret } = server("tokens");

/** An HS256 JWT (RFC 7519) signed with the server's secret. */
function sign(claims) {
  const part = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}
const inSeconds = (s) => Math.floor(Date.now() / 1000) + s;

test("no token: refused with 401 and the server's reason, at once", async () => {
  await assert.rejects(ChatClient.connect(url, opts({ user: "anyone" })), (e) => {
    assert.ok(e instanceof Refused);
    assert.equal(e.status, 401);
    assert.match(e.reason, /token/);
    return true;
  });
});

test("an expired token ends the connection (4401); getToken's fresh one resumes the rooms", async () => {
  let issued = 0;
  const getToken = async () => {
    issued += 1;
    return sign({ sub: "shortlived", exp: inSeconds(issued === 1 ? 3 : 600) });
  };
  const reader = await ChatClient.connect(url, opts({ getToken, rooms: ["tokened"] }));
  const writer = await ChatClient.connect(url, opts({ token: sign({ sub: "writer", exp: inSeconds(600) }),
                                                      rooms: ["tokened"] }));
  const reasons = [];
  const back = [];
  reader.on("disconnected", (e) => reasons.push(e.reason));
  reader.on("reconnected", (e) => back.push(e));
  try {
    assert.equal(reader.name, "shortlived");
    const got = reader.messages();
    await writer.send("tokened", "before");
    await waitUntil(() => back.length > 0, 15, "the reconnect with a fresh token");
    assert.ok(reasons.some((r) => r.includes("4401")), `closes: ${reasons}`);
    assert.equal(issued, 2);
    assert.equal(back[0].recovered, true);
    await writer.send("tokened", "after");
    assert.deepEqual((await take(got, 2)).map((m) => m.content), ["before", "after"]);
  } finally {
    reader.close();
    writer.close();
  }
});
