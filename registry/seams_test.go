package registry

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"
)

// eventLog is an Observer that records events; safe for concurrent use.
type eventLog struct {
	mu  sync.Mutex
	evs []Event
}

func (l *eventLog) observe(ev Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.evs = append(l.evs, ev)
}

func (l *eventLog) kinds(reg *Registration) []EventKind {
	l.mu.Lock()
	defer l.mu.Unlock()
	var ks []EventKind
	for _, ev := range l.evs {
		if ev.Reg == reg {
			ks = append(ks, ev.Kind)
		}
	}
	return ks
}

func TestEventsInOrder(t *testing.T) {
	var log eventLog
	r := newTestRegistry(Config{Observers: []Observer{log.observe}, GCGrace: time.Hour})
	reg := mustCreate(t, r, "", HostClient)
	h, c := newMember("h"), newMember("c")
	mustJoin(t, reg, h, RoleHost)
	mustJoin(t, reg, c, RoleClient)
	reg.Leave(c, Closure{Code: 4008, Reason: "slow consumer"})
	if err := reg.Remove(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := []EventKind{EventCreate, EventJoin, EventJoin, EventLeave, EventRemove}
	if got := log.kinds(reg); !slices.Equal(got, want) {
		t.Fatalf("events: got %v, want %v", got, want)
	}
	log.mu.Lock()
	defer log.mu.Unlock()
	leave, remove := log.evs[3], log.evs[4]
	if leave.Member != c || leave.Role != RoleClient || leave.Closure != (Closure{4008, "slow consumer"}) {
		t.Errorf("leave event: got %v %v %v, want c, client, 4008 slow consumer", leave.Member, leave.Role, leave.Closure)
	}
	if remove.Cause != CauseAdmin || remove.Time.IsZero() {
		t.Errorf("remove event: got cause %v at %v, want admin with a time", remove.Cause, remove.Time)
	}
}

// TestEventsOrderedUnderConcurrency: many members join and leave at once;
// each member's join reaches the observer before its leave, and an observer
// may call back into the registry (it runs outside the locks).
func TestEventsOrderedUnderConcurrency(t *testing.T) {
	var mu sync.Mutex
	joined := map[Member]bool{}
	var bad []string
	var r *Registry
	observe := func(ev Event) {
		ev.Reg.Counts() // calling back in must not deadlock
		r.Len()
		mu.Lock()
		defer mu.Unlock()
		switch ev.Kind {
		case EventJoin:
			joined[ev.Member] = true
		case EventLeave:
			if !joined[ev.Member] {
				bad = append(bad, ev.Member.ID())
			}
		}
	}
	r = newTestRegistry(Config{Observers: []Observer{observe}, GCGrace: time.Hour})
	reg := mustCreate(t, r, "", Lobby)
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(func() {
			m := newMember("m")
			if err := reg.Join(m, RoleMember); err != nil {
				t.Error(err)
				return
			}
			reg.Leave(m, Closure{Code: 1000})
		})
	}
	wg.Wait()
	if len(bad) > 0 {
		t.Fatalf("leave before join for %v", bad)
	}
}

// failingStore fails every call while fail is set.
type failingStore struct {
	MemoryStore
	mu   sync.Mutex
	fail bool
}

var errDisk = errors.New("disk on fire")

func (s *failingStore) failing() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.fail
}

func (s *failingStore) Put(ctx context.Context, rec Record) error {
	if s.failing() {
		return errDisk
	}
	return s.MemoryStore.Put(ctx, rec)
}

func (s *failingStore) Delete(ctx context.Context, ref Ref) error {
	if s.failing() {
		return errDisk
	}
	return s.MemoryStore.Delete(ctx, ref)
}

func TestStoreWriteThrough(t *testing.T) {
	ctx := context.Background()
	store := &failingStore{}
	r := newTestRegistry(Config{Store: store, GCGrace: time.Hour})
	reg := mustCreate(t, r, "kept", Lobby)
	recs, _ := store.Load(ctx)
	if len(recs) != 1 || recs[0].ID != "kept" || recs[0].Generation != reg.Generation || len(recs[0].KeyHash) == 0 {
		t.Fatalf("stored after Create: got %+v, want the record of kept", recs)
	}

	// A store that fails: Create fails and leaves nothing; Remove fails
	// and leaves the registration live.
	store.mu.Lock()
	store.fail = true
	store.mu.Unlock()
	if _, err := r.Create(ctx, Spec{ID: "nope", Type: Lobby, Key: testKey, HostKey: testHostKey}); !errors.Is(err, errDisk) {
		t.Fatalf("Create with a failing store: got %v, want errDisk", err)
	}
	if _, err := r.Get("nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after a failed Create: got %v, want ErrNotFound", err)
	}
	if err := reg.Remove(ctx); !errors.Is(err, errDisk) {
		t.Fatalf("Remove with a failing store: got %v, want errDisk", err)
	}
	wantLive(t, r, reg)
	m := newMember("m")
	mustJoin(t, reg, m, RoleMember) // still joinable

	store.mu.Lock()
	store.fail = false
	store.mu.Unlock()
	if err := reg.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	if recs, _ := store.Load(ctx); len(recs) != 0 {
		t.Fatalf("stored after Remove: got %v, want none", recs)
	}

	// Shutdown keeps the records: they are what a restart restores.
	mustCreate(t, r, "survivor", Lobby)
	r.Close(1001, "server shutting down")
	if recs, _ := store.Load(ctx); len(recs) != 1 || recs[0].ID != "survivor" {
		t.Fatalf("stored after Close: got %v, want survivor's record", recs)
	}
}

