package registry

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"testing"
)

func TestValidSubjects(t *testing.T) {
	long := strings.Repeat("a", MaxEventLen)
	for _, c := range []struct {
		s              string
		event, pattern bool
	}{
		{"sensors", true, true},
		{"sensors.kitchen.temp", true, true},
		{"a-b_C.9", true, true},
		{long, true, true},
		{long + "a", false, false},
		{"", false, false},
		{".", false, false},
		{"a.", false, false},
		{".a", false, false},
		{"a..b", false, false},
		{"a b", false, false},
		{"a/b", false, false},
		{"é", false, false},
		{"*", false, true},
		{">", false, true},
		{"sensors.*.temp", false, true},
		{"sensors.>", false, true},
		{"*.>", false, true},
		{"a.>.b", false, false},
		{">.a", false, false},
		{"a*", false, false},
		{"a.b*", false, false},
		{"a.>>", false, false},
		{"a.**", false, false},
	} {
		if got := ValidEvent(c.s); got != c.event {
			t.Errorf("ValidEvent(%q) = %v, want %v", c.s, got, c.event)
		}
		if got := ValidPattern(c.s); got != c.pattern {
			t.Errorf("ValidPattern(%q) = %v, want %v", c.s, got, c.pattern)
		}
	}
}

// TestMatch is the routing table: who hears which event.
func TestMatch(t *testing.T) {
	a, b, c, d := newMember("a"), newMember("b"), newMember("c"), newMember("d")
	subs := []struct {
		m       *fakeMember
		pattern string
	}{
		{a, "sensors.kitchen.temp"},
		{a, "sensors.*.temp"}, // overlaps a's literal: still one delivery
		{a, "sensors.>"},      // and again
		{b, "sensors.*.temp"},
		{b, "sensors.*.*"},
		{c, "sensors.>"},
		{c, ">"},
		{d, "*"},
		{d, "alerts"},
		{d, "*.humid"},
	}
	var trie *subNode
	for _, s := range subs {
		trie = trie.orEmpty().with(tokens(s.pattern), s.m)
	}
	names := func(ms []Member) []string {
		var out []string
		for _, m := range ms {
			out = append(out, m.(*fakeMember).name)
		}
		slices.Sort(out)
		return out
	}
	for _, c := range []struct {
		event string
		want  []string
	}{
		{"sensors.kitchen.temp", []string{"a", "b", "c"}},
		{"sensors.garage.temp", []string{"a", "b", "c"}},
		{"sensors.garage.humid", []string{"a", "b", "c"}},
		{"sensors.garage", []string{"a", "c"}}, // sensors.> takes one token or more
		{"sensors", []string{"c", "d"}},        // ">" and "*": one token
		{"sensors.a.b.c", []string{"a", "c"}},
		{"alerts", []string{"c", "d"}},
		{"alerts.fire", []string{"c"}},
		{"kitchen.humid", []string{"c", "d"}},
		{"other", []string{"c", "d"}},
	} {
		if got := names(trie.match(c.event)); !slices.Equal(got, c.want) {
			t.Errorf("match(%q) = %v, want %v", c.event, got, c.want)
		}
	}

	// Removing gives back the trie without the subscription, and an
	// empty trie once all are gone; the old trie is untouched.
	before := trie
	trie = trie.without(tokens(">"), c)
	if got := names(trie.match("other")); !slices.Equal(got, []string{"d"}) {
		t.Errorf("after c drops >: %v", got)
	}
	if got := names(before.match("other")); !slices.Equal(got, []string{"c", "d"}) {
		t.Errorf("the old trie changed: %v", got)
	}
	for _, s := range subs {
		trie = trie.without(tokens(s.pattern), s.m)
	}
	if trie != nil {
		t.Fatalf("trie not empty after every unsubscribe: %+v", trie)
	}
	if got := trie.match("sensors"); got != nil {
		t.Fatalf("empty trie matched %v", got)
	}
}

