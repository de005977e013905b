package router

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
	"golang.org/x/time/rate"

	"wsrouter/registry"
	"wsrouter/router/relay"
	"wsrouter/router/webhook"
)

// conn is one member: a WebSocket joined to a registration. One goroutine
// reads; a writer goroutine, started only while there is something to write,
// is the only caller of Write; a timer pings. The reader returning ends the
// connection: the socket closes, no writer may start any more, the running
// one returns, and the member leaves its registration — one exit path.
type conn struct {
	rt   *Router
	id   string
	reg  *registry.Registration
	role registry.Role
	log  *slog.Logger
	// name (may be empty), the client's address and when it was admitted:
	// what /members shows. Immutable.
	name        string
	remoteAddr  string
	connectedAt time.Time
	// tokenKey names the key that signed the token the member was
	// admitted with; "" when admitted with a key. Immutable.
	tokenKey string

	// hookQueue carries the connection's message and close events to its
	// registration's backend, hookEvents those it wants; nil and 0 without
	// a webhook. Set before the connection is served.
	hookQueue  *webhook.Queue
	hookEvents webhook.Events

	// queue is the bounded send queue. Fan-out never blocks on it: a full
	// queue closes the connection as a slow consumer.
	queue *sendQueue

	gone chan struct{} // closed when the connection has ended

	closeOnce   sync.Once
	closeCode   int         // written once, before the close request
	closeReason string      // likewise
	closing     atomic.Bool // a close was decided: nothing more is forwarded

	// frames bounds the frames (data and control) the peer may send per
	// second; nil means no limit. Used by the reader's goroutine only.
	frames *rate.Limiter

	pingMu      sync.Mutex
	pingStopped bool // guarded by pingMu; the ping timer must not be re-armed

	// Set before writers may start, then read-only.
	ctx context.Context // ends with the connection or the router
	ws  *websocket.Conn
	wc  *wireConn
}

func newConnID() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (rt *Router) newConn(reg *registry.Registration, id string, role registry.Role, name, remoteAddr string) *conn {
	log := rt.log.With("reg", reg.ID, "role", role.String(), "conn", id)
	if name != "" {
		log = log.With("name", name)
	}
	c := &conn{
		rt:          rt,
		id:          id,
		reg:         reg,
		role:        role,
		name:        name,
		remoteAddr:  remoteAddr,
		connectedAt: time.Now().UTC(),
		log:         log,
		queue:       newSendQueue(rt.cfg.SendQueueBytes, rt.cfg.RelayQueueBytes),
		gone:        make(chan struct{}),
	}
	if l := rt.cfg.RateMessage; l.Rate > 0 {
		c.frames = rate.NewLimiter(rate.Limit(l.Rate), max(l.Burst, 1))
	}
	return c
}

// allowFrame counts one frame from the peer against -rate-message and
// closes the member with 1008 once it is over. It reports whether the frame
// may be acted on.
func (c *conn) allowFrame() bool {
	if c.closing.Load() {
		return false
	}
	if c.frames != nil && !c.frames.Allow() {
		c.Close(codePolicy, "message rate exceeded")
		return false
	}
	return true
}

// onPing counts a ping against the frame rate; a member over it gets no
// pong.
func (c *conn) onPing(context.Context, []byte) bool { return c.allowFrame() }

// onPong counts an (unsolicited, perhaps) pong against the frame rate.
func (c *conn) onPong(context.Context, []byte) { c.allowFrame() }

// ID implements registry.Member: the connection id.
func (c *conn) ID() string { return c.id }

// Send implements registry.Member. It never blocks.
func (c *conn) Send(msg registry.Message) {
	ok, start := c.queue.push(msg)
	if !ok {
		c.Close(codeSlowConsumer, "slow consumer")
		return
	}
	if start {
		go c.writeLoop()
	}
}

// Close implements registry.Member: it asks the writer to send a close frame
// and end the connection. It never blocks and only the first call counts.
func (c *conn) Close(code int, reason string) {
	c.closeOnce.Do(func() {
		c.closeCode, c.closeReason = code, reason
		c.closing.Store(true)
		// Counted when decided: the frame itself may wait for a stalled
		// write to finish or time out.
		c.rt.noteClose(code)
		if c.queue.requestClose() {
			go c.writeLoop()
		}
	})
}

// isGone reports whether the connection has ended.
func (c *conn) isGone() bool {
	select {
	case <-c.gone:
		return true
	default:
		return false
	}
}

