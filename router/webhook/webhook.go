// Package webhook calls a registration's backend over HTTP when its members
// connect, send and leave (docs/protocol.md §11): events signed as Standard
// Webhooks do, sent only to addresses the operator allowed, one at a time and
// in order per connection, retried with backoff, and never faster than the
// backend takes them: a connection whose events pile up is not read until
// they drain.
package webhook

import (
	"bytes"
	"context"
	"crypto/hmac"
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"path"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Events is a set of event types.
type Events uint8

// The event types.
const (
	Connect Events = 1 << iota
	Message
	Close
)

// DefaultEvents are the events of a registration that names none.
const DefaultEvents = Connect | Close

// ParseEvents parses a comma list of connect, message and close; "" means
// DefaultEvents.
func ParseEvents(s string) (Events, error) {
	if strings.TrimSpace(s) == "" {
		return DefaultEvents, nil
	}
	var e Events
	for part := range strings.SplitSeq(s, ",") {
		switch strings.TrimSpace(part) {
		case "connect":
			e |= Connect
		case "message":
			e |= Message
		case "close":
			e |= Close
		default:
			return 0, fmt.Errorf("unknown webhook event %q: want connect, message or close", strings.TrimSpace(part))
		}
	}
	return e, nil
}

// String returns the events as a comma list.
func (e Events) String() string {
	var parts []string
	for _, x := range []struct {
		e    Events
		name string
	}{{Connect, "connect"}, {Message, "message"}, {Close, "close"}} {
		if e&x.e != 0 {
			parts = append(parts, x.name)
		}
	}
	return strings.Join(parts, ",")
}

// Secret lengths (docs/protocol.md §11).
const (
	MinSecret = 16
	MaxSecret = 128
)

// Allow is the operator's -webhook-allow: host patterns and networks.
type Allow struct {
	hosts []string       // lower-case path.Match patterns
	nets  []netip.Prefix // IPs are /32 or /128
}

// ParseAllow parses a comma list of host patterns (hooks.example.com,
// *.example.com), IPs and CIDRs. "" means nothing is allowed (nil).
func ParseAllow(s string) (*Allow, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	a := &Allow{}
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		switch {
		case part == "":
		case strings.Contains(part, "/"):
			p, err := netip.ParsePrefix(part)
			if err != nil {
				return nil, fmt.Errorf("-webhook-allow %q: %w", part, err)
			}
			a.nets = append(a.nets, p.Masked())
		default:
			if ip, err := netip.ParseAddr(part); err == nil {
				a.nets = append(a.nets, netip.PrefixFrom(ip, ip.BitLen()))
				continue
			}
			if _, err := path.Match(part, ""); err != nil {
				return nil, fmt.Errorf("-webhook-allow %q: %w", part, err)
			}
			a.hosts = append(a.hosts, strings.ToLower(part))
		}
	}
	return a, nil
}

// ErrNotAllowed means a webhook URL or the address it resolves to is not
// allowed.
var ErrNotAllowed = errors.New("webhook address not allowed")

// CheckURL checks a webhook URL at /register: http or https, and a host that
// matches a host pattern or is an IP inside a listed network.
func (a *Allow) CheckURL(raw string) error {
	if a == nil {
		return errors.New("webhooks are off: the operator has not set -webhook-allow")
	}
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil {
		return errors.New("webhook must be an http or https URL without credentials")
	}
	host := strings.ToLower(u.Hostname())
	if ip, err := netip.ParseAddr(host); err == nil {
		if a.inNets(ip) {
			return nil
		}
		return fmt.Errorf("webhook host %s: %w", host, ErrNotAllowed)
	}
	for _, p := range a.hosts {
		if ok, _ := path.Match(p, host); ok {
			return nil
		}
	}
	return fmt.Errorf("webhook host %s: %w", host, ErrNotAllowed)
}

