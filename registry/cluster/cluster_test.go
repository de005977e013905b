package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"wsrouter/registry"
	"wsrouter/registry/cluster/clustertest"
	"wsrouter/registry/storetest"
)

const testTimeout = 20 * time.Second

var bucketSeq atomic.Int64

// dial connects a node to a fresh cluster name, or to name if given.
func dial(t *testing.T, ns *clustertest.NATS, name string) *Node {
	t.Helper()
	if name == "" {
		name = fmt.Sprint("t", bucketSeq.Add(1))
	}
	n, err := Dial(context.Background(), Config{
		URLs: ns.URL(), Name: name, OpTimeout: 2 * time.Second,
		Heartbeat: 300 * time.Millisecond, DeadAfter: 2 * time.Second,
		Log: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// TestStore: the bucket passes the store conformance suite.
func TestStore(t *testing.T) {
	ns := clustertest.Start(t)
	storetest.Run(t, func(t *testing.T) registry.Store { return dial(t, ns, "") })
}

// TestSecret: of two nodes making the token key at once, both end with the
// one kept first.
func TestSecret(t *testing.T) {
	ns := clustertest.Start(t)
	a := dial(t, ns, "")
	b := dial(t, ns, a.cfg.Name)
	var wg sync.WaitGroup
	got := make([][]byte, 2)
	for i, n := range []*Node{a, b} {
		wg.Go(func() {
			v, err := n.Secret("token_key", func() ([]byte, error) { return []byte(fmt.Sprint("made by ", i)), nil })
			if err != nil {
				t.Error(err)
			}
			got[i] = v
		})
	}
	wg.Wait()
	if string(got[0]) != string(got[1]) || len(got[0]) == 0 {
		t.Fatalf("two nodes' secrets: %q and %q, want one", got[0], got[1])
	}
}

// member is a registry.Member that records what it gets.
type member struct {
	id     string
	msgs   chan registry.Message
	closed chan int
}

func newMember(id string) *member {
	return &member{id: id, msgs: make(chan registry.Message, 4096), closed: make(chan int, 1)}
}

func (m *member) ID() string                { return m.id }
func (m *member) Send(msg registry.Message) { m.msgs <- msg }
func (m *member) Close(code int, _ string) {
	select {
	case m.closed <- code:
	default:
	}
}

// node is a registry on a cluster node, with its removals.
type node struct {
	*Node
	r       *registry.Registry
	removed chan registry.Cause
}

func startNodes(t *testing.T, ns *clustertest.NATS, count int, grace time.Duration) []*node {
	t.Helper()
	name := fmt.Sprint("t", bucketSeq.Add(1))
	out := make([]*node, count)
	for i := range out {
		cn := &node{Node: dial(t, ns, name), removed: make(chan registry.Cause, 100)}
		cn.r = registry.New(registry.Config{
			BcryptCost: 4, GCGrace: grace, Store: cn.Node, Broker: cn.Node,
			Observers: []registry.Observer{func(ev registry.Event) {
				if ev.Kind == registry.EventRemove {
					cn.removed <- ev.Cause
				}
			}},
		})
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		if err := cn.Start(ctx, cn.r); err != nil {
			t.Fatal(err)
		}
		cancel()
		out[i] = cn
	}
	return out
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for wait := 5 * time.Millisecond; !cond(); wait = min(2*wait, 100*time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(wait)
	}
}

// createOnTwo makes a lobby on the first node and returns it as the first
// and the second node hold it.
func createOnTwo(t *testing.T, n []*node) (*registry.Registration, *registry.Registration) {
	t.Helper()
	reg, err := n[0].r.Create(context.Background(), registry.Spec{Type: registry.Lobby, Key: "k", HostKey: "h"})
	if err != nil {
		t.Fatal(err)
	}
	return reg, get(t, n[1], reg.ID)
}

func get(t *testing.T, n *node, id string) *registry.Registration {
	t.Helper()
	var reg *registry.Registration
	waitUntil(t, "registration "+id, func() bool {
		var err error
		reg, err = n.r.Get(id)
		return err == nil
	})
	return reg
}

// TestDeadNodeStopsCounting: a node that dies without a word (its
// connection cut, its keys left behind) stops keeping a registration alive
// within DeadAfter; the survivor then collects it, once.
func TestDeadNodeStopsCounting(t *testing.T) {
	ns := clustertest.Start(t)
	n := startNodes(t, ns, 2, 200*time.Millisecond)
	reg, regB := createOnTwo(t, n)
	a, b := newMember("a"), newMember("b")
	if err := reg.Join(a, registry.RoleMember); err != nil {
		t.Fatal(err)
	}
	if err := regB.Join(b, registry.RoleMember); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "A to see B's member", func() bool { return n[0].Elsewhere(reg.ID) })
	reg.Leave(a, registry.Closure{Code: 1000})
	waitUntil(t, "A's collection to defer to B", func() bool { return n[0].Deferred() > 0 })
	if reg.Removed() {
		t.Fatal("removed while B has a member")
	}

	// B dies: no goodbye, its heartbeat and presence keys stay.
	died := time.Now()
	n[1].cancel()
	n[1].nc.Close()
	select {
	case c := <-n[0].removed:
		if c != registry.CauseGC {
			t.Fatalf("removed with %v, want gc", c)
		}
	case <-time.After(testTimeout):
		t.Fatal("a dead node's member kept the registration alive")
	}
	if d := time.Since(died); d > 15*time.Second {
		t.Fatalf("removed %v after the node died, want within 15 s", d)
	}
}

// TestIdleDeleteRefusesAJoinElsewhere: a garbage collection decided before
// a join on another node was seen cannot remove the registration.
func TestIdleDeleteRefusesAJoinElsewhere(t *testing.T) {
	ns := clustertest.Start(t)
	n := startNodes(t, ns, 2, time.Hour)
	reg, regB := createOnTwo(t, n)
	// A looks at the record's revision, then B's member joins (its
	// presence, then the touch); A's watch may not have seen either when
	// A deletes: the delete, conditional on the revision A saw, fails.
	n[0].mu.Lock()
	seen := n[0].recs[reg.ID]
	n[0].mu.Unlock()
	if err := regB.Join(newMember("b"), registry.RoleMember); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	if err := n[0].kv.Delete(ctx, recKey(reg.ID), jetstream.LastRevision(seen.rev)); err == nil {
		t.Fatal("a delete at the revision seen before B's join went through")
	}
	if err := n[0].DeleteIdle(ctx, reg.Ref()); !errors.Is(err, registry.ErrInUse) {
		t.Fatalf("DeleteIdle with a member on B: %v, want ErrInUse", err)
	}
}

// TestJoinAfterRemovalElsewhere: a join on a node whose watch has not yet
// seen a removal made on another node is refused (not found), at once.
func TestJoinAfterRemovalElsewhere(t *testing.T) {
	ns := clustertest.Start(t)
	n := startNodes(t, ns, 2, time.Hour)
	reg, regB := createOnTwo(t, n)
	n[1].applyMu.Lock() // B's watch applies nothing for now
	if err := reg.Remove(context.Background()); err != nil {
		n[1].applyMu.Unlock()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- regB.Join(newMember("late"), registry.RoleMember) }()
	var err error
	select {
	case err = <-done:
	case <-time.After(testTimeout):
		t.Fatal("the join hangs")
	}
	n[1].applyMu.Unlock()
	if !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("join after the removal elsewhere: %v, want ErrNotFound", err)
	}
	// And the registration goes on B once its watch catches up.
	if c := <-n[1].removed; c != registry.CauseRemote {
		t.Fatalf("removed on B with %v, want remote", c)
	}
}

// TestPresenceReasserted: a node whose presence key another node deleted
// (taking it for dead while it was only slow) writes it again while it has
// members.
func TestPresenceReasserted(t *testing.T) {
	ns := clustertest.Start(t)
	n := startNodes(t, ns, 2, time.Hour)
	reg, regB := createOnTwo(t, n)
	if err := regB.Join(newMember("b"), registry.RoleMember); err != nil {
		t.Fatal(err)
	}
	if !n[0].Elsewhere(reg.ID) {
		t.Fatal("A does not know of B's member after B's join")
	}
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	key := "p." + enc(reg.ID) + "." + n[1].id
	if err := n[0].kv.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "B's presence written again", func() bool {
		e, err := n[0].kv.Get(ctx, key)
		return err == nil && e.Operation() == jetstream.KeyValuePut
	})
	waitUntil(t, "A to count B again", func() bool { return n[0].Elsewhere(reg.ID) })
}

