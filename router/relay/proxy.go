// Package relay turns HTTP requests into frames for a device joined to a
// registration as its host, and the device's replies into HTTP responses
// (docs/protocol.md §7). It is shaped like net/http/httputil.ReverseProxy
// with a WebSocket as the transport: a struct of limits, ServeHTTP, a Route
// function that picks the target as ReverseProxy's Director rewrites the
// request, hop-by-hop headers stripped both ways, a correlation id per
// request, and the pending entry removed in a defer on every exit path.
//
// The package knows nothing of WebSockets: a host is anything that can queue
// a frame (Host), and the router feeds the host's text frames back through
// HostFrame.
package relay

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"wsrouter/registry"
)

// Errors of a relay request, each a status (Status maps them).
var (
	ErrNotHostClient  = errors.New("relay needs a hostclient registration")
	ErrNoHost         = errors.New("no host connected")
	ErrTimeout        = errors.New("host did not answer in time")
	ErrHostGone       = errors.New("host went away")
	ErrTooManyPending = errors.New("too many pending relay requests")
	ErrHostBusy       = errors.New("host is not reading its relay requests")
	ErrMemory         = errors.New("relay memory limit reached")
	ErrRecent         = errors.New("too many recent relay requests")
	ErrTooLarge       = errors.New("request body too large")
	ErrBodyBroken     = errors.New("request body unreadable")
)

// Host is the transport to one device: its connection's queue.
type Host interface {
	registry.Member
	// SendFrame queues f for writing, unless the host's relay budget is
	// spent (false). Once queued, the host owns f: it skips it if f has
	// Ended by the time it would write it, and calls f.Done once it has
	// written or skipped it.
	SendFrame(f *Frame) bool
	// DropFrame takes f out of the queue if it is still there (its request
	// has ended), and then calls f.Done.
	DropFrame(f *Frame)
	// Gone reports whether the host's connection has ended.
	Gone() bool
}

// Frame is a request frame on its way to a host.
type Frame struct {
	// Data is the frame's JSON text.
	Data []byte

	ended   atomic.Bool
	once    sync.Once
	release func()
}

// Ended reports whether the frame's request has ended: writing it now would
// be of no use to anyone.
func (f *Frame) Ended() bool { return f.ended.Load() }

// Done gives the frame's bytes back to the relay's memory budget; only the
// first call counts. Call it once nobody holds the frame any more.
func (f *Frame) Done() {
	f.once.Do(func() {
		if f.release != nil {
			f.release()
		}
	})
}

// The defaults of Proxy's limits, for its zero values.
const (
	DefaultTimeout    = 10 * time.Second
	DefaultMaxBody    = 1 << 20
	DefaultMaxPending = 100
	DefaultMaxMemory  = 256 << 20
)

// Target is where Route sends a request.
type Target struct {
	// Reg is the registration (hostclient) and Host the host picked in it.
	Reg  *registry.Registration
	Host Host
	// Path is the request's path after /relay/{id}, starting with "/".
	Path string
	// Query is the request's query without the router's credentials.
	Query url.Values
	// Client names the caller's address, for its share of the memory.
	Client string
	// Remote, set instead of Host, carries the request to a host on
	// another node of a cluster, which makes the exchange there (with its
	// own timeout, limits and late-reply window) and answers with the
	// device's reply or with an error that Status knows (ErrNoHost when no
	// node has a host).
	Remote func(ctx context.Context, x *Exchange) (*Answer, error)
}

// Proxy relays HTTP requests to hosts. Set its fields before serving; zero
// values mean the defaults given on each.
type Proxy struct {
	// Route checks a request (rate limits, credentials, the
	// registration) and picks its target. An error fails the request and
	// goes to ErrorHandler.
	Route func(w http.ResponseWriter, r *http.Request) (*Target, error)
	// ErrorHandler answers a failed request. nil writes Status's status
	// and body.
	ErrorHandler func(w http.ResponseWriter, r *http.Request, err error)
	// Observe, if set, is told of every request's end: the registration's
	// id (empty when the path had none), the status, how long it took and
	// the error (nil when the device answered).
	Observe func(id string, status int, d time.Duration, err error)
	// Timeout bounds the wait for a host's reply; 0 means 10 s.
	Timeout time.Duration
	// MaxBody bounds a request body and a reply body once decoded; 0
	// means 1 MiB.
	MaxBody int64
	// MaxPending bounds the requests waiting on one registration; 0 means
	// 100.
	MaxPending int
	// MaxMemory bounds the bytes of relayed requests in memory (bodies as
	// they arrive, frames until written or dropped); each client address
	// may hold an eighth of it, or four bodies' worth if that is more. 0
	// means 256 MiB.
	MaxMemory int64
	// Now is the clock of the late-reply window; nil means time.Now.
	Now func() time.Time

	initOnce sync.Once
	mem      *memory
	// lingering counts the finished rids remembered by all rooms against
	// maxLingeringTotal.
	lingering atomic.Int64
	// rooms holds the state of each registration that has had a relay
	// request: registry.Ref → *room. A sync.Map because every host text
	// frame looks here, and entries are rare.
	rooms sync.Map
}