func (a *Allow) inNets(ip netip.Addr) bool {
	ip = ip.Unmap()
	for _, p := range a.nets {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// allowedIP reports whether a call may go to ip: a public address, or one
// inside a listed network.
func (a *Allow) allowedIP(ip netip.Addr) bool {
	ip = ip.Unmap()
	if a.inNets(ip) {
		return true
	}
	return ip.IsGlobalUnicast() && !ip.IsPrivate() && !ip.IsLoopback() && !ip.IsLinkLocalUnicast()
}

// Settings are a registration's webhook: where, the signing secret, and the
// events it wants. The zero value means no webhook.
type Settings struct {
	URL    string
	Secret []byte
	Events Events
}

// Wants reports whether the registration's backend wants events e.
func (s Settings) Wants(e Events) bool { return s.URL != "" && s.Events&e != 0 }

// Event is one event's body.
type Event struct {
	Type         string    `json:"type"`
	Registration string    `json:"registration"`
	Conn         string    `json:"conn"`
	Role         string    `json:"role"`
	Name         string    `json:"name,omitempty"`
	RemoteAddr   string    `json:"remote_addr"`
	Time         time.Time `json:"time"`
	Data         *string   `json:"data,omitempty"`
	DataBase64   *string   `json:"data_base64,omitempty"`
	Code         *int      `json:"code,omitempty"`
	Reason       *string   `json:"reason,omitempty"`
}

// Config is the operator's settings for every webhook call.
type Config struct {
	// Allow is -webhook-allow; nil allows nothing.
	Allow *Allow
	// Timeout bounds one call; 0 means 5 s.
	Timeout time.Duration
	// Retries is how many times a failed message or close event is tried
	// again; 0 means 5, negative none.
	Retries int
	// MaxCalls bounds the calls in flight in the whole process; 0 means 64.
	MaxCalls int
	// Observe, if set, is told of every call: the event type, its result
	// (ok, refused, retried, failed, dropped) and how long it took.
	Observe func(event, result string, d time.Duration)
	// Resolver resolves webhook hosts; nil means net.DefaultResolver.
	Resolver *net.Resolver
	// Backoff is the first retry's delay, doubling up to 20 times it; 0
	// means 0.5 s (so at most 10 s). Tests shorten it.
	Backoff time.Duration
}

// Client makes webhook calls for the whole process.
type Client struct {
	cfg  Config
	http *http.Client
	sem  chan struct{}
}

// New returns a client.
func New(cfg Config) *Client {
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	if cfg.Retries == 0 {
		cfg.Retries = 5
	}
	if cfg.MaxCalls <= 0 {
		cfg.MaxCalls = 64
	}
	if cfg.Backoff <= 0 {
		cfg.Backoff = 500 * time.Millisecond
	}
	c := &Client{cfg: cfg, sem: make(chan struct{}, cfg.MaxCalls)}
	dialer := &net.Dialer{
		Timeout:  cfg.Timeout,
		Resolver: cfg.Resolver,
		// Every address the name resolves to is checked as the dial
		// happens, so a DNS answer that changes to a forbidden address
		// is refused at that call.
		Control: func(_, address string, _ syscall.RawConn) error {
			host, _, err := net.SplitHostPort(address)
			if err != nil {
				return err
			}
			ip, err := netip.ParseAddr(host)
			if err != nil || cfg.Allow == nil || !cfg.Allow.allowedIP(ip) {
				return fmt.Errorf("dial %s: %w", host, ErrNotAllowed)
			}
			return nil
		},
	}
	c.http = &http.Client{
		Transport: &http.Transport{
			DialContext:         dialer.DialContext,
			MaxIdleConnsPerHost: cfg.MaxCalls,
			IdleConnTimeout:     90 * time.Second,
			TLSHandshakeTimeout: cfg.Timeout,
			ForceAttemptHTTP2:   true,
		},
		// A redirect is a failure, never followed.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return c
}

// outcome is how one call ended.
type outcome struct {
	status int // 0 when there was no answer
	body   []byte
	err    error // a network error, timeout or refused address
}

// retryable reports whether o may be tried again: network errors (but a
// refused address), timeouts, 429 and 5xx.
func (o outcome) retryable() bool {
	if o.err != nil {
		return !errors.Is(o.err, ErrNotAllowed)
	}
	return o.status == http.StatusTooManyRequests || o.status >= 500
}

// call posts one signed event, under the process-wide bound.
func (c *Client) call(ctx context.Context, s Settings, id string, body []byte) outcome {
	select {
	case c.sem <- struct{}{}:
	case <-ctx.Done():
		return outcome{err: ctx.Err()}
	}
	defer func() { <-c.sem }()
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.URL, bytes.NewReader(body))
	if err != nil {
		return outcome{err: fmt.Errorf("%w: %v", ErrNotAllowed, err)}
	}
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "wsrouter-webhook")
	req.Header.Set("webhook-id", id)
	req.Header.Set("webhook-timestamp", ts)
	req.Header.Set("webhook-signature", Sign(s.Secret, id, ts, body))
	resp, err := c.http.Do(req)
	if err != nil {
		return outcome{err: err}
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	return outcome{status: resp.StatusCode, body: b}
}

// Sign returns the webhook-signature header of a body: "v1," and the base64
// HMAC-SHA256, keyed with secret, of id "." timestamp "." body (Standard
// Webhooks; their libraries verify it with "whsec_" + base64(secret)).
func Sign(secret []byte, id, timestamp string, body []byte) string {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(id + "." + timestamp + "."))
	m.Write(body)
	return "v1," + base64.StdEncoding.EncodeToString(m.Sum(nil))
}

func newID() string {
	var b [12]byte
	crand.Read(b[:])
	return "msg_" + hex.EncodeToString(b[:])
}

// Verdict is the backend's answer to a connect event.
type Verdict struct {
	// Admit says the member may join; otherwise Refused says the backend
	// refused it (403), else the call failed (503, fail closed).
	Admit, Refused bool
	// Name is the name the backend gave the member ("" for none).
	Name string
}

// Connect calls the connect event, once (no retries: the member waits),
// and says what to do with the member.
func (c *Client) Connect(ctx context.Context, s Settings, ev Event) Verdict {
	ev.Type = "connect"
	body, _ := json.Marshal(ev)
	start := time.Now()
	o := c.call(ctx, s, newID(), body)
	var v Verdict
	result := "failed"
	switch {
	case o.err == nil && o.status >= 200 && o.status < 300:
		v.Admit, result = true, "ok"
		var answer struct {
			Name string `json:"name"`
		}
		if json.Unmarshal(o.body, &answer) == nil {
			v.Name = answer.Name
		}
	case o.err == nil && (o.status == http.StatusUnauthorized || o.status == http.StatusForbidden):
		v.Refused, result = true, "refused"
	}
	c.observe("connect", result, time.Since(start))
	return v
}

func (c *Client) observe(event, result string, d time.Duration) {
	if c.cfg.Observe != nil {
		c.cfg.Observe(event, result, d)
	}
}

// deliver sends one message or close event with retries: exponential backoff
// from 0.5 s doubling to 10 s, each delay jittered within ±50 %, the same
// webhook-id on every try. It returns when the event is delivered or
// dropped, or ctx ends.
func (c *Client) deliver(ctx context.Context, s Settings, ev Event) {
	body, _ := json.Marshal(ev)
	id := newID()
	delay := c.cfg.Backoff
	for try := 0; ; try++ {
		start := time.Now()
		o := c.call(ctx, s, id, body)
		switch {
		case o.err == nil && o.status >= 200 && o.status < 300:
			c.observe(ev.Type, "ok", time.Since(start))
			return
		case !o.retryable() || try >= c.cfg.Retries || ctx.Err() != nil:
			c.observe(ev.Type, "dropped", time.Since(start))
			return
		}
		c.observe(ev.Type, "retried", time.Since(start))
		jittered := time.Duration(float64(delay) * (0.5 + rand.Float64()))
		t := time.NewTimer(jittered)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			c.observe(ev.Type, "dropped", 0)
			return
		}
		delay = min(2*delay, 20*c.cfg.Backoff)
	}
}

