package relay

import (
	"crypto/rand"
	"encoding/hex"
	"sync"
	"time"

	"wsrouter/registry"
)

// lingerFor is how long a finished request's rid still claims a host's
// reply, so that a late answer goes nowhere rather than to the clients
// (docs/protocol.md §7).
const lingerFor = 60 * time.Second

// Finished rids are remembered for the whole of lingerFor, never fewer:
// when a registration has maxLingering of them (or the process
// maxLingeringTotal) new relay requests are refused with 503 until the
// oldest expire. An entry costs about 45 bytes, so the process holds at most
// about 90 MB of them; a registration may sustain 17,000 relay requests a
// second (more than one node serves) before it is refused, where one caller
// at the default per-address rate (20/s) leaves 1,200 a minute. Variables
// only so that a test can lower them.
var (
	maxLingering      = 1 << 20
	maxLingeringTotal = int64(1 << 21)
)

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

// room is the relay state of one registration.
type room struct {
	p *Proxy

	mu        sync.Mutex
	pending   map[rid]*pending // guarded by mu
	lingering map[rid]int64    // guarded by mu; finished rid → when (unix ns)
	order     []rid            // guarded by mu; lingering rids, oldest first
	closed    error            // guarded by mu; set when the registration went
}

// pending is one request waiting for its host's reply.
type pending struct {
	host  registry.Member
	reply chan outcome // capacity 1; exactly one outcome is sent
}

// outcome is either a reply frame or the error that ended the wait.
type outcome struct {
	reply []byte
	err   error
}

func (p *Proxy) room(reg *registry.Registration) *room {
	if v, ok := p.rooms.Load(reg.Ref()); ok {
		return v.(*room)
	}
	v, _ := p.rooms.LoadOrStore(reg.Ref(), &room{
		p:         p,
		pending:   map[rid]*pending{},
		lingering: map[rid]int64{},
	})
	return v.(*room)
}

// add registers a pending request, unless the room is closed or full, or
// remembers as many finished requests as it may.
func (rm *room) add(id rid, pend *pending, max int, now time.Time) error {
	rm.mu.Lock()
	defer rm.mu.Unlock()
	if rm.closed != nil {
		return rm.closed
	}
	if len(rm.pending) >= max {
		return ErrTooManyPending
	}
	rm.expireLocked(now)
	// Room for this request's rid to linger once it ends: nothing is
	// forgotten early.
	if len(rm.lingering)+len(rm.pending) >= maxLingering ||
		rm.p.lingering.Load() >= maxLingeringTotal {
		return ErrRecent
	}
	rm.pending[id] = pend
	return nil
}

// finish removes a pending request and lets its rid linger.
func (rm *room) finish(id rid, now time.Time) {
	rm.mu.Lock()
	defer rm.mu.Unlock()
	delete(rm.pending, id)
	rm.expireLocked(now)
	if rm.closed != nil {
		return // the registration is gone: no replies will come
	}
	rm.lingering[id] = now.UnixNano()
	rm.order = append(rm.order, id)
	rm.p.lingering.Add(1)
}

// expireLocked forgets the rids that finished lingerFor ago or more.
func (rm *room) expireLocked(now time.Time) {
	cutoff := now.Add(-lingerFor).UnixNano()
	i := 0
	for ; i < len(rm.order); i++ {
		id := rm.order[i]
		if rm.lingering[id] > cutoff {
			break
		}
		delete(rm.lingering, id)
	}
	if i > 0 {
		rm.order = rm.order[i:]
		rm.p.lingering.Add(-int64(i))
		if len(rm.order) == 0 {
			rm.order = nil // let a large backing array go
		}
	}
}

// claim delivers a host's reply to its caller. It reports whether the frame
// was a reply of this room (pending or lingering), which then must not be
// forwarded to the clients.
func (rm *room) claim(s string, reply []byte, now time.Time) bool {
	id, ok := parseRID(s)
	if !ok {
		return false
	}
	rm.mu.Lock()
	defer rm.mu.Unlock()
	if p, ok := rm.pending[id]; ok {
		delete(rm.pending, id)
		p.reply <- outcome{reply: reply}
		return true
	}
	rm.expireLocked(now)
	_, late := rm.lingering[id]
	return late
}

// failHost ends every request waiting on host, which has gone.
func (rm *room) failHost(host registry.Member) {
	rm.mu.Lock()
	defer rm.mu.Unlock()
	for id, p := range rm.pending {
		if p.host == host {
			delete(rm.pending, id)
			p.reply <- outcome{err: ErrHostGone}
		}
	}
}

// close ends every pending request with err and refuses new ones.
func (rm *room) close(err error) {
	rm.mu.Lock()
	defer rm.mu.Unlock()
	rm.closed = err
	for id, p := range rm.pending {
		delete(rm.pending, id)
		p.reply <- outcome{err: err}
	}
	rm.p.lingering.Add(-int64(len(rm.order)))
	rm.order, rm.lingering = nil, nil
}

// pendingLen returns the number of pending requests of the rm.
func (rm *room) pendingLen() int {
	rm.mu.Lock()
	defer rm.mu.Unlock()
	return len(rm.pending)
}
