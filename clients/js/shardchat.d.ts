// Types of shardchat.js, the shardchat client (one ES module, no dependency).

export declare const PROTOCOL: 1;
/** Milliseconds between acks at most, by default. */
export declare const ACK_DELAY: number;

/** A room message, delivered once and in seq order per room. */
export interface Message {
  room: string;
  /** The room's sequence number: 1, 2, 3 ... the same on every shard. */
  seq: number;
  sender: string;
  content: string;
  /** When the server accepted it, ms since the Unix epoch. */
  timestamp: number;
  /** The server's id of the message. */
  id: string;
}

/** A WebSocket constructor: the browser's, Node 22's global one, or `ws`'s default export. */
export type WebSocketLike = new (url: string) => {
  readonly readyState: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
};

/** Where a client is in a room: join with `since`/`epoch` to get what came after. */
export interface RoomPosition {
  room: string;
  /** The last seq delivered. */
  since: number;
  epoch: string;
}

export interface ChatClientOptions {
  /** The user name (when the server does not use tokens); none: the server names a guest. */
  user?: string | null;
  /** A signed token (JWT), when the server requires one. */
  token?: string | null;
  /** Called before every connection attempt for a fresh token (after a 4401 "token expired"). */
  getToken?: (() => string | Promise<string>) | null;
  /** Rooms to join at once: names, or positions to resume from (see ChatClient.position). */
  rooms?: Array<string | RoomPosition>;
  /** First and largest delay between reconnects, in ms; doubled per failure, with up to 25% jitter. Default [50, 5000]. */
  backoff?: [number, number];
  /** Give up (Unavailable) when the server could not be reached for this many ms in a row; null: never. */
  timeout?: number | null;
  /** Give up after this many failed attempts in a row; null: no limit. */
  attempts?: number | null;
  /** Ms between cumulative acks at most (keep it well under the server's delivery.ack_timeout). Default 50. */
  ackDelay?: number;
  /** Ack what arrives, so that the server resends what is lost (reliable mode). Default true. */
  reliable?: boolean;
  /** The WebSocket class; default globalThis.WebSocket (pass `ws` in Node 20). */
  WebSocket?: WebSocketLike;
  /** Listeners to add at once, as with on(). */
  on?: Partial<{ [K in keyof EventMap]: (event: EventMap[K]) => void }>;
  /** A test hook: return true to skip sending that ack (to show the server resends). */
  dropAck?: ((room: string, seq: number) => boolean) | null;
}

export interface ConnectedEvent {
  user: string;
  shard: number;
  /** False when some room's messages could not all be recovered (see `lost`). */
  recovered: boolean;
  /** The rooms whose missed messages the server no longer held (or whose history was reset). */
  lost: string[];
}

export interface JoinedEvent {
  room: string;
  /** The room's latest seq. */
  seq: number;
  epoch: string;
  count: number;
  users: string[];
  /** False when messages were missed that the server no longer held. */
  recovered: boolean;
  /** The server lost the room's history (a full restart): seqs start again under a new epoch. */
  epochChanged: boolean;
}

export interface EventMap {
  connecting: { attempt: number; url: string };
  /** The first connection, once every room is joined. */
  connected: ConnectedEvent;
  /** A later connection, once every room is rejoined (and resumed). */
  reconnected: ConnectedEvent;
  /** The connection dropped; the next attempt follows in `delay` ms. */
  disconnected: { reason: string; delay: number };
  joined: JoinedEvent;
  left: { room: string };
  message: Message;
  /** Presence: someone's first connection joined a room. */
  join: { room: string; user: string; timestamp: number };
  /** Presence: someone's last connection left a room. */
  leave: { room: string; user: string; timestamp: number };
  /** The server could not deliver seqs first..last of a room; fetch them with history() if wanted. */
  gap: { room: string; first: number; last: number };
  /** A request with no promise to reject was refused (a rejoin after a reconnect ...). */
  refused: { room: string | null; error: ChatError };
  /** The client stopped for good with this error. */
  error: ClientError;
  /** The client stopped (close(), or an error). */
  closed: { error: ClientError };
}

export interface Presence {
  room: string;
  count: number;
  users: string[];
  /** The list was cut at the server's presence.list_limit. */
  truncated: boolean;
}

export interface HistoryOptions {
  /** At most this many; alone: the latest. */
  limit?: number;
  /** Only messages before this seq ("load older"). */
  before?: number;
  /** Only messages after this seq (the oldest first). */
  since?: number;
}

export declare class ChatClient implements AsyncIterable<Message> {
  constructor(url: string, options?: ChatClientOptions);
  /** Create a client and start it. */
  static connect(url: string, options?: ChatClientOptions): Promise<ChatClient>;
  readonly url: string;
  /** The user name the server gave this connection (welcome), null while not connected. */
  readonly name: string | null;
  /** The shard of the current connection. */
  readonly shard: number | null;
  readonly state: "idle" | "connecting" | "connected" | "reconnecting" | "closed" | "failed";
  readonly failure: ClientError | null;
  readonly reconnects: number;
  /** Rejoins where the server no longer held what was missed. */
  readonly gaps: number;
  /** Where this client is in `room` (null before its first join): pass it in `rooms` to resume elsewhere. */
  position(room: string): RoomPosition | null;
  /** Connect and join the rooms; rejects at once for a permanent refusal, with Unavailable when the limits run out. */
  start(): Promise<void>;
  on<K extends keyof EventMap>(kind: K, listener: (event: EventMap[K]) => void): () => void;
  /** Every room message from now on, once, in seq order per room; ends after close(), throws the failure. */
  messages(): AsyncIterableIterator<Message>;
  [Symbol.asyncIterator](): AsyncIterableIterator<Message>;
  /** Join now (or at the next connection: then it resolves with null). Rejects with ChatError (unauthorized, room_full ...). */
  join(room: string): Promise<JoinedEvent | null>;
  leave(room: string): void;
  /** Publish; resolves with the seq the server gave the message. */
  send(room: string, content: string, options?: { key?: string }): Promise<number>;
  presence(room: string): Promise<Presence>;
  history(room: string, options?: HistoryOptions): Promise<Message[]>;
  /** A normal close (1000): what waits rejects with Closed(1000), the iterators end. */
  close(): void;
}

export declare class ClientError extends Error {}

/** The upgrade was refused for good: HTTP 4xx other than 408/429 (bad name 400, token 401, origin 403). */
export declare class Refused extends ClientError {
  readonly status: number;
  readonly reason: string;
}

/** A request refused with an `error` frame: code is the protocol's (rate_limited, overloaded, not_member ...). */
export declare class ChatError extends ClientError {
  readonly code: string;
  readonly reason: string;
  /** Seconds to wait before trying again (with `overloaded`), else null. */
  readonly retryAfter: number | null;
}

/** A close a reconnect would not mend (1002-1010; 4403 disconnected by the server), or close() (1000). */
export declare class Closed extends ClientError {
  readonly code: number;
  readonly reason: string;
}

/** Not reachable within `timeout` or `attempts`. */
export declare class Unavailable extends ClientError {
  readonly attempts: number;
  readonly last: string;
}

export default ChatClient;
