package client

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// Options say how Dial joins a registration.
type Options struct {
	// URL is the router's base, http(s)://host[:port]; ws(s) works too.
	URL string
	// ID is the registration.
	ID string
	// Key or Token: exactly one.
	Key, Token string
	// Role is "host" or "client" in a hostclient registration; empty in a
	// lobby or pubsub registration, or with a token (which names it).
	Role string
	// Name, if set, is the member's name.
	Name string
	// MinBackoff and MaxBackoff bound the wait between attempts: before
	// attempt n (from 1) it is a random duration in [0, min(MaxBackoff,
	// MinBackoff·2ⁿ⁻¹)] ("full jitter"), and at least a refusal's
	// Retry-After. Zero means 250 ms and 30 s.
	MinBackoff, MaxBackoff time.Duration
	// OnState, if set, hears every change of state, in order, on the
	// connection's own goroutine: it must not block for long.
	OnState func(State)
	// ReadLimit bounds an incoming message; 0 means 1 MiB (the router's
	// default -max-message).
	ReadLimit int64
	// HTTPClient dials; nil means http.DefaultClient.
	HTTPClient *http.Client
	// Buffer is how many incoming messages wait for Read; 0 means 64. The
	// connection stops reading (and the router's queue for it fills) while
	// it is full.
	Buffer int

	// rand and sleep are the backoff's randomness and clock (tests).
	rand  func(n int64) int64
	sleep func(ctx context.Context, d time.Duration) error
}

// StateKind is what happened to a Conn.
type StateKind int

// The states a Conn goes through.
const (
	// Connected: a session is up; State.ConnID is its connection id.
	Connected StateKind = iota + 1
	// Reconnecting: the session ended or an attempt failed (State.Err);
	// attempt State.Attempt follows after State.Delay.
	Reconnecting
	// Closed: for good (State.Err: a permanent refusal — 400, 403, 404,
	// 409 — a close code that means stop, or ErrClosed).
	Closed
)

func (k StateKind) String() string {
	switch k {
	case Connected:
		return "connected"
	case Reconnecting:
		return "reconnecting"
	case Closed:
		return "closed"
	}
	return "unknown"
}

// State is one change of a Conn's state.
type State struct {
	Kind    StateKind
	ConnID  string
	Attempt int
	Delay   time.Duration
	Err     error
}

// Message is one message read.
type Message struct {
	Type websocket.MessageType
	Data []byte
}

// Conn is a member that stays connected: when its session ends it dials
// again with backoff, until a refusal or a close code says to stop (400,
// 403, 404, 409, 4000, 4001, the backend's 4002–4999 but 4008, 1008) or
// Close is called.
//
// Read returns the messages of every session in order. Write waits while a
// session is being re-established (bounded by its context). Delivery is at
// most once: a message written just before a session breaks may be lost
// without an error (it was handed to the network), one whose write fails is
// reported with ErrConnectionLost, and a Write whose context ends mid-write
// ends the session (coder/websocket cannot resume a half-written frame).
// Nothing is replayed: between sessions, what the router sent is not
// delivered.
type Conn struct {
	opts  Options
	in    chan Message
	done  chan struct{} // closed when the Conn is closed for good
	stop  context.CancelFunc
	ready chan struct{} // closed while a session is up; replaced when it ends

	mu     sync.Mutex
	ws     *websocket.Conn // guarded by mu; the current session, or nil
	connID string          // guarded by mu
	err    error           // guarded by mu; why it closed
	filter func(Message) bool

	inState atomic.Bool // OnState is running (on the run goroutine)
}

// Dial joins the registration and returns once the first session is up,
// retrying transient failures until ctx ends. A permanent refusal (403, 404,
// 400) is returned at once.
func Dial(ctx context.Context, opts Options) (*Conn, error) {
	if (opts.Key == "") == (opts.Token == "") {
		return nil, errors.New("wsrouter: give exactly one of Key and Token")
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = 250 * time.Millisecond
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = 30 * time.Second
	}
	if opts.ReadLimit <= 0 {
		opts.ReadLimit = 1 << 20
	}
	if opts.Buffer <= 0 {
		opts.Buffer = 64
	}
	if opts.rand == nil {
		opts.rand = rand.Int64N
	}
	if opts.sleep == nil {
		opts.sleep = sleep
	}
	runCtx, stop := context.WithCancel(context.Background())
	c := &Conn{opts: opts, in: make(chan Message, opts.Buffer), done: make(chan struct{}), stop: stop, ready: make(chan struct{})}
	first := make(chan error, 1)
	go c.run(runCtx, ctx, first)
	select {
	case err := <-first:
		if err != nil {
			return nil, err
		}
		return c, nil
	case <-ctx.Done():
		c.Close()
		return nil, ctx.Err()
	}
}

