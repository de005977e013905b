// Package router is wsrouter's network edge: the HTTP endpoints, the
// WebSocket accept, each member's reader and writer, and the metrics. It maps
// the registry's errors to HTTP statuses and close codes in one place
// (errors.go). docs/protocol.md in the repository documents the protocol for
// users; the README is the place to start.
//
// # Endpoints
//
//   - /register (GET or POST, query or form): key, host_key, reg_type
//     (hostclient, lobby or pubsub) and an optional id_req. Answers the id as plain
//     text, or {"id":…,"reg_type":…} for Accept: application/json.
//   - /connect (GET, WebSocket upgrade): id, key and, in a hostclient
//     registration, sock_type (host or client). The upgrade response carries
//     the member's connection id in X-Connection-Id.
//   - /remove (GET, POST or DELETE): id, key and host_key. Closes every
//     member with 4000.
//   - /relay/{id}/{path…} (any method): key. The request becomes a JSON frame
//     for one host of a hostclient registration (round-robin) and the host's
//     JSON reply, matched by its rid, becomes the response (relayhost.go,
//     and the package router/relay).
//   - /healthz: 200 "ok" while serving, 503 once shutdown began.
//   - /metrics: Prometheus text. /stats: JSON counts for the -admin-token
//     bearer only.
//
// Per-IP rate limits and the failed-key lockout (limits.go) answer 429 with
// Retry-After.
//
// Keys may come from the query or form, or from the X-Key and X-Host-Key
// headers; a parameter wins over the header. Every refusal is an HTTP status
// with a one-line text/plain body before any upgrade, never a 101 followed by
// a close.
//
// # Roles and forwarding
//
// In a lobby every member's message goes to every other member. In a
// hostclient registration a host's message goes to every client and a
// client's to every host. A sender never gets its own message back; text
// stays text, binary stays binary, and messages from one sender reach each
// receiver in the order sent. Control frames are never forwarded.
//
// Each member has a send queue bounded in bytes (payload plus 64 per message;
// Config.SendQueueBytes). Fan-out never blocks: a receiver whose queue would
// overflow is closed with 4008 and the others carry on.
//
// # Close codes
//
//	1000  normal (the server echoes a peer's own close)
//	1001  server shutting down
//	1007  a text message that is not UTF-8, sent to its sender (never forwarded)
//	1008  over Config.RateMessage (data, ping and pong frames per second)
//	1009  message over Config.MaxMessage, sent to its sender
//	4000  registration removed
//	4008  slow consumer
//
// A member that does not answer a ping within Config.PingTimeout is dropped
// without a close frame; its peer sees 1006.
package router