func TestRestore(t *testing.T) {
	ctx := context.Background()
	store := &MemoryStore{}
	var log eventLog
	old := newTestRegistry(Config{Store: store})
	a := mustCreate(t, old, "a", HostClient)
	mustCreate(t, old, "b", Lobby)
	old.Close(1001, "server shutting down")

	recs, err := store.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	r := newTestRegistry(Config{Store: store, Observers: []Observer{log.observe}})
	if err := r.Restore(recs); err != nil {
		t.Fatal(err)
	}
	got, err := r.Get("a")
	if err != nil {
		t.Fatalf("restored a: %v", err)
	}
	if got.Generation != a.Generation || got.Type != HostClient || !got.Created.Equal(a.Created) {
		t.Fatalf("restored a: got %+v, want %+v", got.Record, a.Record)
	}
	if err := got.CheckKey(ctx, testKey, nil); err != nil {
		t.Fatalf("old key on the restored registration: %v", err)
	}
	if k := log.kinds(got); !slices.Equal(k, []EventKind{EventCreate}) {
		t.Fatalf("events of a restored registration: got %v, want a create", k)
	}
	// Restoring what is live is refused, the rest still restored.
	if err := r.Restore(recs); !errors.Is(err, ErrExists) {
		t.Fatalf("Restore of live ids: got %v, want ErrExists", err)
	}
}

// TestIDReuseByGeneration: a registration made again under an id has a new
// generation, and removing the old one (late) leaves the new one's record.
func TestIDReuseByGeneration(t *testing.T) {
	ctx := context.Background()
	store := &MemoryStore{}
	r := newTestRegistry(Config{Store: store})
	old := mustCreate(t, r, "z", Lobby)
	if err := old.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	newer := mustCreate(t, r, "z", Lobby)
	if newer.Generation == old.Generation || newer.Generation == 0 {
		t.Fatalf("generations: old %d, new %d; want different, non-zero", old.Generation, newer.Generation)
	}
	store.Delete(ctx, old.Ref()) // a late delete of the old one
	if recs, _ := store.Load(ctx); len(recs) != 1 || recs[0].Generation != newer.Generation {
		t.Fatalf("stored: got %v, want the newer record", recs)
	}
}

func TestSendTo(t *testing.T) {
	r := newTestRegistry(Config{GCGrace: time.Hour})
	reg := mustCreate(t, r, "", HostClient)
	h, c1, c2 := newMember("h"), newMember("c1"), newMember("c2")
	mustJoin(t, reg, h, RoleHost)
	mustJoin(t, reg, c1, RoleClient)
	mustJoin(t, reg, c2, RoleClient)
	msg := Message{Data: []byte("x")}
	tests := []struct {
		name string
		sel  Selector
		want []*fakeMember
	}{
		{"all", Selector{}, []*fakeMember{h, c1, c2}},
		{"hosts", Selector{Role: RoleHost}, []*fakeMember{h}},
		{"clients", Selector{Role: RoleClient}, []*fakeMember{c1, c2}},
		{"one by id", Selector{ID: c2.ID()}, []*fakeMember{c2}},
		{"unknown id", Selector{ID: "nobody"}, nil},
	}
	for _, tt := range tests {
		before := map[*fakeMember]int{}
		for _, m := range []*fakeMember{h, c1, c2} {
			before[m] = len(m.messages())
		}
		if n := reg.SendTo(tt.sel, msg); n != len(tt.want) {
			t.Errorf("%s: got %d receivers, want %d", tt.name, n, len(tt.want))
		}
		for _, m := range []*fakeMember{h, c1, c2} {
			got := len(m.messages()) - before[m]
			want := 0
			if slices.Contains(tt.want, m) {
				want = 1
			}
			if got != want {
				t.Errorf("%s: %s got %d messages, want %d", tt.name, m, got, want)
			}
		}
	}
	if m, role, ok := reg.Member(c1.ID()); !ok || m != c1 || role != RoleClient {
		t.Errorf("Member(c1): got %v %v %v", m, role, ok)
	}
}

