package router

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"wsrouter/registry"
)

// The info stream (docs/protocol.md §14): GET /info upgraded sends a
// snapshot of one registration (with its host key or the admin token) or of
// all of them (admin token), then each lifecycle event as it happens. The
// events come from the registry's observers, pushed, never polled. A watcher
// has a bounded queue like a member's: one that falls behind is closed with
// 4008, and nothing it does slows the router.

// Bounds on the info streams open at once: of one registration (so that one
// registration's owner cannot take every slot), of every registration
// (admin streams, counted apart so that the dashboard always has room), and
// in all.
const (
	maxWatchersPerReg = 16
	maxWatchersAll    = 64
	maxWatchers       = 1024
)

// errTooManyWatchers is a watcher over one of those bounds: 503.
var errTooManyWatchers = errors.New("too many info streams")

// infoProtocol is the subprotocol the dashboard asks for, with the admin
// token as a second one ("bearer." + base64url(token)): a browser cannot
// set Authorization on a WebSocket.
const (
	infoProtocol   = "wsrouter.info"
	bearerProtocol = "bearer."
)

// watchers holds the open info streams. Its lock is taken by the observer
// for every event and held only to copy the watchers an event concerns.
type watchers struct {
	n     atomic.Int32 // watchers open; events are encoded only when some are
	mu    sync.Mutex
	byReg map[string][]*watcher // guarded by mu; watchers of one registration
	all   []*watcher            // guarded by mu; watchers of every registration
}

// watcher is one info stream. Frames wait in a byte-bounded queue for its
// writer goroutine.
type watcher struct {
	rt    *Router
	regID string                 // "" for every registration
	reg   *registry.Registration // the one watched; nil for every registration
	ws    *websocket.Conn
	max   int

	mu      sync.Mutex
	started bool              // guarded by mu; the snapshot is queued
	pending []infoFrame       // guarded by mu; events that came before it
	floor   map[string]uint64 // guarded by mu; per registration, the last Seq the snapshot reflects
	queue   [][]byte          // guarded by mu
	bytes   int               // guarded by mu
	code    int               // guarded by mu; set once: close with it after the queue drains
	reason  string            // guarded by mu
	wake    chan struct{}     // capacity 1
}

// infoFrame is an event for a watcher, with what the snapshot filter needs:
// the registration, and the node whose event it is ("" for this one), whose
// events are numbered by seq.
type infoFrame struct {
	reg  string
	node string
	seq  uint64
	data []byte
}

// floorKey names a registration's events on one node in a snapshot's
// floor.
func floorKey(reg, node string) string {
	if node == "" {
		return reg
	}
	return reg + "/" + node
}

func (ws *watchers) add(w *watcher) error {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	switch {
	case w.regID == "" && len(ws.all) >= maxWatchersAll,
		w.regID != "" && (len(ws.byReg[w.regID]) >= maxWatchersPerReg || int(ws.n.Load())-len(ws.all) >= maxWatchers):
		return errTooManyWatchers
	}
	if w.regID == "" {
		ws.all = append(ws.all, w)
	} else {
		if ws.byReg == nil {
			ws.byReg = make(map[string][]*watcher)
		}
		ws.byReg[w.regID] = append(ws.byReg[w.regID], w)
	}
	ws.n.Add(1)
	return nil
}

func (ws *watchers) remove(w *watcher) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	drop := func(l []*watcher) []*watcher {
		i := slices.Index(l, w)
		if i < 0 {
			return l
		}
		ws.n.Add(-1)
		return slices.Delete(slices.Clone(l), i, i+1)
	}
	if w.regID == "" {
		ws.all = drop(ws.all)
		return
	}
	if l := drop(ws.byReg[w.regID]); len(l) > 0 {
		ws.byReg[w.regID] = l
	} else {
		delete(ws.byReg, w.regID)
	}
}

// list returns the watchers that hear about registration id.
func (ws *watchers) list(id string) (one, all []*watcher) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	return ws.byReg[id], ws.all
}

// every returns every watcher.
func (ws *watchers) every() []*watcher {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	out := slices.Clone(ws.all)
	for _, l := range ws.byReg {
		out = append(out, l...)
	}
	return out
}

