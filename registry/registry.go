// Package registry knows what a registration (a room) is: its id, type, key
// hashes, limits and timers, and its live members by role.
//
// It is deliberately free of networking: it imports neither net/http nor a
// WebSocket library. A member is anything that satisfies [Member], so the
// router's WebSocket connections, a test double, or a later remote member
// (several nodes sharing rooms) all fit.
package registry

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"runtime"
	"sync"
	"time"

	"github.com/google/uuid"
)

// Sentinel errors. The router maps each to one HTTP status or close code.
var (
	// ErrNotFound means the id names no live registration (never created,
	// removed, or garbage-collected).
	ErrNotFound = errors.New("registration not found")
	// ErrExists means a requested id is already live.
	ErrExists = errors.New("registration id taken")
	// ErrForbidden means a key or host key did not match.
	ErrForbidden = errors.New("wrong key")
	// ErrTooManyRegistrations means the registry is at MaxRegistrations.
	ErrTooManyRegistrations = errors.New("too many registrations")
	// ErrStore means the store failed (a disk full, a cluster store out of
	// reach); the operation did not happen.
	ErrStore = errors.New("store unavailable")
	// ErrRemoving means the registration is being removed: try again.
	ErrRemoving = errors.New("registration being removed")
	// ErrNameTaken means a member name is held by a member of another role.
	ErrNameTaken = errors.New("member name held by another role")
	// ErrTooManyMembers means the registration is at MaxMembers.
	ErrTooManyMembers = errors.New("too many members")
	// ErrTooManySubscriptions means a member holds MaxSubscriptions.
	ErrTooManySubscriptions = errors.New("too many subscriptions")
	// ErrNotMember means the member is not (or no longer) in the
	// registration.
	ErrNotMember = errors.New("not a member")
	// ErrBusy means the key-hashing pool stayed saturated for HashWait.
	ErrBusy = errors.New("key check pool busy")
	// ErrClosed means the registry is shutting down.
	ErrClosed = errors.New("registry closed")
)

// Cause says why a registration was removed.
type Cause int

const (
	// CauseAdmin is a removal through /remove.
	CauseAdmin Cause = iota
	// CauseGC is a removal after the last member left and GCGrace passed.
	CauseGC
	// CauseUnused is a removal of a registration nobody joined within UnusedTTL.
	CauseUnused
	// CauseShutdown is a removal because the registry closed.
	CauseShutdown
	// CauseRemote is a removal made on another node of a cluster (by
	// /remove or GC there), which this node follows.
	CauseRemote
)

// String returns the cause as used in metrics labels.
func (c Cause) String() string {
	switch c {
	case CauseAdmin:
		return "admin"
	case CauseGC:
		return "gc"
	case CauseUnused:
		return "ttl"
	case CauseShutdown:
		return "shutdown"
	case CauseRemote:
		return "remote"
	}
	return "unknown"
}

// Config holds the registry's limits and timers. The zero value of a field
// means the default documented on it.
type Config struct {
	// BcryptCost is the bcrypt cost for keys; 0 means 10.
	BcryptCost int
	// MaxRegistrations caps live registrations; 0 means no cap.
	MaxRegistrations int
	// MaxMembers caps members per registration; 0 means no cap.
	MaxMembers int
	// MaxSubscriptions caps each pub/sub member's subscriptions; 0 means
	// no cap.
	MaxSubscriptions int
	// GCGrace is how long an emptied registration lives on; 0 removes it at
	// once when its last member leaves.
	GCGrace time.Duration
	// UnusedTTL removes a registration nobody ever joined; 0 means never.
	UnusedTTL time.Duration
	// HashWorkers bounds concurrent bcrypt computations; 0 means half the
	// CPUs, at least one. bcrypt is deliberately slow (about 50 ms at cost
	// 10), so an unbounded number of them would starve forwarding.
	HashWorkers int
	// HashWait is how long a key check waits for a free hash worker before
	// failing with ErrBusy; 0 means 2 s.
	HashWait time.Duration
	// Observers receive every registration's lifecycle events (create,
	// join, leave, remove) outside the registry's locks, in order per
	// registration.
	Observers []Observer
	// Store keeps the registrations' records; nil means a MemoryStore.
	Store Store
	// Broker carries members' messages; nil means LocalBroker.
	Broker Broker
	// OnStoreError, if set, is told of a store failure nobody else hears
	// of: a removal by GC or TTL that could not be made durable (it is
	// retried).
	OnStoreError func(op, id string, err error)
	// OnKeyCheck, if set, observes each key check that reached a decision:
	// how it was decided and how long it took, waiting for a worker included.
	OnKeyCheck func(how KeyCheck, d time.Duration)
}