// countingBroker counts what passes through it, then delivers locally.
type countingBroker struct {
	LocalBroker
	mu       sync.Mutex
	n        int
	attached int // Attach calls less Detach calls
}

func (b *countingBroker) Attach(*Registration) error {
	b.mu.Lock()
	b.attached++
	b.mu.Unlock()
	return nil
}

func (b *countingBroker) Detach(*Registration) {
	b.mu.Lock()
	b.attached--
	b.mu.Unlock()
}

func (b *countingBroker) Publish(reg *Registration, from Member, role Role, msg Message) int {
	b.mu.Lock()
	b.n++
	b.mu.Unlock()
	return LocalBroker{}.Publish(reg, from, role, msg)
}

func TestPublishGoesThroughBroker(t *testing.T) {
	b := &countingBroker{}
	r := newTestRegistry(Config{Broker: b, GCGrace: time.Hour})
	reg := mustCreate(t, r, "", Lobby)
	x, y := newMember("x"), newMember("y")
	mustJoin(t, reg, x, RoleMember)
	mustJoin(t, reg, y, RoleMember)
	if n := reg.Publish(x, RoleMember, Message{Data: []byte("hi")}); n != 1 {
		t.Fatalf("Publish: got %d receivers, want 1", n)
	}
	if b.n != 1 || len(y.messages()) != 1 || len(x.messages()) != 0 {
		t.Fatalf("broker saw %d, y got %d, x got %d; want 1, 1, 0", b.n, len(y.messages()), len(x.messages()))
	}
}

// TestAttachBalances: every member that joined is attached once and
// detached once, however it goes: leaving, being replaced, a refused join,
// the registration's removal.
func TestAttachBalances(t *testing.T) {
	b := &countingBroker{}
	r := newTestRegistry(Config{Broker: b, GCGrace: time.Hour, MaxMembers: 2})
	reg := mustCreate(t, r, "", HostClient)
	attached := func(want int) {
		t.Helper()
		b.mu.Lock()
		defer b.mu.Unlock()
		if b.attached != want {
			t.Fatalf("attached: got %d, want %d", b.attached, want)
		}
	}
	h1, h2, c1, c2 := newMember("h1"), newMember("h2"), newMember("c1"), newMember("c2")
	if err := reg.JoinNamed(h1, RoleHost, "dev"); err != nil {
		t.Fatal(err)
	}
	mustJoin(t, reg, c1, RoleClient)
	attached(2)
	if err := reg.Join(c2, RoleClient); !errors.Is(err, ErrTooManyMembers) {
		t.Fatalf("third member: got %v, want ErrTooManyMembers", err)
	}
	attached(2)
	if err := reg.JoinNamed(h2, RoleHost, "dev"); err != nil { // replaces h1
		t.Fatal(err)
	}
	attached(2)
	reg.Leave(c1, Closure{Code: 1000})
	reg.Leave(c1, Closure{Code: 1000}) // twice is once
	attached(1)
	if err := reg.Remove(context.Background()); err != nil {
		t.Fatal(err)
	}
	attached(0)
}

