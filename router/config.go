package router

import (
	"io"
	"time"

	"wsrouter/registry"
	"wsrouter/registry/cluster"
	"wsrouter/router/relay"
)

// Config holds the router's limits and timeouts. The zero value of a field
// means the default documented on it.
type Config struct {
	// MaxMessage is the largest data message a member may send, in bytes;
	// 0 means 1 MiB. A larger one closes its sender with 1009.
	MaxMessage int64
	// SendQueueBytes bounds each member's send queue, in payload bytes plus
	// 64 per message; 0 means 4 MiB. It absorbs bursts from many senders; a
	// receiver that falls further behind is a slow consumer (4008). An
	// empty queue always takes one message, however large; keep it at
	// least twice MaxMessage so that a large message does not close a
	// receiver that merely has something queued. Relay request frames
	// are not counted against it.
	SendQueueBytes int
	// WriteTimeout bounds every write, close frames included; 0 means 10 s.
	WriteTimeout time.Duration
	// PingInterval is how often the server pings each member; 0 means 30 s,
	// negative disables pings.
	PingInterval time.Duration
	// PingTimeout is how long a ping may go unanswered; 0 means 30 s.
	PingTimeout time.Duration
	// AllowedOrigins lists the browser origins (host patterns as in
	// path.Match, e.g. "*.example.com") that may open WebSockets; empty
	// means any.
	AllowedOrigins []string
	// RelayTimeout is how long a relay request waits for its host's reply;
	// 0 means 10 s. Then the caller gets 504.
	RelayTimeout time.Duration
	// RelayMaxBody bounds a relayed request body and a reply body once
	// decoded, in bytes; 0 means 1 MiB.
	RelayMaxBody int64
	// RelayMaxPending bounds the relay requests waiting on one
	// registration; 0 means 100. Past it callers get 429.
	RelayMaxPending int
	// RelayQueueBytes bounds the relay request frames queued to one
	// device and not yet written, in bytes; 0 means 8 MiB (at least two
	// frames of RelayMaxBody). Past it callers get 503: the device does
	// not read fast enough. It is separate from SendQueueBytes, so relay
	// traffic never closes a device as a slow consumer.
	RelayQueueBytes int64
	// RelayMaxMemory bounds the bytes of relayed requests held in memory
	// by the whole process (bodies and their frames); 0 means 256 MiB.
	// Past it callers get 503.
	RelayMaxMemory int64
	// RateMessage bounds each member's frames per second, data and
	// control (ping) frames alike; a member over it is closed with 1008.
	// A zero Rate means no limit.
	RateMessage Limit
	// Per-client-IP rate limits (docs/protocol.md §8); a zero Rate turns one off.
	RateRegister, RateConnect, RateRelay Limit
	// RateBadKey is the failed-key bucket: each wrong key or host key on
	// /connect, /remove or /relay takes a token, and an address with none
	// left is refused (429) even with the right key until it refills.
	RateBadKey Limit
	// TrustProxy names a header set by a reverse proxy in front (e.g.
	// X-Forwarded-For) whose last address is the client IP; empty means the
	// socket's address.
	TrustProxy string
	// Webhooks are the operator's webhook settings.
	Webhooks WebhookConfig
	// Tokens configures tokens (docs/protocol.md §12).
	Tokens TokenConfig
	// Backup, if set, makes a consistent copy of the registrations' data
	// file and returns it with its size; GET /backup serves it to the admin
	// token's bearer, and closes it.
	Backup func() (io.ReadCloser, int64, error)
	// AdminToken enables /stats for requests bearing it; empty means no
	// /stats.
	AdminToken string
	// Cluster, if set, makes the router a node of a cluster: it must also
	// be the Registry's Store and Broker (docs/protocol.md §15).
	Cluster *cluster.Node
	// Registry configures the router's registry. Its Observers and
	// OnKeyCheck hook are called after the router's own.
	Registry registry.Config
}

// Limit is a token bucket: Rate tokens per second up to Burst. A zero Rate
// means no limit.
type Limit struct {
	Rate  float64
	Burst int
}

func (c *Config) setDefaults() {
	if c.MaxMessage <= 0 {
		c.MaxMessage = 1 << 20
	}
	if c.SendQueueBytes <= 0 {
		c.SendQueueBytes = 4 << 20
	}
	if c.WriteTimeout <= 0 {
		c.WriteTimeout = 10 * time.Second
	}
	if c.PingInterval == 0 {
		c.PingInterval = 30 * time.Second
	}
	if c.PingTimeout <= 0 {
		c.PingTimeout = 30 * time.Second
	}
	if c.RelayTimeout <= 0 {
		c.RelayTimeout = relay.DefaultTimeout
	}
	if c.RelayMaxBody <= 0 {
		c.RelayMaxBody = relay.DefaultMaxBody
	}
	if c.RelayMaxPending <= 0 {
		c.RelayMaxPending = relay.DefaultMaxPending
	}
	if c.RelayQueueBytes <= 0 {
		c.RelayQueueBytes = max(8<<20, 3*c.RelayMaxBody)
	}
	if c.Webhooks.Queue <= 0 {
		c.Webhooks.Queue = 64
	}
	if c.RelayMaxMemory <= 0 {
		c.RelayMaxMemory = relay.DefaultMaxMemory
	}
}