// infoEvent is an event frame. Member fields are those of /members.
type infoEvent struct {
	Type         string    `json:"type"`
	Time         time.Time `json:"time"`
	Registration string    `json:"registration,omitempty"` // server-wide streams only
	*memberJSON
	Code  int    `json:"code,omitempty"`  // leave
	Event string `json:"event,omitempty"` // subscribe, unsubscribe
	// register only
	RegType   string     `json:"reg_type,omitempty"`
	CreatedAt *time.Time `json:"created_at,omitempty"`
}

// observeInfo hands a lifecycle event to the watchers it concerns, and on
// a cluster node a member's event to the other nodes' watchers too. It
// runs on the registry's observer path: it encodes at most three times and
// never blocks.
func (rt *Router) observeInfo(ev registry.Event) {
	shared := rt.cfg.Cluster != nil && isMemberEvent(ev.Kind) && rt.cfg.Cluster.EventsFollowed()
	if rt.watchers.n.Load() == 0 && !shared {
		return
	}
	e, ok := infoEventOf(ev)
	if !ok {
		return
	}
	if shared {
		rt.shareEvent(ev, e)
	}
	rt.deliverInfo(ev.Reg.ID, ev.Reg.Generation, infoFrame{reg: ev.Reg.ID, seq: ev.Seq}, e, ev.Kind)
}

func isMemberEvent(k registry.EventKind) bool {
	switch k {
	case registry.EventJoin, registry.EventLeave, registry.EventSubscribe, registry.EventUnsubscribe:
		return true
	}
	return false
}

// infoEventOf is ev as a watcher sees it; false for what watchers are not
// told (a shutdown).
func infoEventOf(ev registry.Event) (infoEvent, bool) {
	e := infoEvent{Time: ev.Time.UTC()}
	switch ev.Kind {
	case registry.EventCreate:
		e.Type, e.RegType = "register", ev.Reg.Type.String()
		created := ev.Reg.Created.UTC()
		e.CreatedAt = &created
	case registry.EventRemove:
		if ev.Cause == registry.CauseShutdown {
			return e, false // closeWatchers says 1001 instead
		}
		e.Type = "remove"
	case registry.EventJoin, registry.EventLeave, registry.EventSubscribe, registry.EventUnsubscribe:
		e.Type = ev.Kind.String()
		mj := memberOf(registry.MemberInfo{Member: ev.Member, Role: ev.Role, Name: ev.Name})
		e.memberJSON = &mj
		if ev.Kind == registry.EventLeave {
			e.Code = ev.Closure.Code
		} else if ev.Kind != registry.EventJoin {
			e.Event = ev.Pattern
		}
	default:
		return e, false
	}
	return e, true
}

// deliverInfo queues event e of registration id (generation gen) to the
// watchers it concerns; f carries its place for the snapshot filter.
func (rt *Router) deliverInfo(id string, gen uint64, f infoFrame, e infoEvent, kind registry.EventKind) {
	if rt.watchers.n.Load() == 0 {
		return
	}
	one, all := rt.watchers.list(id)
	if kind == registry.EventCreate {
		one = nil // a registration's own watchers came after it was made
	}
	if len(one) > 0 {
		e.Registration = ""
		f.data, _ = json.Marshal(e)
		for _, w := range one {
			if w.reg.Generation != gen {
				continue // a registration made again under its id: not the one watched
			}
			w.event(f)
			if kind == registry.EventRemove {
				w.closeAfter(codeRemoved, "registration removed")
			}
		}
	}
	if len(all) > 0 {
		e.Registration = id
		f.data, _ = json.Marshal(e)
		for _, w := range all {
			w.event(f)
		}
	}
}

// event queues f, or keeps it until the snapshot is queued.
func (w *watcher) event(f infoFrame) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.started {
		w.pending = append(w.pending, f)
		return
	}
	w.pushLocked(f.data)
}

// start queues the snapshot, then the events that came meanwhile and that
// it does not already reflect.
func (w *watcher) start(snapshot []byte, floor map[string]uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.started, w.floor = true, floor
	w.pushLocked(snapshot)
	for _, f := range w.pending {
		if s, ok := floor[floorKey(f.reg, f.node)]; !ok || f.seq > s {
			w.pushLocked(f.data)
		}
	}
	w.pending = nil
}

