package router

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"wsrouter/registry"
)

// relayLinger is how long a finished request's rid still claims a host's
// reply, so that a late answer goes nowhere rather than to the clients
// (docs/protocol.md §7).
const relayLinger = 60 * time.Second

// Finished rids are remembered for the whole of relayLinger, never fewer:
// when a registration has maxLingering of them (or the process
// maxLingeringTotal) new relay requests are refused with 503 until the
// oldest expire. At the default per-address rate (20/s) one caller leaves
// 1,200 a minute; an entry costs about 60 bytes.
const (
	maxLingering      = 1 << 14
	maxLingeringTotal = 1 << 20
)

// Relay errors, each a status of docs/protocol.md §7.
var (
	errNotHostClient = errors.New("relay needs a hostclient registration")
	errNoHost        = errors.New("no host connected")
	errRelayTimeout  = errors.New("host did not answer in time")
	errHostGone      = errors.New("host went away")
	errTooManyRelays = errors.New("too many pending relay requests")
	errHostBusy      = errors.New("host is not reading its relay requests")
	errRelayMemory   = errors.New("relay memory limit reached")
	errRelayRecent   = errors.New("too many recent relay requests")
)

// relay turns HTTP requests into frames for a registration's host and the
// host's replies into HTTP responses. It works like
// net/http/httputil.ReverseProxy with a WebSocket as the transport: a struct
// of limits, ServeHTTP, hop-by-hop headers stripped both ways, a correlation
// id, and the pending entry removed in a defer on every exit path.
type relay struct {
	rt  *Router
	now func() time.Time // time.Now; tests set a fake clock

	// mem counts the bytes of relayed requests held in memory against
	// -relay-max-memory; lingering counts the finished rids remembered by
	// all rooms against maxLingeringTotal.
	mem       *relayMemory
	lingering atomic.Int64

	// rooms holds the relay state of each registration that has had a
	// relay request: *registry.Registration → *relayRoom. A sync.Map
	// because every host text frame looks here, and entries are rare.
	rooms sync.Map
}

// rid is a relay request's correlation id: 16 random bytes, 32 hex digits
// on the wire.
type rid [16]byte

func newRID() (r rid) {
	rand.Read(r[:])
	return r
}

func (r rid) String() string { return hex.EncodeToString(r[:]) }

// parseRID reads a rid from a reply; ok is false for anything the router
// cannot have minted.
func parseRID(s string) (r rid, ok bool) {
	if len(s) != 2*len(r) {
		return r, false
	}
	_, err := hex.Decode(r[:], []byte(s))
	return r, err == nil
}

// relayRoom is the relay state of one registration.
type relayRoom struct {
	rl *relay

	mu        sync.Mutex
	pending   map[rid]*pendingRelay // guarded by mu
	lingering map[rid]int64         // guarded by mu; finished rid → when (unix ns)
	order     []rid                 // guarded by mu; lingering rids, oldest first
	closed    error                 // guarded by mu; set when the registration went
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
		rl:        rl,
		pending:   map[rid]*pendingRelay{},
		lingering: map[rid]int64{},
	})
	return v.(*relayRoom)
}

// add registers a pending request, unless the room is closed or full, or
// remembers as many finished requests as it may.
func (room *relayRoom) add(id rid, p *pendingRelay, max int, now time.Time) error {
	room.mu.Lock()
	defer room.mu.Unlock()
	if room.closed != nil {
		return room.closed
	}
	if len(room.pending) >= max {
		return errTooManyRelays
	}
	room.expireLocked(now)
	// Room for this request's rid to linger once it ends: nothing is
	// forgotten early.
	if len(room.lingering)+len(room.pending) >= maxLingering ||
		room.rl.lingering.Load() >= maxLingeringTotal {
		return errRelayRecent
	}
	room.pending[id] = p
	return nil
}

// finish removes a pending request and lets its rid linger.
func (room *relayRoom) finish(id rid, now time.Time) {
	room.mu.Lock()
	defer room.mu.Unlock()
	delete(room.pending, id)
	room.expireLocked(now)
	if room.closed != nil {
		return // the registration is gone: no replies will come
	}
	room.lingering[id] = now.UnixNano()
	room.order = append(room.order, id)
	room.rl.lingering.Add(1)
}

