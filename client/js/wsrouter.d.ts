// Types of wsrouter.js, the JavaScript client of a wsrouter.

export class WsrouterError extends Error {
  constructor(status: number, body: string, retryAfter?: number);
  /** HTTP status of the refusal. */
  status: number;
  /** The router's one-line answer. */
  body: string;
  /** Seconds to wait before trying again; 0 when none was given. */
  retryAfter: number;
}

export interface Registration {
  type: "lobby" | "hostclient" | "pubsub";
  key: string;
  hostKey: string;
  /** A chosen id; left out, the router mints one. */
  id?: string;
}

/** Creates a registration and returns its id. Throws WsrouterError. */
export function register(baseURL: string, r: Registration): Promise<string>;

/** The wait before attempt n (from 1), in ms: random in [0, min(max, min·2ⁿ⁻¹)]. */
export function backoff(n: number, min: number, max: number, random?: () => number): number;

export interface ConnectOptions {
  id: string;
  /** Exactly one of key and token. */
  key?: string;
  token?: string;
  /** "host" or "client" in a hostclient registration without a token. */
  role?: "host" | "client";
  name?: string;
  /** Backoff bounds in ms; defaults 250 and 30000. */
  minBackoff?: number;
  maxBackoff?: number;
  /** On Node 20: the ws package's WebSocket. */
  WebSocket?: unknown;
}

export interface ConnectionEventMap {
  open: CustomEvent<{ connId: string }>;
  message: CustomEvent<{ data: string | ArrayBuffer }>;
  reconnecting: CustomEvent<{ attempt: number; delay: number; code: number; reason: string }>;
  closed: CustomEvent<{ code: number; reason: string; error: Error | null }>;
}

export class Connection extends EventTarget {
  constructor(baseURL: string, opts: ConnectOptions);
  readonly state: "connecting" | "open" | "reconnecting" | "closed";
  /** The current session's connection id (Node only; "" in browsers). */
  readonly connId: string;
  readonly attempt: number;
  addEventListener<K extends keyof ConnectionEventMap>(type: K, listener: (ev: ConnectionEventMap[K]) => void, options?: boolean | AddEventListenerOptions): void;
  /** Sends text (a string) or binary; false, sending nothing, while not connected. */
  send(data: string | ArrayBuffer | ArrayBufferView): boolean;
  /** Closes for good. */
  close(): void;
}

export function connect(baseURL: string, opts: ConnectOptions): Connection;

export interface RelayRequest {
  method: string;
  path: string;
  query: URLSearchParams;
  headers: Record<string, string>;
  body: Uint8Array;
}

export interface RelayResponse {
  status?: number;
  headers?: Record<string, string>;
  /** A string is text, bytes are binary, anything else is sent as JSON. */
  body?: string | Uint8Array | ArrayBuffer | object | number | boolean | null;
}

/** Answers relayed HTTP requests with handler; returns a function that stops. */
export function serveRelay(
  conn: Connection,
  handler: (req: RelayRequest) => RelayResponse | Promise<RelayResponse>,
  opts?: { concurrency?: number },
): () => void;
