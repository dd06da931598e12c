// shardchat.js: a reconnecting, acking client for shardchat that delivers every room message exactly once.
//
// One ES module, no dependency, for browsers and Node 20+ (pass `WebSocket` from the
// `ws` package where there is no global one). The same semantics as the Python
// ChatClient (shardchat.client): it acks what it receives, cumulatively and at most
// every `ackDelay` ms (so the server resends what it lost), drops duplicates by seq,
// and when the connection drops or its shard restarts it reconnects with exponential
// backoff and jitter and rejoins every room with `since` = the last seq it saw and
// that room's `epoch`, so the application sees each message once and in seq order.
//
//   const chat = await ChatClient.connect("ws://127.0.0.1:8080/ws", { user: "ada", rooms: ["lobby"] });
//   const seq = await chat.send("lobby", "hello");          // the seq the server gave it
//   for await (const m of chat.messages()) console.log(m.room, m.seq, m.sender, m.content);
//
// Failures are of two kinds. Permanent ones reject at once, with the server's status
// or code and reason: Refused (HTTP 4xx at the upgrade), ChatError (a refused join or
// send), Closed (a close that says the client broke the protocol, or 4403: disconnected
// by the server, do not reconnect). Transient ones (connection refused, HTTP 503, close
// 1001, 1006, 4400, 4408, 4409, 4429 ...) are retried, bounded by `timeout` and
// `attempts` when given, then fail with Unavailable.
//
// Publishing is at least once and delivered once: a send whose ack was lost with the
// connection is sent again after the reconnect with the same idempotency `key`.
// Protocol: docs/PROTOCOL.md. All content is data: the library never builds HTML.

export const PROTOCOL = 1;
export const ACK_DELAY = 50; // ms between acks at most: 20 a second per connection in a busy room

// Close codes that say the client broke the protocol: reconnecting would do it again.
// 4403: the server disconnected this client and asks it not to come back.
const PERMANENT_CLOSES = new Set([1002, 1003, 1007, 1008, 1009, 1010, 4403]);
// HTTP statuses at the upgrade that a later attempt may not get (4xx otherwise is final).
const TRANSIENT_STATUSES = new Set([408, 429]);
const OPEN = 1; // WebSocket.OPEN, the same in every implementation

export class ClientError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/** The upgrade was refused for good (HTTP 4xx other than 408/429). */
export class Refused extends ClientError {
  constructor(status, reason) {
    super(`refused: HTTP ${status}: ${reason}`);
    this.status = status;
    this.reason = reason;
  }
}

/** The server refused a request with an `error` frame; `retryAfter` (s) with `overloaded`. */
export class ChatError extends ClientError {
  constructor(code, reason, retryAfter = null) {
    super(`${code}: ${reason}`);
    this.code = code;
    this.reason = reason;
    this.retryAfter = retryAfter;
  }
}

/** A close a reconnect would not mend (1002-1010, 4403), or close() (code 1000). */
export class Closed extends ClientError {
  constructor(code, reason) {
    super(`closed: ${code}${reason ? " " + reason : ""}`);
    this.code = code;
    this.reason = reason;
  }
}

/** The server could not be reached within `timeout` or `attempts`. */
export class Unavailable extends ClientError {
  constructor(attempts, last) {
    super(`unavailable after ${attempts} attempts: ${last}`);
    this.attempts = attempts;
    this.last = last;
  }
}

function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  promise.catch(() => {}); // a rejection nobody awaits is not an unhandled one
  return { promise, resolve, reject };
}

