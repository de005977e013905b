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
)

// hasher runs bcrypt on a bounded pool of workers. A flood of connects
// queues here instead of occupying every CPU.
type hasher struct {
	cost int
	sem  chan struct{}
	wait time.Duration
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
// repeated connect (see the README).
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

// check verifies key against hash, remembering the key's MAC in *memo
// (guarded by reg.mu) once bcrypt has accepted it. A registration has exactly
// one valid key and one valid host key, so the memo is one value each and
// cannot grow. A wrong key always pays bcrypt.
func (reg *Registration) check(ctx context.Context, key string, hash []byte, memo *[]byte) error {
	start := time.Now()
	m := mac(key)
	reg.mu.Lock()
	known := *memo
	reg.mu.Unlock()
	observe := reg.registry.cfg.OnKeyCheck
	if known != nil && hmac.Equal(known, m[:]) {
		if observe != nil {
			observe(KeyRemembered, time.Since(start))
		}
		return nil
	}
	err := reg.registry.hasher.compare(ctx, hash, key)
	// Only a match or a mismatch is a decision: a check that gave up
	// waiting for a worker (ErrBusy) or whose context ended is not observed.
	if observe != nil && (err == nil || errors.Is(err, ErrForbidden)) {
		observe(KeyBcrypt, time.Since(start))
	}
	if err != nil {
		return fmt.Errorf("check key for %s: %w", reg.ID, err)
	}
	reg.mu.Lock()
	*memo = m[:]
	reg.mu.Unlock()
	return nil
}
