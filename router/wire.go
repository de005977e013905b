package router

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/http"
	"sync"
	"time"
)

// wireConn is the hijacked socket under a member's WebSocket. While the
// writer drains a batch it is corked: the frames coder/websocket flushes are
// gathered and go out in one write system call when the batch ends. Without
// it every message to every receiver is its own system call, which is where
// a plain coder/websocket broadcaster spends most of its CPU. Frames stay
// whole and separate; only the system calls are shared. Control frames that
// other goroutines write meanwhile (pongs, pings) join the batch in order,
// as coder/websocket serialises frame writes.
type wireConn struct {
	net.Conn

	mu     sync.Mutex
	corked bool    // guarded by mu
	buf    []byte  // guarded by mu; pending bytes while corked
	pooled *[]byte // guarded by mu; the pool's handle on buf
}

// Write implements io.Writer for coder/websocket's buffered writer.
func (w *wireConn) Write(p []byte) (int, error) {
	w.mu.Lock()
	if w.corked {
		w.buf = append(w.buf, p...)
		w.mu.Unlock()
		return len(p), nil
	}
	w.mu.Unlock()
	return w.Conn.Write(p)
}

func (w *wireConn) cork() {
	w.mu.Lock()
	w.corked = true
	if w.pooled == nil {
		w.pooled = bufPool.Get().(*[]byte)
		w.buf = (*w.pooled)[:0]
	}
	w.mu.Unlock()
}

// uncork writes what the batch gathered, in one system call, under the write
// deadline.
func (w *wireConn) uncork(timeout time.Duration) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.corked = false
	buf := w.buf
	defer w.release()
	if len(buf) == 0 {
		return nil
	}
	// Holding mu across the write keeps a concurrent pong from overtaking
	// the batch; it waits at most the deadline.
	w.Conn.SetWriteDeadline(time.Now().Add(timeout))
	_, err := w.Conn.Write(buf)
	// Clear it again: control frames written between batches (pongs,
	// pings) carry coder/websocket's own timeouts and must not inherit an
	// expired deadline.
	w.Conn.SetWriteDeadline(time.Time{})
	return err
}

// bufPool holds batch buffers: a connection only holds one while it writes.
var bufPool = sync.Pool{New: func() any {
	b := make([]byte, 0, 16<<10)
	return &b
}}

// release returns the batch buffer to the pool, reusing the pool's pointer so
// that it costs no allocation. Callers hold mu.
func (w *wireConn) release() {
	if cap(w.buf) <= 1<<20 { // let an outsized buffer go
		*w.pooled = w.buf[:0]
		bufPool.Put(w.pooled)
	}
	w.buf, w.pooled = nil, nil
}

// Per-connection buffer sizes: they are held for the connection's whole life,
// so they are what an idle member costs.
const (
	connReadBuffer  = 1024
	connWriteBuffer = 512
)

// captureWriter lets websocket.Accept hijack the connection while the router
// keeps the raw socket: it wraps it in a wireConn and gives coder/websocket a
// writer on top of that.
type captureWriter struct {
	http.ResponseWriter
	wc *wireConn
}

func (w *captureWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	w.wc = &wireConn{Conn: nc}
	// Fresh, small buffers instead of net/http's 4 KiB ones, which stay
	// with the request's handler. Bytes the client sent after its upgrade
	// request may already sit in net/http's reader: they are carried over.
	// A small read buffer costs no extra system call for a message larger
	// than it (bufio reads those straight into the destination), and
	// corked frames gather in wireConn, so the writer can be small too.
	br := bufio.NewReaderSize(w.wc, connReadBuffer)
	if n := brw.Reader.Buffered(); n > 0 {
		early, _ := brw.Reader.Peek(n)
		// They must sit in the returned reader's buffer: Accept takes
		// what is buffered there and resets the reader.
		br = bufio.NewReaderSize(io.MultiReader(bytes.NewReader(bytes.Clone(early)), w.wc), max(n, connReadBuffer))
		br.Peek(n)
	}
	return w.wc, bufio.NewReadWriter(br, bufio.NewWriterSize(w.wc, connWriteBuffer)), nil
}
