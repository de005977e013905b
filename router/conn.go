package router

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/coder/websocket"

	"wsrouter/registry"
)

// Close codes of SPEC §4.
const (
	codeNormal       = 1000
	codeGoingAway    = 1001
	codePolicy       = 1008
	codeTooBig       = 1009
	codeInternal     = 1011
	codeRemoved      = 4000
	codeSlowConsumer = 4008

	// codePingTimeout stands for a member dropped without a close frame
	// because it did not answer a ping. It never goes on the wire.
	codePingTimeout = -1
)

// conn is one member: a WebSocket joined to a registration. The handler's
// goroutine reads; one writer goroutine is the only caller of Write. The
// reader returning cancels the connection's context, the writer returns,
// and the handler leaves the registration: one exit path.
type conn struct {
	rt   *Router
	id   string
	reg  *registry.Registration
	role registry.Role
	log  *slog.Logger

	// queue is the bounded send queue. Fan-out never blocks on it: a full
	// queue closes the connection as a slow consumer.
	queue *sendQueue

	gone chan struct{} // closed when the connection has ended

	closeOnce   sync.Once
	closing     chan struct{} // closed by Close
	closeCode   int           // written once before closing is closed
	closeReason string        // likewise

	// Set before the writer starts, then read-only.
	ws *websocket.Conn
	wc *wireConn
}

func newConnID() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (rt *Router) newConn(reg *registry.Registration, role registry.Role) *conn {
	id := newConnID()
	return &conn{
		rt:      rt,
		id:      id,
		reg:     reg,
		role:    role,
		log:     rt.log.With("reg", reg.ID, "role", role.String(), "conn", id),
		queue:   newSendQueue(rt.cfg.SendQueueBytes),
		closing: make(chan struct{}),
		gone:    make(chan struct{}),
	}
}

// Send implements registry.Member. It never blocks.
func (c *conn) Send(msg registry.Message) {
	if !c.queue.push(msg) {
		c.Close(codeSlowConsumer, "slow consumer")
	}
}

// Close implements registry.Member: it asks the writer to send a close frame
// and end the connection. It never blocks and only the first call counts.
func (c *conn) Close(code int, reason string) {
	c.closeOnce.Do(func() {
		c.closeCode, c.closeReason = code, reason
		close(c.closing)
		// Counted when decided: the frame itself may wait for a stalled
		// write to finish or time out.
		c.rt.noteClose(code)
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

// serve runs the connection until it ends. The context derives from the
// router's base context, never from the request's.
func (c *conn) serve(ws *websocket.Conn, wc *wireConn) {
	c.ws, c.wc = ws, wc
	ctx, cancel := context.WithCancel(c.rt.baseCtx)
	defer cancel()

	c.log.Debug("joined")
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.writeLoop(ctx)
	}()

	err := c.readLoop(ctx)
	cancel()
	<-done
	ws.CloseNow()
	close(c.gone)
	if c.role == registry.RoleHost {
		c.rt.relay.hostLeft(c)
	}
	c.log.Debug("left", "why", closeDescription(err))
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
		msg := registry.Message{Binary: typ == websocket.MessageBinary, Data: data}
		c.rt.metrics.messageIn(msg)
		if c.role == registry.RoleHost && !msg.Binary && c.rt.relay.hostFrame(c.reg, data) {
			continue // a relay reply goes to its caller only
		}
		n := c.reg.Broadcast(c, c.role, msg)
		c.rt.metrics.messagesOut(msg, n)
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

// writeLoop is the only writer of the connection. It also pings.
func (c *conn) writeLoop(ctx context.Context) {
	var ping <-chan time.Time
	if c.rt.cfg.PingInterval > 0 {
		t := time.NewTicker(c.rt.cfg.PingInterval)
		defer t.Stop()
		ping = t.C
	}
	var batch []registry.Message
	for {
		select {
		case <-c.queue.ready:
			// A pending close goes first: a removed or slow member is
			// closed at once, not after its backlog.
			select {
			case <-c.closing:
				c.closeHandshake()
				return
			default:
			}
			batch = c.queue.take(batch)
			if err := c.writeBatch(batch); err != nil {
				c.log.Debug("write failed", "err", err)
				c.wc.Close()
				return
			}
		case <-c.closing:
			c.closeHandshake()
			return
		case <-ping:
			go c.ping(ctx)
		case <-ctx.Done():
			return
		}
	}
}

// writeBatch writes every message of a batch as its own frame, corked so
// that the whole batch leaves in one system call under the write timeout.
func (c *conn) writeBatch(batch []registry.Message) error {
	c.wc.cork()
	for _, msg := range batch {
		typ := websocket.MessageText
		if msg.Binary {
			typ = websocket.MessageBinary
		}
		// No context deadline: corked writes only copy; the deadline sits
		// on the socket for the one real write in uncork.
		if err := c.ws.Write(context.Background(), typ, msg.Data); err != nil {
			c.wc.uncork(c.rt.cfg.WriteTimeout)
			return err
		}
	}
	return c.wc.uncork(c.rt.cfg.WriteTimeout)
}

// closeHandshake sends the requested close frame and waits for the peer's,
// dropping the socket if that takes longer than the write timeout.
func (c *conn) closeHandshake() {
	t := time.AfterFunc(c.rt.cfg.WriteTimeout, func() { c.wc.Close() })
	defer t.Stop()
	c.wc.SetWriteDeadline(time.Now().Add(c.rt.cfg.WriteTimeout))
	c.ws.Close(websocket.StatusCode(c.closeCode), c.closeReason)
}

// ping sends one ping and drops the connection if no pong arrives within the
// ping timeout, or if the ping could not be written. A peer that does not
// answer pings is dead or stuck; a close handshake with it would only wait,
// so the socket is simply closed (the peer, if it ever looks, sees 1006).
func (c *conn) ping(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, c.rt.cfg.PingTimeout)
	defer cancel()
	err := c.ws.Ping(ctx)
	switch {
	case err == nil, c.isClosing(), errors.Is(err, net.ErrClosed):
		// Answered, or the connection is ending anyway.
	case errors.Is(err, context.Canceled):
		// The connection's context ended: it is going.
	default:
		c.log.Debug("ping failed", "err", err)
		if errors.Is(err, context.DeadlineExceeded) {
			c.rt.noteClose(codePingTimeout)
		}
		c.wc.Close()
	}
}

func (c *conn) isClosing() bool {
	select {
	case <-c.closing:
		return true
	default:
		return false
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