// Registry holds the live registrations of one node.
type Registry struct {
	cfg    Config
	hasher *hasher
	store  Store
	broker Broker

	mu       sync.RWMutex
	regs     map[string]*Registration // guarded by mu
	reserved map[string]struct{}      // guarded by mu; ids being created (stored, not yet live)
	closed   bool                     // guarded by mu
}

// New returns an empty registry.
func New(cfg Config) *Registry {
	if cfg.BcryptCost == 0 {
		cfg.BcryptCost = 10
	}
	if cfg.HashWorkers <= 0 {
		cfg.HashWorkers = max(1, runtime.NumCPU()/2)
	}
	if cfg.HashWait <= 0 {
		cfg.HashWait = 2 * time.Second
	}
	r := &Registry{
		cfg:      cfg,
		hasher:   newHasher(cfg.BcryptCost, cfg.HashWorkers, cfg.HashWait),
		store:    cfg.Store,
		broker:   cfg.Broker,
		regs:     make(map[string]*Registration),
		reserved: make(map[string]struct{}),
	}
	if r.store == nil {
		r.store = &MemoryStore{}
	}
	if r.broker == nil {
		r.broker = LocalBroker{}
	}
	return r
}

// NewID returns a fresh registration id: a random UUID as 32 lowercase hex
// digits.
func NewID() string {
	u := uuid.New()
	var b [32]byte
	const hexdigits = "0123456789abcdef"
	for i, v := range u {
		b[2*i] = hexdigits[v>>4]
		b[2*i+1] = hexdigits[v&0xf]
	}
	return string(b[:])
}

// Create hashes the keys and adds a registration, durable in the store
// before it is visible. An empty spec.ID mints a random id. Errors:
// ErrExists, ErrTooManyRegistrations, ErrBusy, ErrClosed, or the store's.
func (r *Registry) Create(ctx context.Context, spec Spec) (*Registration, error) {
	if err := r.checkCreate(spec.ID); err != nil {
		return nil, err
	}
	// Hash outside every lock: bcrypt takes tens of milliseconds.
	keyHash, err := r.hasher.hash(ctx, spec.Key)
	if err != nil {
		return nil, err
	}
	hostKeyHash, err := r.hasher.hash(ctx, spec.HostKey)
	if err != nil {
		return nil, err
	}
	rec := Record{
		ID:          spec.ID,
		Type:        spec.Type,
		Created:     time.Now(),
		KeyHash:     keyHash,
		HostKeyHash: hostKeyHash,
		Generation:  newGeneration(),
		Webhook:     spec.Webhook,
	}

	// The id is reserved while the store writes, so that no other Create
	// takes it meanwhile; only then does the registration become visible.
	r.mu.Lock()
	if err := r.checkCreateLocked(rec.ID); err != nil {
		r.mu.Unlock()
		return nil, err
	}
	if rec.ID == "" {
		for {
			rec.ID = NewID()
			if !r.takenLocked(rec.ID) {
				break
			}
		}
	}
	r.reserved[rec.ID] = struct{}{}
	r.mu.Unlock()

	if err := r.store.Put(ctx, rec); err != nil {
		r.mu.Lock()
		delete(r.reserved, rec.ID)
		r.mu.Unlock()
		if errors.Is(err, ErrExists) {
			// Another node, or a record this one has not restored.
			return nil, fmt.Errorf("create %s: %w", rec.ID, err)
		}
		return nil, fmt.Errorf("create %s: %w: %w", rec.ID, ErrStore, err)
	}
	reg, err := r.add(rec, true)
	if err != nil {
		r.store.Delete(context.WithoutCancel(ctx), rec.Ref())
		return nil, err
	}
	return reg, nil
}

// Ref names the registration rec describes.
func (rec Record) Ref() Ref { return Ref{rec.ID, rec.Generation} }