func (p *Proxy) init() {
	p.initOnce.Do(func() {
		if p.Timeout <= 0 {
			p.Timeout = DefaultTimeout
		}
		if p.MaxBody <= 0 {
			p.MaxBody = DefaultMaxBody
		}
		if p.MaxPending <= 0 {
			p.MaxPending = DefaultMaxPending
		}
		if p.MaxMemory <= 0 {
			p.MaxMemory = DefaultMaxMemory
		}
		if p.Now == nil {
			p.Now = time.Now
		}
		p.mem = newMemory(p.MaxMemory, p.MaxBody)
	})
}

// ServeHTTP answers a relay request.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.init()
	start := time.Now()
	// Every relay answer, an error too, is sandboxed and private: whatever
	// a device serves is served from the router's origin.
	w.Header().Set("Content-Security-Policy", Sandbox)
	w.Header().Set("Cache-Control", "private")
	id, resp, err := p.roundTrip(w, r)
	var status int
	if err != nil {
		status, _, _ = Status(err)
		if p.ErrorHandler != nil {
			p.ErrorHandler(w, r, err)
		} else {
			writeError(w, err)
		}
	} else {
		status = resp.status
		for k, vs := range resp.header {
			w.Header()[k] = vs
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(resp.body)))
		w.WriteHeader(resp.status)
		w.Write(resp.body)
	}
	if p.Observe != nil {
		p.Observe(id, status, time.Since(start), err)
	}
}

// Status maps the errors of this package to an HTTP status and a one-line
// body; known is false for any other error.
func Status(err error) (code int, msg string, known bool) {
	switch {
	case errors.Is(err, ErrNotHostClient):
		return http.StatusBadRequest, "not a hostclient registration", true
	case errors.Is(err, ErrBodyBroken):
		return http.StatusBadRequest, "request body unreadable", true
	case errors.Is(err, ErrTooLarge):
		return http.StatusRequestEntityTooLarge, "request body too large", true
	case errors.Is(err, ErrNoHost):
		return http.StatusServiceUnavailable, "no host connected", true
	case errors.Is(err, ErrTimeout):
		return http.StatusGatewayTimeout, "host did not answer in time", true
	case errors.Is(err, ErrHostGone):
		return http.StatusBadGateway, "host went away", true
	case errors.Is(err, ErrBadReply):
		return http.StatusBadGateway, "bad reply from host", true
	case errors.Is(err, ErrTooManyPending):
		return http.StatusTooManyRequests, "too many pending requests", true
	case errors.Is(err, ErrHostBusy):
		return http.StatusServiceUnavailable, "host busy", true
	case errors.Is(err, ErrMemory), errors.Is(err, ErrRecent):
		return http.StatusServiceUnavailable, "server busy", true
	}
	return http.StatusInternalServerError, "internal error", false
}

func writeError(w http.ResponseWriter, err error) {
	code, msg, _ := Status(err)
	if errors.Is(err, ErrTooManyPending) {
		// Pending requests end within the relay timeout at the latest.
		w.Header().Set("Retry-After", "1")
	}
	http.Error(w, msg, code)
}

func (p *Proxy) roundTrip(w http.ResponseWriter, r *http.Request) (string, *response, error) {
	t, err := p.Route(w, r)
	if err != nil {
		return "", nil, err
	}
	id := t.Reg.ID

	// Memory, against MaxMemory and this client's share of it: the body
	// as its bytes arrive (a caller that trickles one holds only what it
	// sent), then the frame in its place. The frame stays charged until it
	// is written or dropped, after the request if need be.
	if r.ContentLength > p.MaxBody {
		return id, nil, ErrTooLarge
	}
	var body []byte
	if r.Body != nil {
		in := &chargedReader{r: http.MaxBytesReader(w, r.Body, p.MaxBody), mem: p.mem, client: t.Client}
		body, err = io.ReadAll(in)
		defer p.mem.release(t.Client, in.n)
		if err != nil {
			var tooBig *http.MaxBytesError
			switch {
			case errors.As(err, &tooBig):
				return id, nil, ErrTooLarge
			case errors.Is(err, ErrMemory):
				return id, nil, err
			}
			// The caller's body broke off: its fault, not a 5xx.
			return id, nil, ErrBodyBroken
		}
	}
	if t.Remote != nil {
		ctx, cancel := context.WithTimeout(r.Context(), p.Timeout+remoteSlack)
		defer cancel()
		// The router's credentials (and cookies) never cross to the
		// other node: the device would not see them either.
		a, err := t.Remote(ctx, &Exchange{Method: r.Method, Path: t.Path, Query: t.Query, Header: endToEnd(r.Header, dropRequestHeaders), Body: body, Client: t.Client})
		if errors.Is(err, context.DeadlineExceeded) && r.Context().Err() == nil {
			err = ErrTimeout
		}
		if err != nil {
			return id, nil, err
		}
		return id, &response{status: a.Status, header: a.Header, body: a.Body}, nil
	}
	resp, err := p.exchange(r.Context(), t, r.Method, r.Header, body)
	return id, resp, err
}