// TestCatchUpKeepsNewerState: a catch-up after a reconnect forgets what the
// bucket no longer has, but not what is newer than the bucket it read: a
// node's direct word of its presence, told while the catch-up ran, and the
// tombstones of removals.
func TestCatchUpKeepsNewerState(t *testing.T) {
	ns := clustertest.Start(t)
	n := startNodes(t, ns, 1, time.Hour)[0]
	const maxRev = 100
	n.setPresence("fresh", "peer", true, maxRev+5) // told directly, after the pass began
	n.setPresence("old", "peer", true, maxRev-5)   // gone from the bucket since
	n.mu.Lock()
	n.recs["removed"] = recEntry{rev: maxRev - 1, deleted: time.Now()}
	n.mu.Unlock()
	pass := &firstPass{recs: map[string]bool{}, presence: map[string]map[string]struct{}{}, own: map[string]bool{}, maxRev: maxRev}
	n.caughtUp(pass, true)
	if !n.Elsewhere("fresh") {
		t.Error("the presence told after the pass began was forgotten")
	}
	if n.Elsewhere("old") {
		t.Error("the presence the bucket no longer has is still counted")
	}
	n.mu.Lock()
	e, ok := n.recs["removed"]
	n.mu.Unlock()
	if !ok || e.deleted.IsZero() {
		t.Error("the tombstone was forgotten by the catch-up")
	}
}