func TestNames(t *testing.T) {
	var log eventLog
	r := newTestRegistry(Config{GCGrace: time.Hour, MaxMembers: 2, Observers: []Observer{log.observe}})
	reg := mustCreate(t, r, "", HostClient)
	dev1, dev2, cli := newMember("dev1"), newMember("dev2"), newMember("cli")
	if err := reg.JoinNamed(dev1, RoleHost, "garage"); err != nil {
		t.Fatal(err)
	}
	if err := reg.JoinNamed(cli, RoleClient, "garage"); !errors.Is(err, ErrNameTaken) {
		t.Fatalf("a client taking a host's name: got %v, want ErrNameTaken", err)
	}
	mustJoin(t, reg, cli, RoleClient) // the room is now full (2)
	// The same role and name replaces, even in a full room.
	if err := reg.JoinNamed(dev2, RoleHost, "garage"); err != nil {
		t.Fatalf("replacing: %v", err)
	}
	if got := dev1.closeCalls(); len(got) != 1 || got[0] != (closeCall{CodeReplaced, "replaced"}) {
		t.Fatalf("the replaced member: got closes %v, want 4001 replaced", got)
	}
	if m, role, ok := reg.Lookup(Selector{Name: "garage"}); !ok || m != dev2 || role != RoleHost {
		t.Fatalf("Lookup(garage): got %v %v %v, want dev2 as host", m, role, ok)
	}
	// The replaced one receives nothing more, and its late leave changes
	// nothing.
	reg.Deliver(cli, RoleClient, Message{Data: []byte("to the host")})
	if len(dev1.messages()) != 0 || len(dev2.messages()) != 1 {
		t.Fatalf("after replacement: dev1 got %d, dev2 got %d; want 0 and 1", len(dev1.messages()), len(dev2.messages()))
	}
	reg.Leave(dev1, Closure{Code: CodeReplaced})
	if _, _, ok := reg.Lookup(Selector{Name: "garage"}); !ok {
		t.Fatal("the replaced member's late leave freed the name")
	}
	infos := reg.Members()
	if len(infos) != 2 {
		t.Fatalf("Members: got %d, want 2", len(infos))
	}
	// Leaving frees the name for anyone.
	reg.Leave(dev2, Closure{Code: 1000})
	if err := reg.JoinNamed(newMember("c2"), RoleClient, "garage"); err != nil {
		t.Fatalf("a free name: %v", err)
	}
	var leaves []string
	log.mu.Lock()
	for _, ev := range log.evs {
		if ev.Kind == EventLeave {
			leaves = append(leaves, fmt.Sprintf("%s:%d", ev.Name, ev.Closure.Code))
		}
	}
	log.mu.Unlock()
	if want := []string{"garage:4001", "garage:1000"}; !slices.Equal(leaves, want) {
		t.Fatalf("leave events: got %v, want %v", leaves, want)
	}
}

// blockingStore blocks Delete until release is closed, then fails it if
// fail is set.
type blockingStore struct {
	MemoryStore
	entered chan struct{}
	release chan struct{}
	fail    bool
}

func (s *blockingStore) Delete(ctx context.Context, ref Ref) error {
	s.entered <- struct{}{}
	<-s.release
	if s.fail {
		return errDisk
	}
	return s.MemoryStore.Delete(ctx, ref)
}

// TestRemovalInFlight: while one removal waits for the store, a second
// removal waits for it and shares its outcome, and a join is refused with
// ErrRemoving (not ErrNotFound: the removal may fail).
func TestRemovalInFlight(t *testing.T) {
	for _, fail := range []bool{false, true} {
		t.Run(fmt.Sprint("store fails ", fail), func(t *testing.T) {
			store := &blockingStore{entered: make(chan struct{}, 2), release: make(chan struct{}), fail: fail}
			var storeErrs []string
			var mu sync.Mutex
			r := newTestRegistry(Config{Store: store, OnStoreError: func(op, id string, err error) {
				mu.Lock()
				storeErrs = append(storeErrs, op+" "+id)
				mu.Unlock()
			}})
			reg := mustCreate(t, r, "x", Lobby)
			first := make(chan error, 1)
			go func() { first <- reg.Remove(context.Background()) }()
			<-store.entered
			second := make(chan error, 1)
			go func() { second <- reg.Remove(context.Background()) }()
			if err := reg.Join(newMember("late"), RoleMember); !errors.Is(err, ErrRemoving) {
				t.Fatalf("join during the removal: got %v, want ErrRemoving", err)
			}
			select {
			case err := <-second:
				t.Fatalf("the second removal returned %v before the first was durable", err)
			default:
			}
			close(store.release)
			for _, ch := range []chan error{first, second} {
				err := <-ch
				if fail != errors.Is(err, ErrStore) {
					t.Fatalf("removal: got %v, want ErrStore %v", err, fail)
				}
			}
			if fail {
				wantLive(t, r, reg)
				mustJoin(t, reg, newMember("m"), RoleMember) // joinable again
			} else {
				wantGone(t, r, reg)
			}
		})
	}
}

// TestRemovalDuringClose: a removal whose delete fails after the registry
// closed leaves no timer behind and reports ErrClosed, not a store error.
func TestRemovalDuringClose(t *testing.T) {
	store := &blockingStore{entered: make(chan struct{}, 1), release: make(chan struct{}), fail: true}
	r := newTestRegistry(Config{Store: store})
	reg := mustCreate(t, r, "x", Lobby)
	done := make(chan error, 1)
	go func() { done <- reg.Remove(context.Background()) }()
	<-store.entered
	r.Close(1001, "server shutting down")
	close(store.release)
	if err := <-done; !errors.Is(err, ErrClosed) || errors.Is(err, ErrStore) {
		t.Fatalf("removal during Close: got %v, want ErrClosed", err)
	}
	reg.mu.Lock()
	armed := reg.timer != nil
	reg.mu.Unlock()
	if armed {
		t.Fatal("a timer is armed on a registration the registry closed")
	}
}