// Queue delivers one connection's message and close events, one at a time
// and in order, after its connect. Push blocks while the queue is full: the
// connection's reader then stops reading, so a slow backend slows its
// sender and nothing is dropped for lack of room.
type Queue struct {
	c    *Client
	s    Settings
	ch   chan Event
	done chan struct{}
}

// NewQueue starts the queue of one connection, holding up to size events.
// ctx ends every delivery (the router shutting down).
func (c *Client) NewQueue(ctx context.Context, s Settings, size int) *Queue {
	q := &Queue{c: c, s: s, ch: make(chan Event, max(size, 1)), done: make(chan struct{})}
	go q.run(ctx)
	return q
}

func (q *Queue) run(ctx context.Context) {
	defer close(q.done)
	for ev := range q.ch {
		q.c.deliver(ctx, q.s, ev)
	}
}

// Push queues ev, waiting while the queue is full or until ctx ends.
func (q *Queue) Push(ctx context.Context, ev Event) bool {
	select {
	case q.ch <- ev:
		return true
	case <-ctx.Done():
		return false
	}
}

// Close queues the last event (the close event, when wanted) and lets the
// queue drain and stop on its own.
func (q *Queue) Close(ctx context.Context, last *Event) {
	if last != nil {
		q.Push(ctx, *last)
	}
	close(q.ch)
}

// Done is closed once every queued event was delivered or dropped.
func (q *Queue) Done() <-chan struct{} { return q.done }

// MessageEvent fills ev's data for a text or binary message.
func MessageEvent(ev Event, binary bool, data []byte) Event {
	ev.Type = "message"
	if binary {
		s := base64.StdEncoding.EncodeToString(data)
		ev.DataBase64 = &s
	} else {
		s := string(data)
		ev.Data = &s
	}
	return ev
}

// CloseEvent fills ev's code and reason.
func CloseEvent(ev Event, code int, reason string) Event {
	ev.Type = "close"
	ev.Code, ev.Reason = &code, &reason
	return ev
}