// serve runs the connection until it ends and says how it ended. The
// context derives from the router's base context, never from the request's.
func (c *conn) serve(ws *websocket.Conn, wc *wireConn) registry.Closure {
	ctx, cancel := context.WithCancel(c.rt.baseCtx)
	defer cancel()
	c.ctx, c.ws, c.wc = ctx, ws, wc

	c.log.Debug("joined")
	// Messages and a close request may have queued before the upgrade.
	if c.queue.openWriters() {
		go c.writeLoop()
	}
	var pinger *time.Timer
	if c.rt.cfg.PingInterval > 0 {
		// Armed far away first so the callback sees pinger assigned.
		pinger = time.AfterFunc(math.MaxInt64, func() { c.ping(pinger) })
		pinger.Reset(c.rt.cfg.PingInterval)
	}

	err := c.readLoop(ctx)
	cancel()
	if pinger != nil {
		// Under pingMu, so that a ping running now cannot re-arm it.
		c.pingMu.Lock()
		c.pingStopped = true
		pinger.Stop()
		c.pingMu.Unlock()
	}
	ws.CloseNow() // unblocks a writer stuck in a write
	c.queue.closeWriters()
	close(c.gone)
	if c.role == registry.RoleHost {
		c.rt.relay.HostLeft(c.reg, c)
	}
	c.log.Debug("left", "why", closeDescription(err))
	return c.closure(err)
}

// closure says how the connection ended: the close the server decided
// (counted once, docs/protocol.md §4), else the peer's close frame, else 1006 (no close
// frame: the network, a ping timeout, a failed write).
func (c *conn) closure(err error) registry.Closure {
	if c.closing.Load() && c.closeCode > 0 {
		// closeCode was written before closing was set, by Close.
		return registry.Closure{Code: c.closeCode, Reason: c.closeReason}
	}
	if errors.Is(err, websocket.ErrMessageTooBig) {
		return registry.Closure{Code: codeTooBig, Reason: "message too big"}
	}
	var ce websocket.CloseError
	if errors.As(err, &ce) {
		return registry.Closure{Code: int(ce.Code), Reason: ce.Reason}
	}
	return registry.Closure{Code: 1006}
}

// readLoop reads messages and fans them out until the connection fails or
// closes.
func (c *conn) readLoop(ctx context.Context) error {
	c.ws.SetReadLimit(c.rt.cfg.MaxMessage)
	// Reads take a background context: with a cancellable one,
	// coder/websocket arms and disarms a context.AfterFunc for every frame.
	// Closing the socket when ctx ends unblocks the read just the same.
	stop := context.AfterFunc(ctx, func() { c.wc.Close() })
	defer stop()
	for {
		typ, data, err := c.readMessage()
		if err != nil {
			if errors.Is(err, websocket.ErrMessageTooBig) {
				// coder/websocket has already sent 1009.
				c.rt.noteClose(codeTooBig)
			}
			return err
		}
		if !c.allowFrame() {
			continue // closing: read on until the close handshake ends
		}
		msg := registry.Message{Binary: typ == websocket.MessageBinary, Data: data}
		if !msg.Binary && !utf8.Valid(data) {
			// Browsers and Node fail the whole connection on it: one
			// member must not be able to disconnect every other.
			c.Close(codeInvalidUTF8, "invalid UTF-8 in a text message")
			continue
		}
		c.rt.metrics.messageIn(msg)
		if c.reg.Type == registry.PubSub {
			c.pubsubFrame(msg)
			c.hookMessage(ctx, msg)
			continue
		}
		if c.role == registry.RoleHost && !msg.Binary && c.rt.relay.HostFrame(c.reg, data) {
			continue // a relay reply goes to its caller only
		}
		n := c.reg.Publish(c, c.role, msg)
		c.rt.metrics.messagesOut(msg, n)
		c.hookMessage(ctx, msg)
	}
}

// readMessage reads one message into a pooled scratch buffer and returns an
// exactly sized copy: one allocation per message whatever its size, where
// reading into a growing slice would allocate several times for a large
// one. The copy is what every receiver shares.
func (c *conn) readMessage() (websocket.MessageType, []byte, error) {
	typ, r, err := c.ws.Reader(context.Background())
	if err != nil {
		return 0, nil, err
	}
	buf := scratchPool.Get().(*bytes.Buffer)
	defer func() {
		if buf.Cap() <= maxPooledScratch {
			buf.Reset()
			scratchPool.Put(buf)
		}
	}()
	if _, err := buf.ReadFrom(r); err != nil {
		return 0, nil, err
	}
	return typ, bytes.Clone(buf.Bytes()), nil
}

// scratchPool holds read buffers: a connection holds one only while it reads
// a message, so idle connections keep none.
var scratchPool = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// maxPooledScratch keeps a rare huge message from pinning its buffer.
const maxPooledScratch = 64 << 10

// writerLinger is how long a writer with nothing to write waits for more
// before its goroutine exits: long enough that request/response traffic
// keeps one writer, short enough that idle members hold none.
const writerLinger = time.Second

