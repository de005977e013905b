package router

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"wsrouter/registry"
)

// relayLinger is how long a finished request's rid still claims a host's
// reply, so that a late answer goes nowhere rather than to the clients
// (SPEC §7).
const relayLinger = 60 * time.Second

// maxLingering bounds the remembered finished rids per registration; past it
// the oldest are forgotten early.
const maxLingering = 1024

// Relay errors, each a status of SPEC §7.
var (
	errNotHostClient = errors.New("relay needs a hostclient registration")
	errNoHost        = errors.New("no host connected")
	errRelayTimeout  = errors.New("host did not answer in time")
	errHostGone      = errors.New("host went away")
	errTooManyRelays = errors.New("too many pending relay requests")
)

// relay turns HTTP requests into frames for a registration's host and the
// host's replies into HTTP responses. It works like
// net/http/httputil.ReverseProxy with a WebSocket as the transport: a struct
// of limits, ServeHTTP, hop-by-hop headers stripped both ways, a correlation
// id, and the pending entry removed in a defer on every exit path.
type relay struct {
	rt  *Router
	now func() time.Time // time.Now; tests set a fake clock

	// rooms holds the relay state of each registration that has had a
	// relay request: *registry.Registration → *relayRoom. A sync.Map
	// because every host text frame looks here, and entries are rare.
	rooms sync.Map
}

// relayRoom is the relay state of one registration.
type relayRoom struct {
	mu        sync.Mutex
	pending   map[string]*pendingRelay // guarded by mu; by rid
	lingering map[string]time.Time     // guarded by mu; finished rid → when
	order     []string                 // guarded by mu; lingering rids, oldest first
	closed    error                    // guarded by mu; set when the registration went
}

// pendingRelay is one request waiting for its host's reply.
type pendingRelay struct {
	host  registry.Member
	reply chan relayOutcome // capacity 1; exactly one outcome is sent
}

// relayOutcome is either a reply frame or the error that ended the wait.
type relayOutcome struct {
	reply []byte
	err   error
}

func (rl *relay) room(reg *registry.Registration) *relayRoom {
	if v, ok := rl.rooms.Load(reg); ok {
		return v.(*relayRoom)
	}
	v, _ := rl.rooms.LoadOrStore(reg, &relayRoom{
		pending:   map[string]*pendingRelay{},
		lingering: map[string]time.Time{},
	})
	return v.(*relayRoom)
}

// add registers a pending request, unless the room is closed or full.
func (room *relayRoom) add(rid string, p *pendingRelay, max int) error {
	room.mu.Lock()
	defer room.mu.Unlock()
	if room.closed != nil {
		return room.closed
	}
	if len(room.pending) >= max {
		return errTooManyRelays
	}
	room.pending[rid] = p
	return nil
}

// finish removes a pending request and lets its rid linger.
func (room *relayRoom) finish(rid string, now time.Time) {
	room.mu.Lock()
	defer room.mu.Unlock()
	delete(room.pending, rid)
	room.expireLocked(now)
	if len(room.order) >= maxLingering {
		delete(room.lingering, room.order[0])
		room.order = room.order[1:]
	}
	room.lingering[rid] = now
	room.order = append(room.order, rid)
}

func (room *relayRoom) expireLocked(now time.Time) {
	i := 0
	for ; i < len(room.order); i++ {
		rid := room.order[i]
		if now.Sub(room.lingering[rid]) < relayLinger {
			break
		}
		delete(room.lingering, rid)
	}
	room.order = room.order[i:]
}

// claim delivers a host's reply to its caller. It reports whether the frame
// was a reply of this room (pending or lingering), which then must not be
// forwarded to the clients.
func (room *relayRoom) claim(rid string, reply []byte, now time.Time) bool {
	room.mu.Lock()
	defer room.mu.Unlock()
	if p, ok := room.pending[rid]; ok {
		delete(room.pending, rid)
		p.reply <- relayOutcome{reply: reply}
		return true
	}
	room.expireLocked(now)
	_, late := room.lingering[rid]
	return late
}

