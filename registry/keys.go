package registry

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// MaxKeyLen is bcrypt's input limit; longer keys would be silently truncated
// by bcrypt, so they are refused instead.
const MaxKeyLen = 72

// KeyCheck says how a key check was decided, for metrics.
type KeyCheck int

const (
	// KeyBcrypt means bcrypt ran.
	KeyBcrypt KeyCheck = iota
	// KeyRemembered means the keyed hash of an earlier verified key matched.
	KeyRemembered
	// KeyShared means the check waited for a bcrypt of the same key that
	// another check had started.
	KeyShared
)

// hasher runs bcrypt on a bounded pool of workers. A flood of connects
// queues here instead of occupying every CPU.
type hasher struct {
	cost int
	sem  chan struct{}
	wait time.Duration

	compares atomic.Uint64 // bcrypt comparisons run, for tests
}

func newHasher(cost, workers int, wait time.Duration) *hasher {
	return &hasher{cost: cost, sem: make(chan struct{}, workers), wait: wait}
}

func (h *hasher) acquire(ctx context.Context) error {
	t := time.NewTimer(h.wait)
	defer t.Stop()
	select {
	case h.sem <- struct{}{}:
		return nil
	case <-t.C:
		return ErrBusy
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (h *hasher) hash(ctx context.Context, key string) ([]byte, error) {
	if err := h.acquire(ctx); err != nil {
		return nil, err
	}
	defer func() { <-h.sem }()
	b, err := bcrypt.GenerateFromPassword([]byte(key), h.cost)
	if err != nil {
		return nil, fmt.Errorf("hash key: %w", err)
	}
	return b, nil
}

func (h *hasher) compare(ctx context.Context, hash []byte, key string) error {
	if err := h.acquire(ctx); err != nil {
		return err
	}
	defer func() { <-h.sem }()
	h.compares.Add(1)
	err := bcrypt.CompareHashAndPassword(hash, []byte(key))
	if errors.Is(err, bcrypt.ErrMismatchedHashAndPassword) {
		return ErrForbidden
	}
	return err
}

// mac is the keyed hash under which a verified key is remembered. With a
// per-process random secret, a memory dump does not give an attacker a
// precomputable table, but it does let one test guesses at SHA-256 speed
// rather than bcrypt speed: that is the price of not paying bcrypt on every
// repeated connect (see docs/operations.md, "Keys and the remembered-key trade-off").
func mac(key string) (sum [sha256.Size]byte) {
	m := macPool.Get().(hash.Hash)
	m.Reset()
	io.WriteString(m, key)
	m.Sum(sum[:0])
	macPool.Put(m)
	return sum
}

// macPool keeps keyed hashers: hmac.New allocates its state each time, and
// every repeated connect and relay request computes one.
var macPool = sync.Pool{New: func() any { return hmac.New(sha256.New, secret) }}

// Gate admits a key check that is about to run bcrypt, the only kind that can
// fail: the router uses it to bound parallel guesses from one address. end
// is called once the check is decided, with failed set for a wrong key. A
// nil Gate admits everything.
type Gate func() (end func(failed bool), err error)

// flightKey names one bcrypt in flight: which hash it checks against and the
// MAC of the presented key. Concurrent checks of the same key share it.
type flightKey struct {
	host bool
	mac  [sha256.Size]byte
}

// flight is one bcrypt comparison that concurrent checks of the same key
// wait for; err is written before done is closed.
type flight struct {
	done chan struct{}
	err  error
}

// CheckKey verifies key against the registration's key. A key verified
// before is recognised by its MAC without bcrypt; concurrent checks of the
// same key share one bcrypt, so a fleet reconnecting to one registration
// costs one hash. gate, if not nil, admits a check that starts a bcrypt.
func (reg *Registration) CheckKey(ctx context.Context, key string, gate Gate) error {
	return reg.check(ctx, key, false, gate)
}

// CheckHostKey verifies hostKey against the registration's host key, as
// CheckKey does.
func (reg *Registration) CheckHostKey(ctx context.Context, hostKey string, gate Gate) error {
	return reg.check(ctx, hostKey, true, gate)
}

func (reg *Registration) check(ctx context.Context, key string, host bool, gate Gate) error {
	start := time.Now()
	fk := flightKey{host: host, mac: mac(key)}
	observe := reg.registry.cfg.OnKeyCheck
	memo, hash := &reg.keyMAC, reg.KeyHash
	if host {
		memo, hash = &reg.hostKeyMAC, reg.HostKeyHash
	}

	// A remembered key, or a bcrypt of the same key already running; else
	// this check starts one, registered before the gate is asked so that
	// concurrent checks of the key wait for it rather than ask too.
	reg.mu.Lock()
	known, f := *memo, reg.flights[fk]
	if known != nil && hmac.Equal(known, fk.mac[:]) {
		reg.mu.Unlock()
		if observe != nil {
			observe(KeyRemembered, time.Since(start))
		}
		return nil
	}
	if f != nil {
		reg.mu.Unlock()
		return reg.await(ctx, f, key, host, gate, start)
	}
	f = &flight{done: make(chan struct{})}
	if reg.flights == nil {
		reg.flights = make(map[flightKey]*flight)
	}
	reg.flights[fk] = f
	reg.mu.Unlock()

	var end func(failed bool)
	if gate != nil {
		var err error
		if end, err = gate(); err != nil {
			// Refused for this caller only: those waiting try again,
			// each through its own gate.
			reg.land(fk, f, errGateRefused, memo)
			return err
		}
	}

	// Once a worker is had, bcrypt runs to its end even if this caller
	// goes away. A caller that gives up waiting for a worker ends the
	// flight with its context's error; those waiting on it try again.
	err := reg.registry.hasher.compare(ctx, hash, key)
	if err != nil {
		err = fmt.Errorf("check key for %s: %w", reg.ID, err)
	}
	reg.land(fk, f, err, memo)
	if end != nil {
		end(errors.Is(err, ErrForbidden))
	}
	// Only a match or a mismatch is a decision: a check that gave up
	// waiting for a worker (ErrBusy) is not observed.
	if observe != nil && decided(err) {
		observe(KeyBcrypt, time.Since(start))
	}
	return err
}

// errGateRefused ends a flight whose starter was refused by its gate.
var errGateRefused = errors.New("gate refused the check that started the bcrypt")

// land ends flight f with err, remembering the key's MAC on success.
func (reg *Registration) land(fk flightKey, f *flight, err error, memo *[]byte) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	delete(reg.flights, fk)
	if err == nil {
		*memo = fk.mac[:]
	}
	f.err = err
	close(f.done)
}

// await waits for a bcrypt another check started, and checks again if that
// one gave up before it had a worker or was refused by its gate.
func (reg *Registration) await(ctx context.Context, f *flight, key string, host bool, gate Gate, start time.Time) error {
	select {
	case <-f.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	if errors.Is(f.err, context.Canceled) || errors.Is(f.err, context.DeadlineExceeded) || f.err == errGateRefused {
		return reg.check(ctx, key, host, gate)
	}
	if observe := reg.registry.cfg.OnKeyCheck; observe != nil && decided(f.err) {
		observe(KeyShared, time.Since(start))
	}
	return f.err
}

// CheckKeys verifies both keys for an administrative request (/remove) with
// the same work whichever is wrong: two bcrypt comparisons every time,
// remembered keys not consulted, and nothing remembered, so neither the
// time taken nor a later request tells which key was wrong. It passes gate
// once for each key (each may fail, so each needs room) and tells each end
// whether its key was wrong. It returns the number of wrong keys, and
// ErrForbidden wrapped when there is one.
func (reg *Registration) CheckKeys(ctx context.Context, key, hostKey string, gate Gate) (wrong int, err error) {
	ends := [2]func(bool){func(bool) {}, func(bool) {}}
	if gate != nil {
		for i := range ends {
			if ends[i], err = gate(); err != nil {
				if i > 0 {
					ends[0](false)
				}
				return 0, err
			}
		}
	}
	start := time.Now()
	errs := [2]error{
		reg.registry.hasher.compare(ctx, reg.KeyHash, key),
		reg.registry.hasher.compare(ctx, reg.HostKeyHash, hostKey),
	}
	for i, e := range errs {
		bad := errors.Is(e, ErrForbidden)
		if bad {
			wrong++
		}
		ends[i](bad)
	}
	if observe := reg.registry.cfg.OnKeyCheck; observe != nil && decided(errs[0]) && decided(errs[1]) {
		observe(KeyBcrypt, time.Since(start))
	}
	if err := errors.Join(errs[0], errs[1]); err != nil {
		return wrong, fmt.Errorf("check keys for %s: %w", reg.ID, err)
	}
	return 0, nil
}

// decided reports whether a comparison reached a verdict (rather than giving
// up waiting for a worker or for its context).
func decided(err error) bool { return err == nil || errors.Is(err, ErrForbidden) }