// expireLocked forgets the rids that finished relayLinger ago or more.
func (room *relayRoom) expireLocked(now time.Time) {
	cutoff := now.Add(-relayLinger).UnixNano()
	i := 0
	for ; i < len(room.order); i++ {
		id := room.order[i]
		if room.lingering[id] > cutoff {
			break
		}
		delete(room.lingering, id)
	}
	if i > 0 {
		room.order = room.order[i:]
		room.rl.lingering.Add(-int64(i))
		if len(room.order) == 0 {
			room.order = nil // let a large backing array go
		}
	}
}

// claim delivers a host's reply to its caller. It reports whether the frame
// was a reply of this room (pending or lingering), which then must not be
// forwarded to the clients.
func (room *relayRoom) claim(s string, reply []byte, now time.Time) bool {
	id, ok := parseRID(s)
	if !ok {
		return false
	}
	room.mu.Lock()
	defer room.mu.Unlock()
	if p, ok := room.pending[id]; ok {
		delete(room.pending, id)
		p.reply <- relayOutcome{reply: reply}
		return true
	}
	room.expireLocked(now)
	_, late := room.lingering[id]
	return late
}

// failHost ends every request waiting on host, which has gone.
func (room *relayRoom) failHost(host registry.Member) {
	room.mu.Lock()
	defer room.mu.Unlock()
	for id, p := range room.pending {
		if p.host == host {
			delete(room.pending, id)
			p.reply <- relayOutcome{err: errHostGone}
		}
	}
}

// close ends every pending request with err and refuses new ones.
func (room *relayRoom) close(err error) {
	room.mu.Lock()
	defer room.mu.Unlock()
	room.closed = err
	for id, p := range room.pending {
		delete(room.pending, id)
		p.reply <- relayOutcome{err: err}
	}
	room.rl.lingering.Add(-int64(len(room.order)))
	room.order, room.lingering = nil, nil
}

// sweep forgets, in every room, the rids that finished relayLinger ago: a
// room is otherwise swept only when it is used, and the process-wide count
// must fall as time passes even for rooms nobody uses any more.
func (rl *relay) sweep() {
	now := rl.now()
	rl.rooms.Range(func(_, v any) bool {
		room := v.(*relayRoom)
		room.mu.Lock()
		room.expireLocked(now)
		room.mu.Unlock()
		return true
	})
}

// pendingLen returns the number of pending requests of the room.
func (room *relayRoom) pendingLen() int {
	room.mu.Lock()
	defer room.mu.Unlock()
	return len(room.pending)
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
	s, ok := replyRID(data)
	if !ok {
		return false
	}
	// The frame is parsed further by its caller, off the host's reader.
	return v.(*relayRoom).claim(s, data, rl.now())
}

// hostLeft fails the requests waiting on a host whose connection ended.
func (rl *relay) hostLeft(c *conn) {
	if v, ok := rl.rooms.Load(c.reg); ok {
		v.(*relayRoom).failHost(c)
	}
}

// removed fails the pending requests of a registration that is gone: 503
// while the server shuts down (docs/protocol.md §8), 502 otherwise (its host was closed).
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
		id, _, _ := splitRelayPath(r.URL.Path)
		if !validID(id) {
			id = ""
		}
		rl.rt.log.Debug("relay failed", "reg", id, "status", status, "err", err)
		writeRelayError(w, err)
	} else {
		status = resp.status
		for k, vs := range resp.header {
			w.Header()[k] = vs
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(resp.body)))
		w.WriteHeader(resp.status)
		w.Write(resp.body)
	}
	rl.rt.metrics.relayed(status, time.Since(start))
}

// relayMemory counts the bytes of relayed requests in memory (bodies as
// they arrive, then frames until written or dropped) against a limit for
// the process and a share of it for each client address (an eighth, or four
// bodies' worth if that is more), so that one address cannot take it all.
type relayMemory struct {
	max, maxPerClient int64

	mu       sync.Mutex
	total    int64            // guarded by mu
	byClient map[string]int64 // guarded by mu; only addresses holding some
}

func newRelayMemory(limit, maxBody int64) *relayMemory {
	return &relayMemory{
		max:          limit,
		maxPerClient: max(limit/8, 4*maxBody),
		byClient:     map[string]int64{},
	}
}

// charge counts n more bytes for client, or refuses them (errRelayMemory).
func (m *relayMemory) charge(client string, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.total+n > m.max || m.byClient[client]+n > m.maxPerClient {
		return errRelayMemory
	}
	m.total += n
	m.byClient[client] += n
	return nil
}

// release gives back n bytes charged for client.
func (m *relayMemory) release(client string, n int64) {
	if n == 0 {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.total -= n
	if m.byClient[client] -= n; m.byClient[client] <= 0 {
		delete(m.byClient, client)
	}
}

// inUse returns the bytes charged.
func (m *relayMemory) inUse() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.total
}

