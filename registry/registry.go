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
	// ErrTooManyMembers means the registration is at MaxMembers.
	ErrTooManyMembers = errors.New("too many members")
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
	// OnRemove, if set, is called (outside any lock) after a registration
	// is removed, with the cause.
	OnRemove func(reg *Registration, cause Cause)
	// OnKeyCheck, if set, observes each key check that reached a decision:
	// how it was decided and how long it took, waiting for a worker included.
	OnKeyCheck func(how KeyCheck, d time.Duration)
}

// Registry holds the live registrations of one node.
type Registry struct {
	cfg    Config
	hasher *hasher

	mu     sync.RWMutex
	regs   map[string]*Registration // guarded by mu
	closed bool                     // guarded by mu
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
	return &Registry{
		cfg:    cfg,
		hasher: newHasher(cfg.BcryptCost, cfg.HashWorkers, cfg.HashWait),
		regs:   make(map[string]*Registration),
	}
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

// Create hashes the keys and adds a registration. An empty idReq mints a
// random id. Errors: ErrExists, ErrTooManyRegistrations, ErrBusy, ErrClosed.
func (r *Registry) Create(ctx context.Context, idReq string, typ Type, key, hostKey string) (*Registration, error) {
	if err := r.admit(idReq); err != nil {
		return nil, err
	}
	// Hash outside every lock: bcrypt takes tens of milliseconds.
	keyHash, err := r.hasher.hash(ctx, key)
	if err != nil {
		return nil, err
	}
	hostKeyHash, err := r.hasher.hash(ctx, hostKey)
	if err != nil {
		return nil, err
	}

	reg := &Registration{
		ID:          idReq,
		Type:        typ,
		Created:     time.Now(),
		registry:    r,
		keyHash:     keyHash,
		hostKeyHash: hostKeyHash,
		members:     make(map[Member]Role),
	}
	reg.snap.Store(&emptySnapshot)
	reg.lastActive.Store(reg.Created.UnixNano())

	r.mu.Lock()
	if err := r.admitLocked(idReq); err != nil {
		r.mu.Unlock()
		return nil, err
	}
	if reg.ID == "" {
		for {
			reg.ID = NewID()
			if _, taken := r.regs[reg.ID]; !taken {
				break
			}
		}
	}
	r.regs[reg.ID] = reg
	r.mu.Unlock()

	if r.cfg.UnusedTTL > 0 {
		reg.mu.Lock()
		// reg is already visible: someone may have joined (and left, arming
		// the GC timer) or removed it since r.mu was released. Arming now
		// would replace that GC timer with one that never fires for a
		// joined registration, leaving it and its id alive forever.
		if !reg.joined && !reg.removed {
			reg.armTimerLocked(r.cfg.UnusedTTL, CauseUnused)
		}
		reg.mu.Unlock()
	}
	return reg, nil
}

// admit is a cheap early check so a doomed Create does not pay for bcrypt.
func (r *Registry) admit(idReq string) error {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.admitLocked(idReq)
}

func (r *Registry) admitLocked(idReq string) error {
	if r.closed {
		return ErrClosed
	}
	if idReq != "" {
		if _, taken := r.regs[idReq]; taken {
			return fmt.Errorf("create %s: %w", idReq, ErrExists)
		}
	}
	if r.cfg.MaxRegistrations > 0 && len(r.regs) >= r.cfg.MaxRegistrations {
		return ErrTooManyRegistrations
	}
	return nil
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

// Close refuses new registrations and joins from now on and removes every
// registration, closing its members with code and reason (1001 when the
// server shuts down).
func (r *Registry) Close(code int, reason string) {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	r.Each(func(reg *Registration) {
		reg.remove(CauseShutdown, code, reason)
	})
}

// forget deletes reg from the map if it is still the registration under its
// id: a newer registration reusing the id must never be touched.
func (r *Registry) forget(reg *Registration, cause Cause) {
	r.mu.Lock()
	if r.regs[reg.ID] == reg {
		delete(r.regs, reg.ID)
	}
	r.mu.Unlock()
	if r.cfg.OnRemove != nil {
		r.cfg.OnRemove(reg, cause)
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
