package registry

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

const (
	testKey     = "s3cret-key"
	testHostKey = "h0st-key"
)

// closeCall is one call of fakeMember.Close.
type closeCall struct {
	code   int
	reason string
}

// fakeMember records what the registry does to it. It is safe for concurrent
// use.
type fakeMember struct {
	name string

	mu     sync.Mutex
	msgs   []Message   // guarded by mu
	closes []closeCall // guarded by mu
}

func newMember(name string) *fakeMember { return &fakeMember{name: name} }

// ID implements Member: unique per fakeMember, whatever its name.
func (m *fakeMember) ID() string { return fmt.Sprintf("%s@%p", m.name, m) }

func (m *fakeMember) Send(msg Message) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.msgs = append(m.msgs, msg)
}

func (m *fakeMember) Close(code int, reason string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closes = append(m.closes, closeCall{code, reason})
}

func (m *fakeMember) String() string { return m.name }

func (m *fakeMember) messages() []Message {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.msgs)
}

func (m *fakeMember) closeCalls() []closeCall {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.closes)
}

// removal is one remove event.
type removal struct {
	reg   *Registration
	cause Cause
}

// removals records remove events; safe for concurrent use.
type removals struct {
	mu   sync.Mutex
	list []removal
}

// observe is an Observer that records the remove events.
func (rs *removals) observe(ev Event) {
	if ev.Kind != EventRemove {
		return
	}
	rs.mu.Lock()
	defer rs.mu.Unlock()
	rs.list = append(rs.list, removal{ev.Reg, ev.Cause})
}

func (rs *removals) get() []removal {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return slices.Clone(rs.list)
}

// keyChecks records OnKeyCheck calls; safe for concurrent use.
type keyChecks struct {
	mu   sync.Mutex
	hows []KeyCheck
	durs []time.Duration
}

func (kc *keyChecks) record(how KeyCheck, d time.Duration) {
	kc.mu.Lock()
	defer kc.mu.Unlock()
	kc.hows = append(kc.hows, how)
	kc.durs = append(kc.durs, d)
}

func (kc *keyChecks) get() ([]KeyCheck, []time.Duration) {
	kc.mu.Lock()
	defer kc.mu.Unlock()
	return slices.Clone(kc.hows), slices.Clone(kc.durs)
}

// newTestRegistry returns a registry with the cheapest bcrypt cost unless cfg
// sets one.
func newTestRegistry(cfg Config) *Registry {
	if cfg.BcryptCost == 0 {
		cfg.BcryptCost = bcrypt.MinCost
	}
	return New(cfg)
}

func mustCreate(t *testing.T, r *Registry, idReq string, typ Type) *Registration {
	t.Helper()
	reg, err := r.Create(context.Background(), Spec{ID: idReq, Type: typ, Key: testKey, HostKey: testHostKey})
	if err != nil {
		t.Fatalf("Create(%q, %v): got error %v, want nil", idReq, typ, err)
	}
	return reg
}

func mustJoin(t *testing.T, reg *Registration, m Member, role Role) {
	t.Helper()
	if err := reg.Join(m, role); err != nil {
		t.Fatalf("Join(%v, %v): got error %v, want nil", m, role, err)
	}
}

// wantLive fails unless id names exactly reg in r.
func wantLive(t *testing.T, r *Registry, reg *Registration) {
	t.Helper()
	got, err := r.Get(reg.ID)
	if err != nil {
		t.Fatalf("Get(%q): got error %v, want the registration", reg.ID, err)
	}
	if got != reg {
		t.Fatalf("Get(%q): got %p, want %p", reg.ID, got, reg)
	}
	if reg.Removed() {
		t.Fatalf("Removed() of %q: got true, want false", reg.ID)
	}
}

// wantGone fails unless id names no registration in r and reg is removed.
func wantGone(t *testing.T, r *Registry, reg *Registration) {
	t.Helper()
	if got, err := r.Get(reg.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get(%q): got (%p, %v), want ErrNotFound", reg.ID, got, err)
	}
	if !reg.Removed() {
		t.Fatalf("Removed() of %q: got false, want true", reg.ID)
	}
}

// wantRemovals compares remove events with the wanted registrations and
// causes, in order.
func wantRemovals(t *testing.T, rs *removals, want ...removal) {
	t.Helper()
	got := rs.get()
	if len(got) != len(want) {
		t.Fatalf("remove events: got %d %v, want %d %v", len(got), got, len(want), want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("remove event %d: got (%p, %v), want (%p, %v)",
				i, got[i].reg, got[i].cause, want[i].reg, want[i].cause)
		}
	}
}

// wantCloses compares a member's Close calls.
func wantCloses(t *testing.T, m *fakeMember, want ...closeCall) {
	t.Helper()
	got := m.closeCalls()
	if !slices.Equal(got, want) {
		t.Fatalf("Close calls of %s: got %v, want %v", m, got, want)
	}
}

// wantCounts compares a registration's Counts.
func wantCounts(t *testing.T, reg *Registration, hosts, clients, members int) {
	t.Helper()
	h, c, m := reg.Counts()
	if h != hosts || c != clients || m != members {
		t.Fatalf("Counts(): got (%d, %d, %d), want (%d, %d, %d)", h, c, m, hosts, clients, members)
	}
}

var removedClose = closeCall{4000, "registration removed"}