// chargedReader charges what it reads to client; n is what it charged.
type chargedReader struct {
	r      io.Reader
	mem    *relayMemory
	client string
	n      int64
}

func (cr *chargedReader) Read(p []byte) (int, error) {
	k, err := cr.r.Read(p)
	if k > 0 {
		if e := cr.mem.charge(cr.client, int64(k)); e != nil {
			return 0, e
		}
		cr.n += int64(k)
	}
	return k, err
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
	cred, err := readCredentials(&params{r: r, vals: map[string][]string{"key": keys}}, needKey)
	if err != nil {
		return nil, err
	}
	reg, err := rt.registry.Get(id)
	if err != nil {
		return nil, err
	}
	// The key first: without it, not even the registration's type is told.
	if err := rt.auth.member(r, "relay", reg, cred); err != nil {
		return nil, err
	}
	if reg.Type != registry.HostClient {
		return nil, errNotHostClient
	}
	host := reg.PickHost()
	if host == nil {
		return nil, errNoHost
	}

	// Memory, against -relay-max-memory and this client's share of it:
	// the body as its bytes arrive (a caller that trickles one holds only
	// what it sent), then the frame in its place. The frame stays charged
	// until it is written or dropped, after the request if need be.
	if r.ContentLength > rt.cfg.RelayMaxBody {
		return nil, errTooLarge
	}
	client := rt.limits.clientIP(r)
	var body []byte
	if r.Body != nil {
		in := &chargedReader{r: http.MaxBytesReader(w, r.Body, rt.cfg.RelayMaxBody), mem: rl.mem, client: client}
		body, err = io.ReadAll(in)
		defer rl.mem.release(client, in.n)
		if err != nil {
			var tooBig *http.MaxBytesError
			switch {
			case errors.As(err, &tooBig):
				return nil, errTooLarge
			case errors.Is(err, errRelayMemory):
				return nil, err
			}
			// The caller's body broke off: its fault, not a 5xx.
			return nil, paramError("request body unreadable")
		}
	}
	rid := newRID()
	data, err := encodeRelayRequest(rid.String(), r.Method, path, query, r.Header, body)
	if err != nil {
		return nil, err
	}
	body = nil // the frame carries it now
	n := int64(len(data))
	if err := rl.mem.charge(client, n); err != nil {
		return nil, err
	}
	frame := &relayFrame{data: data, release: func() { rl.mem.release(client, n) }}
	// However the request ends, its frame is never written after that, and
	// its bytes are given back once nobody holds them: at once if it is
	// still queued (or never was), else by the writer that took it.
	sent := false
	defer func() {
		frame.ended.Store(true)
		if c, ok := host.(*conn); ok && sent {
			c.queue.dropRelay(frame)
		} else {
			frame.done()
		}
	}()

	room := rl.room(reg)
	p := &pendingRelay{host: host, reply: make(chan relayOutcome, 1)}
	if err := room.add(rid, p, rt.cfg.RelayMaxPending, rl.now()); err != nil {
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
	if c, ok := host.(*conn); ok {
		if c.isGone() {
			room.failHost(host)
		}
		if sent = c.sendRelay(frame); !sent {
			return nil, errHostBusy
		}
	} else {
		host.Send(registry.Message{Data: frame.data})
	}

	timer := time.NewTimer(rt.cfg.RelayTimeout)
	defer timer.Stop()
	select {
	case out := <-p.reply:
		if out.err != nil {
			return nil, out.err
		}
		return parseRelayReply(out.reply, rt.cfg.RelayMaxBody)
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
	case errors.Is(err, errHostBusy):
		return http.StatusServiceUnavailable, "host busy"
	case errors.Is(err, errRelayMemory), errors.Is(err, errRelayRecent):
		return http.StatusServiceUnavailable, "server busy"
	}
	return status(err)
}

func writeRelayError(w http.ResponseWriter, err error) {
	code, msg := relayStatus(err)
	// Every relay answer, an error too, is sandboxed and private (the
	// router's CORS header is set for every request).
	w.Header().Set("Content-Security-Policy", relaySandbox)
	w.Header().Set("Cache-Control", "private")
	if code == http.StatusTooManyRequests && errors.Is(err, errTooManyRelays) {
		// Pending requests end within the relay timeout at the latest.
		w.Header().Set("Retry-After", "1")
	}
	writeStatus(w, err, code, msg)
}