// Restore makes registrations live again from their records (loaded from the
// store at start), each as if nobody had joined it yet: it is removed after
// UnusedTTL unless someone joins. Records are not written back. A record
// whose id is live already is an error (ErrExists) and is skipped; the
// others are restored.
func (r *Registry) Restore(recs []Record) error {
	var errs []error
	for _, rec := range recs {
		r.mu.Lock()
		if r.takenLocked(rec.ID) {
			r.mu.Unlock()
			errs = append(errs, fmt.Errorf("restore %s: %w", rec.ID, ErrExists))
			continue
		}
		r.reserved[rec.ID] = struct{}{}
		r.mu.Unlock()
		if _, err := r.add(rec, false); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// add makes the registration of rec (whose id the caller reserved) live,
// tells the observers and arms the unused TTL. fresh says it was just
// created rather than restored.
func (r *Registry) add(rec Record, fresh bool) (*Registration, error) {
	reg := r.newRegistration(rec)
	r.mu.Lock()
	delete(r.reserved, rec.ID)
	if r.closed {
		r.mu.Unlock()
		return nil, ErrClosed
	}
	r.regs[rec.ID] = reg
	// Queued before anyone else can see reg, so it is its first event.
	reg.mu.Lock()
	reg.eventLocked(Event{Kind: EventCreate, Restored: !fresh})
	reg.mu.Unlock()
	r.mu.Unlock()
	reg.notify()

	if r.cfg.UnusedTTL > 0 {
		reg.mu.Lock()
		// reg is already visible: someone may have joined (and left, arming
		// the GC timer) or removed it since r.mu was released. Arming now
		// would replace that GC timer with one that never fires for a
		// joined registration, leaving it and its id alive forever.
		if !reg.joined && !reg.removed && reg.removing == nil {
			ttl := r.cfg.UnusedTTL
			if !fresh {
				// Restored registrations would otherwise all expire in
				// the same instant: spread them over a tenth more.
				ttl += time.Duration(mrand.Int64N(int64(ttl)/10 + 1))
			}
			reg.armTimerLocked(ttl, CauseUnused)
		}
		reg.mu.Unlock()
	}
	return reg, nil
}

// checkCreate is a cheap early check so a doomed Create does not pay for
// bcrypt.
func (r *Registry) checkCreate(id string) error {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.checkCreateLocked(id)
}

func (r *Registry) checkCreateLocked(id string) error {
	if r.closed {
		return ErrClosed
	}
	if id != "" && r.takenLocked(id) {
		return fmt.Errorf("create %s: %w", id, ErrExists)
	}
	if r.cfg.MaxRegistrations > 0 && len(r.regs)+len(r.reserved) >= r.cfg.MaxRegistrations {
		return ErrTooManyRegistrations
	}
	return nil
}

func (r *Registry) takenLocked(id string) bool {
	_, live := r.regs[id]
	_, reserved := r.reserved[id]
	return live || reserved
}

// Get returns the live registration named id, or ErrNotFound.
func (r *Registry) Get(id string) (*Registration, error) {
	r.mu.RLock()
	reg := r.regs[id]
	r.mu.RUnlock()
	if reg == nil {
		return nil, fmt.Errorf("get %s: %w", id, ErrNotFound)
	}
	return reg, nil
}

// Len returns the number of live registrations.
func (r *Registry) Len() int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return len(r.regs)
}

// Each calls f for every live registration, in no particular order, on a
// copy of the set so f may take any lock.
func (r *Registry) Each(f func(*Registration)) {
	r.mu.RLock()
	regs := make([]*Registration, 0, len(r.regs))
	for _, reg := range r.regs {
		regs = append(regs, reg)
	}
	r.mu.RUnlock()
	for _, reg := range regs {
		f(reg)
	}
}

// Close refuses new registrations and joins from now on and detaches every
// registration, closing its members with code and reason (1001 when the
// server shuts down). The store keeps their records.
func (r *Registry) Close(code int, reason string) {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	r.Each(func(reg *Registration) {
		reg.shutdown(code, reason)
	})
}

// Vanish ends the live registration named ref, whose record another node
// removed from the shared store: its members are closed with 4000 and its
// observers hear of a removal with CauseRemote. The store is not touched.
// A removal this node is making meanwhile is waited for: it ends the
// registration itself, with its own cause.
func (r *Registry) Vanish(ref Ref) {
	for {
		r.mu.RLock()
		reg := r.regs[ref.ID]
		r.mu.RUnlock()
		if reg == nil || reg.Generation != ref.Generation {
			return
		}
		reg.mu.Lock()
		switch op := reg.removing; {
		case reg.removed:
			reg.mu.Unlock()
			return
		case op != nil:
			reg.mu.Unlock()
			<-op.done
			continue
		}
		reg.detach(CauseRemote, 4000, "registration removed") // unlocks
		return
	}
}

// forget deletes reg from the map if it is still the registration under its
// id (the same generation): a newer registration reusing the id must never
// be touched.
func (r *Registry) forget(reg *Registration) {
	r.mu.Lock()
	if cur := r.regs[reg.ID]; cur != nil && cur.Generation == reg.Generation {
		delete(r.regs, reg.ID)
	}
	r.mu.Unlock()
}

// storeFailed reports a store failure to OnStoreError.
func (r *Registry) storeFailed(op, id string, err error) {
	if r.cfg.OnStoreError != nil && !errors.Is(err, ErrClosed) {
		r.cfg.OnStoreError(op, id, err)
	}
}

func (r *Registry) isClosed() bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.closed
}

// secret keys the HMAC of remembered keys. It is random per process and never
// leaves memory.
var secret = func() []byte {
	b := make([]byte, 32)
	rand.Read(b) // never fails (crypto/rand panics instead)
	return b
}()