// failHost ends every request waiting on host, which has gone.
func (room *relayRoom) failHost(host registry.Member) {
	room.mu.Lock()
	defer room.mu.Unlock()
	for rid, p := range room.pending {
		if p.host == host {
			delete(room.pending, rid)
			p.reply <- relayOutcome{err: errHostGone}
		}
	}
}

// close ends every pending request with err and refuses new ones.
func (room *relayRoom) close(err error) {
	room.mu.Lock()
	defer room.mu.Unlock()
	room.closed = err
	for rid, p := range room.pending {
		delete(room.pending, rid)
		p.reply <- relayOutcome{err: err}
	}
}

// pendingCount returns the number of pending requests, for tests and stats.
func (rl *relay) pendingCount() int {
	n := 0
	rl.rooms.Range(func(_, v any) bool {
		room := v.(*relayRoom)
		room.mu.Lock()
		n += len(room.pending)
		room.mu.Unlock()
		return true
	})
	return n
}

// hostFrame is called by a host's reader for each text frame. It reports
// whether the frame was a relay reply, claimed for its caller.
func (rl *relay) hostFrame(reg *registry.Registration, data []byte) bool {
	v, ok := rl.rooms.Load(reg)
	if !ok {
		return false // no relay ever: the common case costs one map load
	}
	rid, ok := replyRID(data)
	if !ok {
		return false
	}
	// The frame is parsed further by its caller, off the host's reader.
	return v.(*relayRoom).claim(rid, data, rl.now())
}

// hostLeft fails the requests waiting on a host whose connection ended.
func (rl *relay) hostLeft(c *conn) {
	if v, ok := rl.rooms.Load(c.reg); ok {
		v.(*relayRoom).failHost(c)
	}
}

// removed fails the pending requests of a registration that is gone: 503
// while the server shuts down (SPEC §8), 502 otherwise (its host was closed).
func (rl *relay) removed(reg *registry.Registration, cause registry.Cause) {
	v, ok := rl.rooms.LoadAndDelete(reg)
	if !ok {
		return
	}
	err := errHostGone
	if cause == registry.CauseShutdown {
		err = errShuttingDown
	}
	v.(*relayRoom).close(err)
}

// ServeHTTP answers /relay/{id}/{path…}.
func (rl *relay) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	resp, err := rl.roundTrip(w, r)
	status := http.StatusOK
	if err != nil {
		status, _ = relayStatus(err)
		rl.rt.log.Debug("relay failed", "status", status, "err", err)
		writeRelayError(w, err)
	} else {
		status = resp.status
		for k, vs := range resp.header {
			w.Header()[k] = vs
		}
		w.Header().Set("Content-Length", fmt.Sprint(len(resp.body)))
		w.WriteHeader(resp.status)
		w.Write(resp.body)
	}
	rl.rt.metrics.relayed(status, time.Since(start))
}

