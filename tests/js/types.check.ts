// Compiled (never run) by test_package.py with tsc --strict: the client's declarations
// (clients/js/shardchat.d.ts) type an application's use of it, and reject misuse.
import ChatClientDefault, {
  ChatClient, ChatError, Closed, Refused, Unavailable, type Message, type RoomPosition,
} from "../../clients/js/shardchat.js";

async function app(): Promise<void> {
  const chat = await ChatClient.connect("ws://127.0.0.1:8080/ws", {
    user: "ada", rooms: ["lobby", { room: "news", since: 7, epoch: "e" }], backoff: [100, 5000],
    on: { gap: ({ room, first, last }) => console.log(room, first, last) },
  });
  const seq: number = await chat.send("lobby", "hello", { key: "k1" });
  const off: () => void = chat.on("reconnected", (e) => { if (!e.recovered) console.log(e.lost.join()); });
  off();
  chat.on("disconnected", (e) => console.log(e.reason, e.delay));
  const page: Message[] = await chat.history("lobby", { limit: 50, before: seq });
  const who: string[] = (await chat.presence("lobby")).users;
  const where: RoomPosition | null = chat.position("lobby");
  for await (const m of chat.messages()) console.log(m.room, m.seq, m.sender, m.content, page, who, where);
  try {
    await chat.join("elsewhere");
  } catch (error) {
    if (error instanceof ChatError && error.code === "overloaded") console.log(error.retryAfter ?? 0);
    if (error instanceof Refused) console.log(error.status, error.reason);
    if (error instanceof Closed) console.log(error.code);
    if (error instanceof Unavailable) console.log(error.attempts, error.last);
  }
  chat.close();
  const same: typeof ChatClient = ChatClientDefault;
  // @ts-expect-error: send needs a room and a content
  await chat.send("lobby");
  // @ts-expect-error: an unknown event
  chat.on("nonsense", () => {});
  // @ts-expect-error: a message's seq is a number
  const wrong: string = page[0].seq;
  console.log(same, wrong);
}

void app;