// ConnID returns the connection id of the current session ("" between
// sessions); each session has its own.
func (c *Conn) ConnID() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.connID
}

// Err returns why the Conn closed, or nil while it lives.
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Done is closed when the Conn has closed for good.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Read returns the next message, across sessions. It fails only when the
// Conn is closed for good (with its Err) or ctx ends.
func (c *Conn) Read(ctx context.Context) (Message, error) {
	select {
	case m := <-c.in:
		return m, nil
	case <-ctx.Done():
		return Message{}, ctx.Err()
	case <-c.done:
		select {
		case m := <-c.in: // what came before the end is still read
			return m, nil
		default:
		}
		return Message{}, c.Err()
	}
}

// ErrConnectionLost wraps a write that failed because its session ended:
// the message may or may not have reached the router.
var ErrConnectionLost = errors.New("wsrouter: connection lost during write")

// Write sends one message (websocket.MessageText or MessageBinary). While a
// session is being re-established it waits, until ctx ends.
func (c *Conn) Write(ctx context.Context, typ websocket.MessageType, data []byte) error {
	for {
		c.mu.Lock()
		ws, ready, err := c.ws, c.ready, c.err
		c.mu.Unlock()
		if err != nil {
			return err
		}
		if ws == nil {
			select {
			case <-ready:
				continue
			case <-c.done:
				continue
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		// coder/websocket serialises writes itself, honouring ctx.
		err = ws.Write(ctx, typ, data)
		if err != nil && ctx.Err() == nil {
			return fmt.Errorf("%w: %v", ErrConnectionLost, err)
		}
		return err
	}
}

// Close ends the Conn for good, closing its session with 1000 (the close
// handshake first, then the reader stops). It waits for the Conn's
// goroutine to end, except when called from OnState, which runs on it.
func (c *Conn) Close() error {
	c.mu.Lock()
	if c.err == nil {
		c.err = ErrClosed
	}
	ws := c.ws
	c.mu.Unlock()
	if ws != nil {
		ws.Close(websocket.StatusNormalClosure, "")
	}
	c.stop()
	if !c.inState.Load() {
		<-c.done
	}
	return nil
}

// finish records why the Conn ends (the first reason wins) and stops it.
func (c *Conn) finish(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
	c.stop()
}

func (c *Conn) state(s State) {
	if c.opts.OnState != nil {
		c.inState.Store(true)
		defer c.inState.Store(false)
		c.opts.OnState(s)
	}
}

// run keeps a session up until the Conn ends. first hears the outcome of the
// first attempt(s): nil once connected, or a permanent error.
func (c *Conn) run(ctx, dialCtx context.Context, first chan<- error) {
	defer close(c.done)
	attempt := 0
	var retryAfter time.Duration
	for {
		ws, connID, err := c.dial(ctx)
		if err == nil {
			attempt, retryAfter = 0, 0
			c.mu.Lock()
			c.ws, c.connID = ws, connID
			close(c.ready)
			c.mu.Unlock()
			c.state(State{Kind: Connected, ConnID: connID})
			if first != nil {
				first <- nil
				first = nil
			}
			err = c.readSession(ctx, ws)
			c.mu.Lock()
			c.ws, c.connID, c.ready = nil, "", make(chan struct{})
			c.mu.Unlock()
		} else {
			retryAfter = 0
			var se *StatusError
			if errors.As(err, &se) {
				retryAfter = se.RetryAfter
			}
		}
		if perm := permanent(err); perm != nil || ctx.Err() != nil || c.Err() != nil {
			if perm == nil {
				perm = c.Err()
			}
			if perm == nil {
				perm = ErrClosed
			}
			c.finish(perm)
			c.state(State{Kind: Closed, Err: perm})
			if first != nil {
				first <- perm
			}
			return
		}
		attempt++
		d := c.backoff(attempt, retryAfter)
		c.state(State{Kind: Reconnecting, Attempt: attempt, Delay: d, Err: err})
		if c.wait(ctx, dialCtx, first != nil, d) != nil && ctx.Err() == nil && dialCtx.Err() != nil {
			c.finish(dialCtx.Err())
		}
	}
}

// wait sleeps d, or less if ctx ends, or, before the first session (when
// the caller of Dial is still waiting), if dialCtx ends.
func (c *Conn) wait(ctx, dialCtx context.Context, beforeFirst bool, d time.Duration) error {
	if !beforeFirst {
		return c.opts.sleep(ctx, d)
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(dialCtx, cancel)
	defer stop()
	return c.opts.sleep(wctx, d)
}

// backoff is the wait before attempt n: full jitter up to
// min(MaxBackoff, MinBackoff·2ⁿ⁻¹), and at least retryAfter.
func (c *Conn) backoff(n int, retryAfter time.Duration) time.Duration {
	return Backoff(n, c.opts.MinBackoff, c.opts.MaxBackoff, retryAfter, c.opts.rand)
}

// Backoff returns the wait before attempt n (from 1): a random duration in
// [0, min(max, min·2ⁿ⁻¹)] drawn with rnd (rnd(k) is in [0, k)), and at least
// retryAfter, at most max (unless retryAfter says more).
func Backoff(n int, min, max, retryAfter time.Duration, rnd func(int64) int64) time.Duration {
	ceil := max
	if n < 62 {
		if c := min << (n - 1); c > 0 && c < max {
			ceil = c
		}
	}
	d := time.Duration(rnd(int64(ceil) + 1))
	if d < retryAfter {
		d = retryAfter
	}
	return d
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// permanent returns the error to stop with if err means "do not try again":
// a refusal of the request itself or of the credentials, an unknown
// registration, or a close code that ends the member for good.
func permanent(err error) error {
	var se *StatusError
	if errors.As(err, &se) {
		switch se.Status {
		case http.StatusBadRequest, http.StatusForbidden, http.StatusNotFound, http.StatusConflict:
			return err
		}
		return nil
	}
	switch code := websocket.CloseStatus(err); {
	case code == 4000:
		return ErrRemoved
	case code == 4001:
		return ErrReplaced
	case code == websocket.StatusPolicyViolation:
		return fmt.Errorf("%w: %v", ErrRevoked, err)
	case code > 4001 && code <= 4999 && code != 4008:
		return fmt.Errorf("%w (%d)", ErrClosedByBackend, code)
	}
	return nil
}

// dial opens one session.
func (c *Conn) dial(ctx context.Context) (*websocket.Conn, string, error) {
	o := c.opts
	base := strings.TrimSuffix(o.URL, "/")
	switch {
	case strings.HasPrefix(base, "http://"):
		base = "ws://" + strings.TrimPrefix(base, "http://")
	case strings.HasPrefix(base, "https://"):
		base = "wss://" + strings.TrimPrefix(base, "https://")
	}
	q := url.Values{"id": {o.ID}}
	if o.Role != "" {
		q.Set("sock_type", o.Role)
	}
	if o.Name != "" {
		q.Set("name", o.Name)
	}
	h := http.Header{}
	if o.Key != "" {
		h.Set("X-Key", o.Key)
	} else {
		h.Set("X-Token", o.Token)
	}
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	ws, resp, err := websocket.Dial(dctx, base+"/connect?"+q.Encode(), &websocket.DialOptions{HTTPClient: o.HTTPClient, HTTPHeader: h})
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			se := statusError(resp)
			return nil, "", se
		}
		return nil, "", err
	}
	ws.SetReadLimit(o.ReadLimit)
	return ws, resp.Header.Get("X-Connection-Id"), nil
}

// readSession reads one session's messages into c.in until it ends, and
// returns why.
func (c *Conn) readSession(ctx context.Context, ws *websocket.Conn) error {
	stop := context.AfterFunc(ctx, func() { ws.CloseNow() })
	defer stop()
	for {
		typ, data, err := ws.Read(context.Background())
		if err != nil {
			ws.CloseNow()
			return err
		}
		m := Message{Type: typ, Data: data}
		c.mu.Lock()
		filter := c.filter
		c.mu.Unlock()
		if filter != nil && filter(m) {
			continue
		}
		select {
		case c.in <- m:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// setFilter makes f see every message first; those it returns true for are
// its own and never reach Read.
func (c *Conn) setFilter(f func(Message) bool) {
	c.mu.Lock()
	c.filter = f
	c.mu.Unlock()
}