func (rl *relay) roundTrip(w http.ResponseWriter, r *http.Request) (*relayResponse, error) {
	rt := rl.rt
	if rt.closing.Load() {
		return nil, errShuttingDown
	}
	if err := rt.allow(rt.limits.relay, "relay", r); err != nil {
		return nil, err
	}
	id, path, ok := splitRelayPath(r.URL.Path)
	if !ok || !validID(id) {
		return nil, paramError("malformed relay path: want /relay/{id}/{path}")
	}
	query := r.URL.Query()
	keys := query["key"]
	if len(keys) > 1 {
		return nil, paramError("parameter key given more than once")
	}
	query.Del("key")
	cred := &params{r: r, vals: map[string][]string{"key": keys}}
	key, err := cred.key("key", "X-Key")
	if err != nil {
		return nil, err
	}
	reg, err := rt.reg.Get(id)
	if err != nil {
		return nil, err
	}
	// The key first: without it, not even the registration's type is told.
	if err := rt.checkKey(r, "relay", reg, key); err != nil {
		return nil, err
	}
	if reg.Type != registry.HostClient {
		return nil, errNotHostClient
	}

	var body []byte
	if r.Body != nil {
		body, err = io.ReadAll(http.MaxBytesReader(w, r.Body, rt.cfg.RelayMaxBody))
		if err != nil {
			var tooBig *http.MaxBytesError
			if errors.As(err, &tooBig) {
				return nil, errTooLarge
			}
			// The caller's body broke off: its fault, not a 5xx.
			return nil, paramError("request body unreadable")
		}
	}

	host := reg.PickHost()
	if host == nil {
		return nil, errNoHost
	}
	rid := newConnID()
	frame, err := encodeRelayRequest(rid, r.Method, path, query, r.Header, body)
	if err != nil {
		return nil, err
	}

	room := rl.room(reg)
	p := &pendingRelay{host: host, reply: make(chan relayOutcome, 1)}
	if err := room.add(rid, p, rt.cfg.RelayMaxPending); err != nil {
		return nil, err
	}
	// The linger counts from the request's end, so the time is taken then.
	defer func() { room.finish(rid, rl.now()) }()
	// The registration or the host may have gone between the lookups above
	// and add: removed and hostLeft run after the flags checked here are
	// set, so either they saw the entry or this sees the flag.
	if reg.Removed() {
		if rt.closing.Load() {
			room.close(errShuttingDown)
		} else {
			room.close(errHostGone)
		}
		rl.rooms.CompareAndDelete(reg, room)
	}
	if c, ok := host.(*conn); ok && c.isGone() {
		room.failHost(host)
	}

	if c, ok := host.(*conn); ok {
		c.sendRelay(registry.Message{Data: frame})
	} else {
		host.Send(registry.Message{Data: frame})
	}

	timer := time.NewTimer(rt.cfg.RelayTimeout)
	defer timer.Stop()
	select {
	case out := <-p.reply:
		if out.err != nil {
			return nil, out.err
		}
		resp, err := parseRelayReply(out.reply, rt.cfg.RelayMaxBody)
		if err != nil {
			return nil, err
		}
		return resp, nil
	case <-timer.C:
		return nil, errRelayTimeout
	case <-r.Context().Done():
		return nil, r.Context().Err()
	}
}

// splitRelayPath splits "/relay/{id}/{path…}" into the id and the path after
// it, which always starts with "/".
func splitRelayPath(p string) (id, rest string, ok bool) {
	s, found := strings.CutPrefix(p, "/relay/")
	if !found {
		return "", "", false
	}
	id, rest, _ = strings.Cut(s, "/")
	return id, "/" + rest, id != ""
}

// relayStatus maps relay errors to statuses, falling back to status().
func relayStatus(err error) (int, string) {
	switch {
	case errors.Is(err, errNotHostClient):
		return http.StatusBadRequest, "not a hostclient registration"
	case errors.Is(err, errNoHost):
		return http.StatusServiceUnavailable, "no host connected"
	case errors.Is(err, errRelayTimeout):
		return http.StatusGatewayTimeout, "host did not answer in time"
	case errors.Is(err, errHostGone):
		return http.StatusBadGateway, "host went away"
	case errors.Is(err, errBadReply):
		return http.StatusBadGateway, "bad reply from host"
	case errors.Is(err, errTooManyRelays):
		return http.StatusTooManyRequests, "too many pending requests"
	}
	return status(err)
}

func writeRelayError(w http.ResponseWriter, err error) {
	code, msg := relayStatus(err)
	if code == http.StatusTooManyRequests && errors.Is(err, errTooManyRelays) {
		// Pending requests end within the relay timeout at the latest.
		w.Header().Set("Retry-After", "1")
	}
	writeStatus(w, err, code, msg)
}