// TestDeadNodeDefaultTimes: with the default heartbeat and dead time, on
// the real clock, a node that dies without a word stops counting within
// 15 s (docs/protocol.md §15.2).
func TestDeadNodeDefaultTimes(t *testing.T) {
	if testing.Short() {
		t.Skip("takes 15 s")
	}
	ns := clustertest.Start(t)
	name := fmt.Sprint("t", bucketSeq.Add(1))
	var nodes []*node
	for range 2 {
		nd, err := Dial(context.Background(), Config{URLs: ns.URL(), Name: name, Log: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nd.Close() })
		cn := &node{Node: nd, removed: make(chan registry.Cause, 10)}
		cn.r = registry.New(registry.Config{BcryptCost: 4, GCGrace: time.Hour, Store: nd, Broker: nd})
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		if err := nd.Start(ctx, cn.r); err != nil {
			t.Fatal(err)
		}
		cancel()
		nodes = append(nodes, cn)
	}
	_, regB := createOnTwo(t, nodes)
	if err := regB.Join(newMember("b"), registry.RoleMember); err != nil {
		t.Fatal(err)
	}
	if !nodes[0].Elsewhere(regB.ID) {
		t.Fatal("A does not count B's member")
	}
	died := time.Now()
	nodes[1].cancel()
	nodes[1].nc.Close()
	deadline := died.Add(30 * time.Second)
	for nodes[0].Elsewhere(regB.ID) {
		if time.Now().After(deadline) {
			t.Fatal("a dead node's member still counts after 30 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	took := time.Since(died)
	t.Logf("stopped counting %v after the node died", took.Round(100*time.Millisecond))
	// 12 s of silence, checked every second: 13 s, and 2 s for a loaded
	// machine's timers.
	if took > 15*time.Second {
		t.Fatalf("stopped counting after %v, want within 15 s", took)
	}
}