// remoteSlack is how much longer than Timeout a request to another node
// waits: that node times the device out first and says so.
const remoteSlack = 2 * time.Second

// exchange sends a request frame to t.Host and waits for its reply.
func (p *Proxy) exchange(ctx context.Context, t *Target, method string, header http.Header, body []byte) (*response, error) {
	rid := newRID()
	data, err := encodeRequest(rid.String(), method, t.Path, t.Query, header, body)
	if err != nil {
		return nil, err
	}
	body = nil // the frame carries it now
	n := int64(len(data))
	if err := p.mem.charge(t.Client, n); err != nil {
		return nil, err
	}
	frame := &Frame{Data: data, release: func() { p.mem.release(t.Client, n) }}
	// However the request ends, its frame is never written after that, and
	// its bytes are given back once nobody holds them: at once if it is
	// still queued (or never was), else by the host that took it.
	sent := false
	defer func() {
		frame.ended.Store(true)
		if sent {
			t.Host.DropFrame(frame)
		} else {
			frame.Done()
		}
	}()

	room := p.room(t.Reg)
	pend := &pending{host: t.Host, reply: make(chan outcome, 1)}
	if err := room.add(rid, pend, p.MaxPending, p.Now()); err != nil {
		return nil, err
	}
	// The linger counts from the request's end, so the time is taken then.
	defer func() { room.finish(rid, p.Now()) }()
	// The registration or the host may have gone between Route and add:
	// Removed and HostLeft are called after the flags checked here are
	// set, so either they saw the entry or this sees the flag.
	if t.Reg.Removed() {
		room.close(ErrHostGone)
		p.rooms.CompareAndDelete(t.Reg.Ref(), room)
	}
	if t.Host.Gone() {
		room.failHost(t.Host)
	}
	if sent = t.Host.SendFrame(frame); !sent {
		return nil, ErrHostBusy
	}

	timer := time.NewTimer(p.Timeout)
	defer timer.Stop()
	select {
	case out := <-pend.reply:
		if out.err != nil {
			return nil, out.err
		}
		return parseReply(out.reply, p.MaxBody)
	case <-timer.C:
		return nil, ErrTimeout
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// HostFrame is called by a host's reader for each text frame. It reports
// whether the frame was a relay reply, claimed for its caller (then it must
// not be forwarded to the clients).
func (p *Proxy) HostFrame(reg *registry.Registration, data []byte) bool {
	v, ok := p.rooms.Load(reg.Ref())
	if !ok {
		return false // no relay ever: the common case costs one map load
	}
	s, ok := replyRID(data)
	if !ok {
		return false
	}
	p.init()
	// The frame is parsed further by its caller, off the host's reader.
	return v.(*room).claim(s, data, p.Now())
}

// HostLeft fails the requests waiting on a host whose connection ended.
func (p *Proxy) HostLeft(reg *registry.Registration, h Host) {
	if v, ok := p.rooms.Load(reg.Ref()); ok {
		v.(*room).failHost(h)
	}
}

// Removed fails the pending requests of a registration that is gone with
// err (ErrHostGone, or the router's shutdown error) and forgets its state.
func (p *Proxy) Removed(reg *registry.Registration, err error) {
	if v, ok := p.rooms.LoadAndDelete(reg.Ref()); ok {
		v.(*room).close(err)
	}
}

// Sweep forgets, in every room, the rids that finished lingerFor ago: a
// room is otherwise swept only when it is used, and the process-wide count
// must fall as time passes even for rooms nobody uses any more. Call it
// every few seconds.
func (p *Proxy) Sweep() {
	p.init()
	now := p.Now()
	p.rooms.Range(func(_, v any) bool {
		rm := v.(*room)
		rm.mu.Lock()
		rm.expireLocked(now)
		rm.mu.Unlock()
		return true
	})
}

// Pending returns the number of requests waiting for a reply, for stats
// and tests.
func (p *Proxy) Pending() int {
	n := 0
	p.rooms.Range(func(_, v any) bool {
		n += v.(*room).pendingLen()
		return true
	})
	return n
}

// PendingFor returns the number of requests waiting on reg.
func (p *Proxy) PendingFor(reg *registry.Registration) int {
	if v, ok := p.rooms.Load(reg.Ref()); ok {
		return v.(*room).pendingLen()
	}
	return 0
}

// MemoryInUse returns the bytes of relayed requests charged against
// MaxMemory.
func (p *Proxy) MemoryInUse() int64 {
	p.init()
	return p.mem.inUse()
}