// TestPubSubRegistration: subscriptions through the registration, one
// delivery per member, the publisher only when subscribed, the cap, and a
// leave dropping them.
func TestPubSubRegistration(t *testing.T) {
	r := newTestRegistry(Config{MaxSubscriptions: 3})
	reg := mustCreate(t, r, "topics", PubSub)
	pub, sub1, sub2 := newMember("pub"), newMember("sub1"), newMember("sub2")
	for _, m := range []*fakeMember{pub, sub1, sub2} {
		mustJoin(t, reg, m, RoleMember)
	}
	for _, p := range []string{"a.b", "a.*", "a.>"} {
		if added, err := reg.Subscribe(sub1, p); !added || err != nil {
			t.Fatalf("subscribe %s: %v %v", p, added, err)
		}
	}
	if added, err := reg.Subscribe(sub1, "a.b"); added || err != nil {
		t.Fatalf("subscribing twice: %v %v, want false nil", added, err)
	}
	if _, err := reg.Subscribe(sub1, "z"); err == nil {
		t.Fatal("a fourth subscription with MaxSubscriptions 3")
	}
	reg.Subscribe(sub2, "a.b")
	if n := reg.Publish(pub, RoleMember, Message{Data: []byte("1"), Event: "a.b"}); n != 2 {
		t.Fatalf("delivered to %d, want 2", n)
	}
	if len(sub1.messages()) != 1 || len(pub.messages()) != 0 {
		t.Fatalf("sub1 got %d, pub got %d; want 1 and 0", len(sub1.messages()), len(pub.messages()))
	}
	reg.Subscribe(pub, "a.b")
	if n := reg.Publish(pub, RoleMember, Message{Data: []byte("2"), Event: "a.b"}); n != 3 || len(pub.messages()) != 1 {
		t.Fatalf("a subscribed publisher hears itself: delivered %d, pub got %d", n, len(pub.messages()))
	}
	if !reg.Unsubscribe(sub2, "a.b") || reg.Unsubscribe(sub2, "a.b") {
		t.Fatal("unsubscribe: want true, then false")
	}
	if n := reg.UnsubscribeAll(sub1); n != 3 {
		t.Fatalf("unsubscribe:all dropped %d, want 3", n)
	}
	if n := reg.Publish(pub, RoleMember, Message{Data: []byte("3"), Event: "a.b"}); n != 1 {
		t.Fatalf("after the unsubscribes: %d, want 1 (pub)", n)
	}
	reg.Leave(pub, Closure{Code: 1000})
	if n := reg.Publish(sub1, RoleMember, Message{Data: []byte("4"), Event: "a.b"}); n != 0 {
		t.Fatalf("after the subscriber left: %d, want 0", n)
	}
	if _, err := reg.Subscribe(pub, "a"); err == nil {
		t.Fatal("a member that left subscribed")
	}
}

func FuzzValidPattern(f *testing.F) {
	for _, s := range []string{"a.b", "a.*.c", "a.>", ">", "a..b", "a.>.b", "*", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ev, pat := ValidEvent(s), ValidPattern(s)
		if ev && !pat {
			t.Fatalf("%q is an event but not a pattern", s)
		}
		if !pat {
			return
		}
		// A valid pattern goes in and out of the trie cleanly, and a
		// valid event matches its own literal subscription.
		m := newMember("m")
		trie := (*subNode)(nil).orEmpty().with(tokens(s), m)
		if ev && len(trie.match(s)) != 1 {
			t.Fatalf("%q does not match itself", s)
		}
		if trie.without(tokens(s), m) != nil {
			t.Fatalf("%q left nodes behind", s)
		}
	})
}

// BenchmarkMatch matches random literal events against 1,000 members with
// 20 random wildcard subscriptions each (the pubsub -wild benchmark's
// table), and one event everyone subscribes to.
func BenchmarkMatch(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 2))
	var wild, one *subNode
	for i := range 1000 {
		m := newMember(strconv.Itoa(i))
		one = one.orEmpty().with(tokens("bench.event"), m)
		for range 20 {
			a, c := strconv.Itoa(rng.IntN(32)), strconv.Itoa(rng.IntN(32))
			p := [...]string{"s." + a + ".*", "s.*." + c, "s." + a + ".>", "s." + a + "." + c}[rng.IntN(4)]
			wild = wild.with(tokens(p), m)
		}
	}
	events := make([]string, 1024)
	for i := range events {
		events[i] = fmt.Sprintf("s.%d.%d", i/32, i%32)
	}
	b.Run("wild", func(b *testing.B) {
		n := 0
		for i := 0; b.Loop(); i++ {
			n += len(wild.match(events[i%len(events)]))
		}
		b.ReportMetric(float64(n)/float64(b.N), "members/op")
	})
	b.Run("one-event", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			one.match("bench.event")
		}
	})
}

// BenchmarkSubscribeWide is a subscribe and an unsubscribe beside 10,000
// other subscriptions that all branch at the root (a token per device):
// a change copies one bucket of the root's branches, not all of them.
func BenchmarkSubscribeWide(b *testing.B) {
	var trie *subNode
	for i := range 10000 {
		trie = trie.with(tokens("device-"+strconv.Itoa(i)+".>"), newMember(strconv.Itoa(i)))
	}
	m := newMember("x")
	for b.Loop() {
		t := trie.with(tokens("device-x.status"), m)
		if t.without(tokens("device-x.status"), m) == nil {
			b.Fatal("emptied")
		}
	}
}
