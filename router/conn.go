package router

import (
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
	queue chan registry.Message

	closeOnce   sync.Once
	closing     chan struct{} // closed by Close
	closeCode   int           // written once before closing is closed
	closeReason string        // likewise

	// Set before the writer starts, then read-only.
	ws *websocket.Conn
	nc net.Conn
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
		queue:   make(chan registry.Message, rt.cfg.SendQueue),
		closing: make(chan struct{}),
	}
}

// Send implements registry.Member. It never blocks.
func (c *conn) Send(msg registry.Message) {
	select {
	case c.queue <- msg:
	default:
		// Counted as a 4008 close when the writer sends it.
		c.Close(codeSlowConsumer, "slow consumer")
	}
}

// Close implements registry.Member: it asks the writer to send a close frame
// and end the connection. It never blocks and only the first call counts.
func (c *conn) Close(code int, reason string) {
	c.closeOnce.Do(func() {
		c.closeCode, c.closeReason = code, reason
		close(c.closing)
	})
}

// serve runs the connection until it ends. The context derives from the
// router's base context, never from the request's.
func (c *conn) serve(ws *websocket.Conn, nc net.Conn) {
	c.ws, c.nc = ws, nc
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
	c.log.Debug("left", "why", closeDescription(err))
}

// readLoop reads messages and fans them out until the connection fails or
// closes.
func (c *conn) readLoop(ctx context.Context) error {
	c.ws.SetReadLimit(c.rt.cfg.MaxMessage)
	for {
		typ, data, err := c.ws.Read(ctx)
		if err != nil {
			if errors.Is(err, websocket.ErrMessageTooBig) {
				// coder/websocket has already sent 1009.
				c.rt.metrics.closed(codeTooBig)
			}
			return err
		}
		msg := registry.Message{Binary: typ == websocket.MessageBinary, Data: data}
		c.rt.metrics.messageIn(msg)
		n := c.reg.Broadcast(c, c.role, msg)
		c.rt.metrics.messagesOut(msg, n)
	}
}

// writeLoop is the only writer of the connection. It also pings.
func (c *conn) writeLoop(ctx context.Context) {
	var ping <-chan time.Time
	if c.rt.cfg.PingInterval > 0 {
		t := time.NewTicker(c.rt.cfg.PingInterval)
		defer t.Stop()
		ping = t.C
	}
	for {
		select {
		case msg := <-c.queue:
			if err := c.write(msg); err != nil {
				c.log.Debug("write failed", "err", err)
				c.nc.Close()
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

// write writes one message under the write timeout. The deadline sits on the
// socket rather than in a context: cheaper per message, and it bounds the
// flush itself.
func (c *conn) write(msg registry.Message) error {
	typ := websocket.MessageText
	if msg.Binary {
		typ = websocket.MessageBinary
	}
	c.nc.SetWriteDeadline(time.Now().Add(c.rt.cfg.WriteTimeout))
	return c.ws.Write(context.Background(), typ, msg.Data)
}

// closeHandshake sends the requested close frame and waits for the peer's,
// dropping the socket if that takes longer than the write timeout.
func (c *conn) closeHandshake() {
	c.rt.metrics.closed(c.closeCode)
	t := time.AfterFunc(c.rt.cfg.WriteTimeout, func() { c.nc.Close() })
	defer t.Stop()
	c.nc.SetWriteDeadline(time.Now().Add(c.rt.cfg.WriteTimeout))
	c.ws.Close(websocket.StatusCode(c.closeCode), c.closeReason)
}

// ping sends one ping and drops the connection if no pong arrives within the
// ping timeout. A peer that does not answer pings is dead or stuck; a close
// handshake with it would only wait, so the socket is simply closed (the
// peer, if it ever looks, sees 1006).
func (c *conn) ping(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, c.rt.cfg.PingTimeout)
	defer cancel()
	err := c.ws.Ping(ctx)
	if err != nil && errors.Is(err, context.DeadlineExceeded) {
		c.log.Debug("ping timeout")
		c.rt.metrics.pingTimeout()
		c.nc.Close()
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