function randomPrefix() {
  // Unique to this client instance, so that its keys never meet another program's of the
  // same user (crypto where there is one: browsers, Node 19+).
  const bytes = new Uint8Array(4);
  if (globalThis.crypto?.getRandomValues) globalThis.crypto.getRandomValues(bytes);
  else bytes.forEach((_, i) => { bytes[i] = Math.floor(Math.random() * 256); });
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function toMessage(frame) {
  return {
    room: frame.room, seq: frame.seq, sender: frame.sender, content: frame.content,
    timestamp: frame.timestamp, id: frame.id,
  };
}

/** A room this client is in: what resuming it needs. */
class RoomState {
  constructor(name) {
    this.name = name;
    this.epoch = null;     // the room's epoch, once joined
    this.lastSeq = null;   // the last seq delivered (null: never joined)
    this.joined = false;   // on the current connection
    this.ackDue = 0;       // the seq to ack at the next flush (0: none)
    this.users = new Set();
    this.history = [];     // history requests waiting, oldest first (their frames come in order)
    this.presence = [];    // presence requests waiting, oldest first
  }
}

export class ChatClient {
  /**
   * @param {string} url ws://host:port/ws (wss:// with TLS)
   * @param {object} [options] see shardchat.d.ts (ChatClientOptions)
   */
  constructor(url, options = {}) {
    this.url = url;
    this.user = options.user ?? null;
    this.token = options.token ?? null;
    this.getToken = options.getToken ?? null;
    this.backoff = options.backoff ?? [50, 5000];
    this.timeout = options.timeout ?? null;
    this.attempts = options.attempts ?? null;
    this.ackDelay = options.ackDelay ?? ACK_DELAY;
    this.reliable = options.reliable ?? true;
    this.dropAck = options.dropAck ?? null;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== "function") {
      throw new TypeError("no WebSocket here: pass one, e.g. { WebSocket } from the 'ws' package");
    }
    this.rooms = new Map(); // name -> RoomState, in the order joined
    for (const entry of options.rooms ?? []) {
      // A name, or {room, since, epoch}: resume from where another client left off.
      const state = new RoomState(typeof entry === "string" ? entry : entry.room);
      if (typeof entry !== "string" && entry.epoch != null && entry.since != null) {
        state.epoch = entry.epoch;
        state.lastSeq = entry.since;
      }
      this.rooms.set(state.name, state);
    }
    this.name = null;      // the user name the server gave us (welcome)
    this.shard = null;     // the shard of the current connection
    this.heartbeat = null; // seconds, from the welcome
    this.reconnects = 0;
    this.gaps = 0;         // rejoins where the server no longer held what was missed
    this.state = "idle";   // idle | connecting | connected | reconnecting | closed | failed
    this.failure = null;
    this._listeners = new Map();
    this._iterators = new Set();
    this._ws = null;
    this._wanted = false;
    this._prefix = randomPrefix();
    this._next = 1;
    this._unsent = new Map();  // request id -> {room, content, key, d}: resent until acked
    this._joins = new Map();   // request id -> {room, d}
    this._started = null;
    this._startedDone = false;
    this._others = new Map(); // reads of rooms the client is not in, per room
    this._rejoining = null;    // rooms a (re)connection is still waiting for
    this._lost = [];           // rooms of this (re)connection that were not recovered
    this._ackTimer = null;
    this._retryTimer = null;
    this._failures = 0;
    this._delay = this.backoff[0];
    this._outageStart = null;
    for (const [kind, fn] of Object.entries(options.on ?? {})) this.on(kind, fn);
  }

  /** Create a client and start it: resolves once connected and in its rooms. */
  static async connect(url, options = {}) {
    const client = new ChatClient(url, options);
    await client.start();
    return client;
  }

  /** Where `room` is: resume it later with `{room, since, epoch}` in `rooms` (null: not joined yet). */
  position(room) {
    const state = this.rooms.get(room);
    if (state === undefined || state.epoch === null) return null;
    return { room, since: state.lastSeq, epoch: state.epoch };
  }

  /** Connect and join `rooms`, then keep the connection up; rejects for a permanent refusal. */
  start() {
    if (this._started === null) {
      const ended = this._ended();
      if (ended !== null) return Promise.reject(ended);
      this._wanted = true;
      this._started = deferred();
      this._outageStart = Date.now();
      this._open();
    }
    return this._started.promise;
  }

  /** Subscribe to an event (see EventMap in shardchat.d.ts); returns the unsubscribe function. */
  on(kind, fn) {
    if (!this._listeners.has(kind)) this._listeners.set(kind, new Set());
    this._listeners.get(kind).add(fn);
    return () => this._listeners.get(kind).delete(fn);
  }

  /** Every room message from now on, once, in seq order per room; ends after close(). */
  messages() {
    const queue = [];
    let wake = null;
    let done = false;
    const entry = {
      push: (m) => { queue.push(m); if (wake) { wake(); wake = null; } },
      end: () => { done = true; if (wake) { wake(); wake = null; } },
    };
    this._iterators.add(entry);
    const client = this;
    return {
      [Symbol.asyncIterator]() { return this; },
      async next() {
        while (queue.length === 0 && !done) await new Promise((r) => { wake = r; });
        if (queue.length) return { value: queue.shift(), done: false };
        client._iterators.delete(entry);
        const failure = client.failure;
        if (failure !== null && !(failure instanceof Closed && failure.code === 1000)) throw failure;
        return { value: undefined, done: true };
      },
      async return() {
        client._iterators.delete(entry);
        done = true;
        return { value: undefined, done: true };
      },
    };
  }

  [Symbol.asyncIterator]() { return this.messages(); }

  /** Join `room` (now when connected, else at the next connection); resolves with the `joined` frame. */
  join(room) {
    const ended = this._ended();
    if (ended !== null) return Promise.reject(ended);
    let state = this.rooms.get(room);
    if (state === undefined) {
      state = new RoomState(room);
      this.rooms.set(room, state);
    }
    return this._connected() ? this._sendJoin(state) : Promise.resolve(null);
  }

  /** Leave `room`: no more of its messages. */
  leave(room) {
    const state = this.rooms.get(room);
    if (state === undefined) return;
    this.rooms.delete(room);
    this._rejectReads(state, new ChatError("not_member", `left ${room}`));
    this._send({ type: "leave", room });
  }

  /**
   * Publish and wait for the ack: resolves with the message's seq. Rejects with a
   * ChatError when the server refuses it (rate_limited, overloaded, not_member,
   * too_large, rejected, unavailable ...). `key`: the idempotency key (default: one
   * unique to this send); a send again with the same key within the server's window
   * is acked with the first one's seq and not delivered twice.
   */
  send(room, content, options = {}) {
    const ended = this._ended();
    if (ended !== null) return Promise.reject(ended);
    const id = `${this._prefix}-${this._next++}`;
    const entry = { room, content, key: options.key ?? id, d: deferred() };
    this._unsent.set(id, entry);
    if (this._connected()) this._publish(id, entry);
    return entry.d.promise;
  }

  /** Who is in `room` now, over the whole server: {room, count, users, truncated}. */
  presence(room) {
    return this._read(room, "presence", { type: "presence", room });
  }

  /**
   * A page of a room's held messages, oldest first: `{limit}` the latest, `{limit, before}`
   * the ones just before seq `before` ("load older"), `{since, limit}` the oldest after `since`.
   */
  history(room, { limit, before, since } = {}) {
    const request = { type: "history", room };
    if (limit !== undefined) request.limit = limit;
    if (before !== undefined) request.before = before;
    if (since !== undefined) request.since = since;
    return this._read(room, "history", request);
  }

  /** Leave with a normal close (1000); pending calls reject with Closed, iterators end. */
  close() {
    this._wanted = false;
    clearTimeout(this._retryTimer);
    clearTimeout(this._ackTimer);
    const ws = this._ws;
    this._ws = null;
    if (ws !== null) {
      try { ws.close(1000); } catch { /* already closing */ }
    }
    this._stop(new Closed(1000, "client closed"), false);
  }

  // Internals

  _emit(kind, event) {
    for (const fn of this._listeners.get(kind) ?? []) {
      try { fn(event); } catch (error) { queueMicrotask(() => { throw error; }); }
    }
  }

  /** Why no call can be made any more (null: they can). */
  _ended() {
    if (this.failure !== null) return this.failure;
    if (this.state === "closed") return new Closed(1000, "client closed");
    return null;
  }

  _connected() {
    return this._ws !== null && this._ws.readyState === OPEN && this.name !== null;
  }

  _send(frame) {
    if (this._ws !== null && this._ws.readyState === OPEN) {
      this._ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  _publish(id, entry) {
    this._send({ type: "message", room: entry.room, content: entry.content, id, key: entry.key });
  }

  _read(room, kind, request) {
    const ended = this._ended();
    if (ended !== null) return Promise.reject(ended);
    const entry = { request: { ...request, id: `${this._prefix}-r${this._next++}` },
                    d: deferred(), messages: [] };
    // Reads of a room the client is not in wait in _others (its frames are all answers).
    let reads = this.rooms.get(room);
    if (reads === undefined) {
      if (!this._others.has(room)) this._others.set(room, new RoomState(room));
      reads = this._others.get(room);
    }
    reads[kind].push(entry);
    if (this._connected()) this._send(entry.request);
    return entry.d.promise;
  }

  /** The reads of `kind` waiting for `room`'s answers (the room's own first). */
  _waiting(room, kind) {
    const own = this.rooms.get(room);
    if (own !== undefined && own[kind].length) return own[kind];
    return this._others.get(room)?.[kind] ?? [];
  }

  _rejectReads(state, error) {
    for (const entry of [...state.history, ...state.presence]) entry.d.reject(error);
    state.history = [];
    state.presence = [];
  }

  async _url() {
    const url = new URL(this.url);
    if (this.user !== null && this.user !== "") url.searchParams.set("user", this.user);
    if (this.getToken !== null) this.token = await this.getToken();
    if (this.token !== null && this.token !== "") url.searchParams.set("token", this.token);
    return url;
  }

  async _open() {
    let url;
    try {
      url = await this._url();
    } catch (error) {
      this._retry(`getToken failed: ${error}`);
      return;
    }
    if (!this._wanted) return;
    this.state = this.reconnects || this._failures ? "reconnecting" : "connecting";
    this._emit("connecting", { attempt: this._failures, url: String(url) });
    let opened = false;
    let ws;
    try {
      ws = new this.WebSocket(String(url));
    } catch (error) {
      this._retry(String(error));
      return;
    }
    this._ws = ws;
    ws.onopen = () => { opened = true; };
    ws.onmessage = (event) => { if (this._ws === ws) this._receive(JSON.parse(event.data)); };
    ws.onerror = () => {}; // the close that follows says what happened
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._closed(event.code, event.reason || "", opened, url);
    };
  }

  async _closed(code, reason, opened, url) {
    const welcomed = this.name !== null;
    this.name = null;
    this.shard = null;
    for (const state of this.rooms.values()) state.joined = false;
    this._rejoining = null;
    if (!this._wanted) return;
    let last = `closed (${code}${reason ? " " + reason : ""})`;
    if (PERMANENT_CLOSES.has(code)) {
      this._stop(new Closed(code, reason), true);
      return;
    }
    if (!opened) {
      // A refused upgrade: a WebSocket cannot read the HTTP answer, so ask for it with a
      // plain GET of the same URL (docs/PROTOCOL.md, "The reason of a refused upgrade").
      const probe = new URL(url);
      probe.protocol = probe.protocol === "wss:" ? "https:" : "http:";
      try {
        const answer = await fetch(probe, { cache: "no-store" });
        const text = (await answer.text()).trim();
        if (answer.status !== 426) {
          last = `HTTP ${answer.status}: ${text}`;
          if (answer.status >= 400 && answer.status < 500 && !TRANSIENT_STATUSES.has(answer.status)) {
            this._stop(new Refused(answer.status, text), true);
            return;
          }
        }
      } catch {
        last = "the server cannot be reached";
      }
      if (!this._wanted) return;
    }
    if (welcomed) {
      // The session was up: a new outage starts now.
      this._failures = 0;
      this._delay = this.backoff[0];
      this._outageStart = Date.now();
    }
    this._retry(last);
  }

  _retry(last) {
    this._failures += 1;
    if (this.attempts !== null && this._failures >= this.attempts) {
      this._stop(new Unavailable(this._failures, last), true);
      return;
    }
    let wait = this._delay * (1 + Math.random() / 4);
    if (this.timeout !== null) {
      const left = this.timeout - (Date.now() - this._outageStart);
      if (left <= 0) {
        this._stop(new Unavailable(this._failures, last), true);
        return;
      }
      wait = Math.min(wait, left);
    }
    this.state = "reconnecting";
    this._emit("disconnected", { reason: last, delay: wait });
    this._delay = Math.min(this.backoff[1], this._delay * 2);
    this._retryTimer = setTimeout(() => {
      this.reconnects += 1;
      this._open();
    }, wait);
  }

  /** Stop for good: every waiting call rejects, the iterators end. */
  _stop(error, failed) {
    if (this.state === "closed" || this.state === "failed") return;
    this._wanted = false;
    this.state = failed ? "failed" : "closed";
    if (failed) this.failure = error;
    if (this._ws !== null) {
      try { this._ws.close(1000); } catch { /* closing */ }
      this._ws = null;
    }
    clearTimeout(this._retryTimer);
    clearTimeout(this._ackTimer);
    this._started?.reject(error);
    for (const entry of this._unsent.values()) entry.d.reject(error);
    this._unsent.clear();
    for (const entry of this._joins.values()) entry.d.reject(error);
    this._joins.clear();
    for (const state of [...this.rooms.values(), ...(this._others.values())]) {
      this._rejectReads(state, error);
    }
    for (const it of this._iterators) it.end();
    if (failed) this._emit("error", error);
    this._emit("closed", { error });
  }

  _sendJoin(state) {
    const id = `${this._prefix}-j${this._next++}`;
    const request = { type: "join", room: state.name, id };
    if (state.epoch !== null && state.lastSeq !== null) {
      request.since = state.lastSeq;
      request.epoch = state.epoch;
    }
    const entry = { room: state.name, d: deferred() };
    this._joins.set(id, entry);
    this._send(request);
    return entry.d.promise;
  }

  _welcome(frame) {
    this.name = frame.user;
    this.shard = frame.shard;
    this.heartbeat = frame.heartbeat;
    // Rejoin every room, resend what was not acked (same id and key), ask again what
    // was asked: the server takes requests sent behind a join after it, in order.
    this._rejoining = new Set(this.rooms.keys());
    this._lost = [];
    for (const state of this.rooms.values()) {
      this._sendJoin(state).catch(() => {}); // refusals: see _joinRefused
    }
    for (const [id, entry] of this._unsent) this._publish(id, entry);
    for (const state of [...this.rooms.values(), ...(this._others.values())]) {
      for (const entry of [...state.history, ...state.presence]) {
        entry.messages = [];
        this._send(entry.request);
      }
    }
    if (this._rejoining.size === 0) this._ready();
  }

  _ready() {
    this._rejoining = null;
    this.state = "connected";
    this._failures = 0;
    this._delay = this.backoff[0];
    const event = { user: this.name, shard: this.shard, recovered: this._lost.length === 0,
                    lost: this._lost };
    if (!this._startedDone) {
      this._startedDone = true;
      this._started.resolve();
      this._emit("connected", event);
    } else {
      this._emit("reconnected", event);
    }
  }

  _receive(frame) {
    const state = frame.room !== undefined ? this.rooms.get(frame.room) : undefined;
    switch (frame.type) {
      case "welcome": this._welcome(frame); break;
      case "joined": if (state) this._joined(state, frame); break;
      case "message": this._message(state, frame); break;
      case "ack": this._ack(frame); break;
      case "error": this._error(frame); break;
      case "history_end": this._historyEnd(frame); break;
      case "presence": this._presence(frame); break;
      case "join":
      case "leave":
        if (state) {
          if (frame.type === "join") state.users.add(frame.sender);
          else state.users.delete(frame.sender);
          this._emit(frame.type, { room: frame.room, user: frame.sender, timestamp: frame.timestamp });
        }
        break;
      case "gap":
        this._emit("gap", { room: frame.room, first: frame.first, last: frame.last });
        break;
      case "left": this._emit("left", { room: frame.room }); break;
      default: break; // a type this client does not know: ignored, as the protocol says
    }
  }

  _joined(state, frame) {
    // Handled here, before the replay that follows it is read.
    const entry = this._joinFor(state.name);
    const epochChanged = state.epoch !== null && frame.epoch !== state.epoch;
    const recovered = frame.recovered !== false;
    if (!recovered) {
      this.gaps += 1;
      this._lost.push(state.name);
    }
    if (state.lastSeq === null) state.lastSeq = frame.seq; // live from here
    else if (epochChanged) state.lastSeq = 0; // a new run of the room's sequence: take it all
    state.epoch = frame.epoch;
    state.joined = true;
    state.users = new Set(frame.users ?? []);
    if (this.reliable) {
      // The first ack puts the connection in reliable mode for the room: the server
      // keeps what it sends and resends what is not acked (dropped here by seq).
      this._send({ type: "ack", room: state.name, seq: state.lastSeq });
    }
    const event = { room: state.name, seq: frame.seq, epoch: frame.epoch, count: frame.count,
                    users: [...state.users], recovered, epochChanged };
    this._emit("joined", event);
    entry?.d.resolve(event);
    this._rejoined(state.name);
  }

  _joinFor(room) {
    for (const [id, entry] of this._joins) {
      if (entry.room === room) {
        this._joins.delete(id);
        return entry;
      }
    }
    return null;
  }

  _rejoined(room) {
    if (this._rejoining !== null && this._rejoining.delete(room) && this._rejoining.size === 0) {
      this._ready();
    }
  }

  _message(state, frame) {
    const room = frame.room;
    if (state !== undefined && state.joined && frame.seq > state.lastSeq) {
      state.lastSeq = frame.seq;
      const message = toMessage(frame);
      this._emit("message", message);
      for (const it of this._iterators) it.push(message);
    } else {
      const history = this._waiting(room, "history");
      if (history.length) history[0].messages.push(toMessage(frame));
    }
    // Anything at or below lastSeq is a resend or a replay overlap: a duplicate. Ack
    // it all the same (a resend means the server missed our ack), once per ackDelay.
    if (state !== undefined && state.joined && this.reliable) this._scheduleAck(state);
  }

  _scheduleAck(state) {
    state.ackDue = state.lastSeq;
    if (this._ackTimer !== null) return;
    this._ackTimer = setTimeout(() => {
      this._ackTimer = null;
      for (const s of this.rooms.values()) {
        if (s.ackDue && s.joined && !(this.dropAck && this.dropAck(s.name, s.ackDue))) {
          this._send({ type: "ack", room: s.name, seq: s.ackDue });
        }
        s.ackDue = 0;
      }
    }, this.ackDelay);
  }

  _ack(frame) {
    const entry = this._unsent.get(frame.id);
    if (entry !== undefined) {
      this._unsent.delete(frame.id);
      entry.d.resolve(frame.seq);
    }
  }

  _historyEnd(frame) {
    const entry = this._waiting(frame.room, "history").shift();
    if (entry !== undefined) entry.d.resolve(entry.messages);
  }

  _presence(frame) {
    const entry = this._waiting(frame.room, "presence").shift();
    if (entry !== undefined) {
      entry.d.resolve({ room: frame.room, count: frame.count, users: frame.users,
                        truncated: frame.truncated === true });
    }
  }

  _error(frame) {
    const error = new ChatError(frame.code, frame.reason, frame.retry_after ?? null);
    const id = frame.id ?? "";
    const publish = this._unsent.get(id);
    if (publish !== undefined) {
      this._unsent.delete(id); // refused, not lost: never resent
      publish.d.reject(error);
      return;
    }
    const join = this._joins.get(id);
    if (join !== undefined) {
      this._joins.delete(id);
      // A refused join: the room is forgotten (the Python client does the same).
      const state = this.rooms.get(join.room);
      this.rooms.delete(join.room);
      if (state) this._rejectReads(state, error);
      join.d.reject(error);
      if (this._rejoining !== null) {
        if (!this._startedDone) {
          this._stop(error, true);
          return;
        }
        this._emit("refused", { room: join.room, error });
        this._rejoined(join.room);
      }
      return;
    }
    for (const reads of [...this.rooms.values(), ...(this._others.values())]) {
      for (const kind of ["history", "presence"]) {
        const at = reads[kind].findIndex((entry) => entry.request.id === id);
        if (at >= 0) {
          reads[kind].splice(at, 1)[0].d.reject(error);
          return;
        }
      }
    }
    this._emit("refused", { room: frame.room ?? null, error });
  }
}

export default ChatClient;