// pushLocked queues data, or closes a watcher that has fallen behind. An
// empty queue always takes a frame, however large (a big snapshot).
func (w *watcher) pushLocked(data []byte) {
	if w.code != 0 {
		return
	}
	if len(w.queue) > 0 && w.bytes+len(data)+msgOverhead > w.max {
		w.code, w.reason = codeSlowConsumer, "slow consumer"
		w.queue, w.bytes = nil, 0
		w.rt.noteClose(codeSlowConsumer)
	} else {
		w.queue = append(w.queue, data)
		w.bytes += len(data) + msgOverhead
	}
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// closeAfter closes the watcher with code once what is queued is written.
func (w *watcher) closeAfter(code int, reason string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.code == 0 {
		w.code, w.reason = code, reason
		w.rt.noteClose(code)
	}
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// run writes queued frames until the watcher is closed or goes away.
func (w *watcher) run(ctx context.Context) {
	for {
		w.mu.Lock()
		batch, code, reason := w.queue, w.code, w.reason
		w.queue, w.bytes = nil, 0
		w.mu.Unlock()
		for _, b := range batch {
			wctx, cancel := context.WithTimeout(ctx, w.rt.cfg.WriteTimeout)
			err := w.ws.Write(wctx, websocket.MessageText, b)
			cancel()
			if err != nil {
				w.ws.CloseNow()
				return
			}
		}
		if code != 0 {
			if len(batch) == 0 || code == codeSlowConsumer {
				closeWithin(w.ws, code, reason, w.rt.cfg.WriteTimeout)
				return
			}
			continue // write what came with the close first
		}
		select {
		case <-w.wake:
		case <-ctx.Done():
			closeWithin(w.ws, codeGoingAway, "server shutting down", w.rt.cfg.WriteTimeout)
			return
		}
	}
}

// closeWithin sends a close frame and waits for the peer's, at most d.
func closeWithin(ws *websocket.Conn, code int, reason string, d time.Duration) {
	done := make(chan struct{})
	go func() {
		ws.Close(websocket.StatusCode(code), reason)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(d):
		ws.CloseNow()
	}
}

// serveInfo answers GET /info.
func (rt *Router) serveInfo(w http.ResponseWriter, r *http.Request) {
	watcher, snapshot, floor, err := rt.admitWatcher(w, r)
	if err != nil {
		if errors.Is(err, errUnauthorized) {
			rt.metrics.refused("info", http.StatusUnauthorized)
			w.Header().Set("WWW-Authenticate", `Bearer realm="wsrouter"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		rt.refuse(w, "info", err)
		return
	}
	defer rt.conns.Done()
	defer rt.dropWatcher(watcher)
	opts := &websocket.AcceptOptions{InsecureSkipVerify: true} // origins checked in admitWatcher
	if slices.Contains(subprotocols(r), infoProtocol) {
		opts.Subprotocols = []string{infoProtocol}
	}
	ws, err := websocket.Accept(w, r, opts)
	if err != nil {
		return
	}
	watcher.ws = ws
	watcher.start(snapshot, floor)
	// The watcher sends nothing; reading is for pings and its close.
	ctx := ws.CloseRead(rt.baseCtx)
	watcher.run(ctx)
}

// admitWatcher runs the checks of /info, registers the watcher (so that no
// event is missed) and takes the snapshot. On success the caller owns a
// conns.Done and the watcher's removal.
func (rt *Router) admitWatcher(w http.ResponseWriter, r *http.Request) (*watcher, []byte, map[string]uint64, error) {
	if rt.closing.Load() {
		return nil, nil, nil, errShuttingDown
	}
	if err := rt.allow(rt.limits.connect, "info", r); err != nil {
		return nil, nil, nil, err
	}
	p, err := readParams(w, r)
	if err != nil {
		return nil, nil, nil, err
	}
	id, err := p.id("id", false)
	if err != nil {
		return nil, nil, nil, err
	}
	bearer := readBearer(r)
	if bearer == "" {
		bearer = protocolBearer(r)
	}
	var reg *registry.Registration
	if id == "" {
		// Every registration: the operator only.
		if err := rt.auth.admin(r, "info", bearer); err != nil {
			return nil, nil, nil, err
		}
	} else {
		var cred credentials
		if bearer == "" {
			if cred, err = readCredentials(p, needHostKey); err != nil {
				return nil, nil, nil, err
			}
		}
		if reg, err = rt.lookup(r.Context(), id); err != nil {
			return nil, nil, nil, err
		}
		if err := rt.auth.backend(r, "info", reg, cred, bearer); err != nil {
			return nil, nil, nil, err
		}
	}
	if !isUpgrade(r) {
		return nil, nil, nil, errNotUpgrade
	}
	if !rt.originAllowed(r) {
		return nil, nil, nil, errOrigin
	}

	rt.mu.Lock()
	if rt.shuttingDown {
		rt.mu.Unlock()
		return nil, nil, nil, errShuttingDown
	}
	rt.conns.Add(1)
	rt.mu.Unlock()
	wt := &watcher{rt: rt, regID: id, reg: reg, max: rt.cfg.SendQueueBytes, wake: make(chan struct{}, 1)}
	if err := rt.watchers.add(wt); err != nil {
		rt.conns.Done()
		return nil, nil, nil, err
	}
	if err := rt.followEvents(); err != nil {
		rt.watchers.remove(wt)
		rt.conns.Done()
		return nil, nil, nil, err
	}
	// Removed while the credentials were checked: its remove event came
	// before the watcher could hear it. Once the watcher is in, a removal
	// not yet made will reach it.
	if reg != nil && reg.Removed() {
		rt.dropWatcher(wt)
		rt.conns.Done()
		return nil, nil, nil, registry.ErrNotFound
	}
	floor := map[string]uint64{}
	var snap any
	if reg != nil {
		members, seq := reg.View()
		floor[reg.ID] = seq
		ms := membersJSON(members)
		if rt.cfg.Cluster != nil {
			// The other nodes' members, each node's with the number
			// of its last event they reflect.
			ms = rt.clusterMembers(r.Context(), reg, ms, floor)
		}
		snap = struct {
			Type         string       `json:"type"`
			Registration infoReg      `json:"registration"`
			Members      []memberJSON `json:"members"`
		}{"snapshot", infoReg{ID: reg.ID, Type: reg.Type.String(), Created: reg.Created.UTC()}, ms}
	} else {
		var remote map[string][]memberJSON
		if rt.cfg.Cluster != nil {
			remote = rt.clusterAllMembers(r.Context(), floor)
		}
		regs := []infoReg{}
		rt.registry.Each(func(reg *registry.Registration) {
			members, seq := reg.View()
			floor[reg.ID] = seq
			m := membersJSON(members)
			if more := remote[floorKey(reg.ID, strconv.FormatUint(reg.Generation, 10))]; len(more) > 0 {
				m = append(m, more...)
				slices.SortFunc(m, func(a, b memberJSON) int { return a.ConnectedAt.Compare(b.ConnectedAt) })
			}
			regs = append(regs, infoReg{ID: reg.ID, Type: reg.Type.String(), Created: reg.Created.UTC(), Members: &m})
		})
		slices.SortFunc(regs, func(a, b infoReg) int { return a.Created.Compare(b.Created) })
		snap = struct {
			Type          string    `json:"type"`
			Registrations []infoReg `json:"registrations"`
		}{"snapshot", regs}
	}
	data, err := json.Marshal(snap)
	if err != nil {
		rt.dropWatcher(wt)
		rt.conns.Done()
		return nil, nil, nil, err
	}
	return wt, data, floor, nil
}

// infoReg is a registration in a snapshot.
type infoReg struct {
	ID      string        `json:"id"`
	Type    string        `json:"reg_type"`
	Created time.Time     `json:"created_at"`
	Members *[]memberJSON `json:"members,omitempty"` // server-wide snapshots
}

// protocolBearer returns the admin token a browser sent as the subprotocol
// "bearer.<base64url of the token>", or "".
func protocolBearer(r *http.Request) string {
	for _, p := range subprotocols(r) {
		if enc, ok := strings.CutPrefix(p, bearerProtocol); ok {
			if b, err := base64.RawURLEncoding.DecodeString(enc); err == nil {
				return string(b)
			}
		}
	}
	return ""
}

// subprotocols returns the subprotocols a WebSocket request offers.
func subprotocols(r *http.Request) []string {
	var out []string
	for _, v := range r.Header.Values("Sec-WebSocket-Protocol") {
		for p := range strings.SplitSeq(v, ",") {
			if p = strings.TrimSpace(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}

// closeWatchers closes every info stream with 1001 (shutdown).
func (rt *Router) closeWatchers() {
	for _, w := range rt.watchers.every() {
		w.closeAfter(codeGoingAway, "server shutting down")
	}
}