// writeLoop is the connection's writer while there is work: it sends a
// requested close frame first, otherwise drains the queue batch by batch,
// and parks when the queue is empty, returning if nothing comes within
// writerLinger.
func (c *conn) writeLoop() {
	defer c.queue.writerDone()
	var batch []registry.Message
	var relays []*relay.Frame
	// Frames taken but not written when the writer stops are let go.
	defer func() {
		for _, f := range relays {
			f.Done()
		}
	}()
	var linger *time.Timer
	for {
		var msgs []registry.Message
		var step writerStep
		msgs, relays, step = c.queue.next(batch)
		switch step {
		case stepExit:
			return
		case stepClose:
			c.closeHandshake()
			return
		case stepPark:
			if linger == nil {
				linger = time.NewTimer(writerLinger)
				defer linger.Stop()
			} else {
				linger.Reset(writerLinger)
			}
			select {
			case <-c.queue.wake:
			case <-linger.C:
				if c.queue.retire() {
					return
				}
			}
			continue
		}
		err := c.writeBatch(msgs)
		if err == nil {
			err = c.writeRelays(relays) // lets every frame go
			relays = nil
		}
		if err != nil {
			c.log.Debug("write failed", "err", err)
			// A member already being closed (a slow consumer whose
			// stalled write timed out) was counted by its close code.
			if c.ctx.Err() == nil && !c.closing.Load() {
				c.rt.noteClose(codeWriteFailed)
			}
			c.wc.Close()
			// Keep the writer's turn: the queue stays marked as
			// writing, so no new writer starts on a dead socket.
			return
		}
		batch = msgs
	}
}

// corkLimit is the largest payload copied into a corked batch. A larger one
// goes to the socket straight from the shared message: copying it per
// receiver would multiply a big message by the size of the room.
const corkLimit = 16 << 10

// writeBatch writes every message of a batch as its own frame, corked so
// that the whole batch leaves in one system call under the write timeout.
func (c *conn) writeBatch(batch []registry.Message) error {
	wt := c.rt.cfg.WriteTimeout
	c.wc.cork()
	for _, msg := range batch {
		typ := websocket.MessageText
		if msg.Binary {
			typ = websocket.MessageBinary
		}
		if len(msg.Data) > corkLimit {
			if err := c.wc.uncork(wt); err != nil {
				return err
			}
			c.wc.SetWriteDeadline(time.Now().Add(wt))
			err := c.ws.Write(context.Background(), typ, msg.Data)
			c.wc.SetWriteDeadline(time.Time{})
			if err != nil {
				return err
			}
			c.wc.cork()
			continue
		}
		// No context deadline: corked writes only copy; the deadline sits
		// on the socket for the one real write in uncork.
		if err := c.ws.Write(context.Background(), typ, msg.Data); err != nil {
			c.wc.uncork(wt)
			return err
		}
	}
	return c.wc.uncork(wt)
}

// writeRelays writes relay request frames, each on its own under the write
// timeout, skipping those whose request ended meanwhile (nobody would read
// the answer), and lets each go once written or skipped.
func (c *conn) writeRelays(frames []*relay.Frame) error {
	for i, f := range frames {
		if f.Ended() {
			f.Done()
			continue
		}
		c.wc.SetWriteDeadline(time.Now().Add(c.rt.cfg.WriteTimeout))
		err := c.ws.Write(context.Background(), websocket.MessageText, f.Data)
		c.wc.SetWriteDeadline(time.Time{})
		f.Done()
		if err != nil {
			for _, g := range frames[i+1:] {
				g.Done()
			}
			return err
		}
	}
	return nil
}

// closeHandshake sends the requested close frame and waits for the peer's,
// dropping the socket if that takes longer than the write timeout.
func (c *conn) closeHandshake() {
	t := time.AfterFunc(c.rt.cfg.WriteTimeout, func() { c.wc.Close() })
	defer t.Stop()
	c.wc.SetWriteDeadline(time.Now().Add(c.rt.cfg.WriteTimeout))
	c.ws.Close(websocket.StatusCode(c.closeCode), c.closeReason)
}

// ping sends one ping, from the ping timer's goroutine, and drops the
// connection if no pong arrives within the ping timeout or the ping could
// not be written; otherwise it re-arms the timer. A peer that does not
// answer pings is dead or stuck; a close handshake with it would only wait,
// so the socket is simply closed (the peer, if it ever looks, sees 1006).
func (c *conn) ping(t *time.Timer) {
	ctx, cancel := context.WithTimeout(c.ctx, c.rt.cfg.PingTimeout)
	defer cancel()
	err := c.ws.Ping(ctx)
	switch {
	case err == nil:
		c.pingMu.Lock()
		if !c.pingStopped {
			t.Reset(c.rt.cfg.PingInterval)
		}
		c.pingMu.Unlock()
	case c.ctx.Err() != nil, errors.Is(err, net.ErrClosed):
		// The connection is ending anyway.
	default:
		c.log.Debug("ping failed", "err", err)
		if errors.Is(err, context.DeadlineExceeded) {
			c.rt.noteClose(codePingTimeout)
		}
		c.wc.Close()
	}
}

// noteClose counts a server-side close.
func (rt *Router) noteClose(code int) {
	rt.metrics.closed(code)
	if rt.onClose != nil {
		rt.onClose(code)
	}
}

// closeDescription says how a connection ended, for the debug log.
func closeDescription(err error) string {
	if code := websocket.CloseStatus(err); code != -1 {
		return "close " + code.String()
	}
	if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, context.Canceled) {
		return "closed"
	}
	return err.Error()
}
