// Package storetest is the conformance suite every registry.Store passes:
// the memory store, the file store, and the stores to come run the same
// table (docs/architecture.md, "The seams").
package storetest

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"wsrouter/registry"
)

// hashes are real bcrypt hashes (cost 4) of "key" and "host-key": a store
// may check that what it holds is one.
var hashes = sync.OnceValues(func() ([]byte, []byte) {
	k, _ := bcrypt.GenerateFromPassword([]byte("key"), bcrypt.MinCost)
	h, _ := bcrypt.GenerateFromPassword([]byte("host-key"), bcrypt.MinCost)
	return k, h
})

// Record returns a record with id and generation gen.
func Record(id string, gen uint64) registry.Record {
	k, h := hashes()
	return registry.Record{
		ID: id, Type: registry.HostClient, Created: time.Unix(1_700_000_000, 0).UTC(),
		KeyHash: k, HostKeyHash: h, Generation: gen,
	}
}

// hooked is Record with webhook settings.
func hooked(id string, gen uint64) registry.Record {
	r := Record(id, gen)
	r.Webhook = registry.Webhook{URL: "https://hooks.example/" + id, Secret: []byte("0123456789abcdef"), Events: 5}
	return r
}

// Equal reports whether two records are the same, times compared as
// instants.
func Equal(a, b registry.Record) bool {
	return a.ID == b.ID && a.Type == b.Type && a.Created.Equal(b.Created) && a.Generation == b.Generation &&
		string(a.KeyHash) == string(b.KeyHash) && string(a.HostKeyHash) == string(b.HostKeyHash) &&
		a.Webhook.URL == b.Webhook.URL && string(a.Webhook.Secret) == string(b.Webhook.Secret) && a.Webhook.Events == b.Webhook.Events
}

// Run runs the suite against fresh stores from newStore.
func Run(t *testing.T, newStore func(t *testing.T) registry.Store) {
	ctx := context.Background()
	load := func(t *testing.T, s registry.Store) []registry.Record {
		t.Helper()
		recs, err := s.Load(ctx)
		if err != nil {
			t.Fatal(err)
		}
		slices.SortFunc(recs, func(x, y registry.Record) int { return strings.Compare(x.ID, y.ID) })
		return recs
	}
	steps := []struct {
		name string
		do   func(s registry.Store) error
		want error
		left []registry.Record // what Load returns after the step
	}{
		{"put a", func(s registry.Store) error { return s.Put(ctx, Record("a", 1)) }, nil, []registry.Record{Record("a", 1)}},
		{"put b", func(s registry.Store) error { return s.Put(ctx, Record("b", 2)) }, nil, []registry.Record{Record("a", 1), Record("b", 2)}},
		{"put c with a webhook", func(s registry.Store) error { return s.Put(ctx, hooked("c", 5)) }, nil, []registry.Record{Record("a", 1), Record("b", 2), hooked("c", 5)}},
		{"delete c", func(s registry.Store) error { return s.Delete(ctx, registry.Ref{ID: "c", Generation: 5}) }, nil, []registry.Record{Record("a", 1), Record("b", 2)}},
		{"put a again", func(s registry.Store) error { return s.Put(ctx, Record("a", 3)) }, registry.ErrExists, []registry.Record{Record("a", 1), Record("b", 2)}},
		{"delete a of another generation", func(s registry.Store) error { return s.Delete(ctx, registry.Ref{ID: "a", Generation: 99}) }, nil, []registry.Record{Record("a", 1), Record("b", 2)}},
		{"delete nothing", func(s registry.Store) error { return s.Delete(ctx, registry.Ref{ID: "nobody", Generation: 1}) }, nil, []registry.Record{Record("a", 1), Record("b", 2)}},
		{"delete a", func(s registry.Store) error { return s.Delete(ctx, registry.Ref{ID: "a", Generation: 1}) }, nil, []registry.Record{Record("b", 2)}},
		{"put a anew", func(s registry.Store) error { return s.Put(ctx, Record("a", 4)) }, nil, []registry.Record{Record("a", 4), Record("b", 2)}},
	}
	t.Run("steps", func(t *testing.T) {
		s := newStore(t)
		for _, st := range steps {
			if err := st.do(s); !errors.Is(err, st.want) {
				t.Fatalf("%s: got %v, want %v", st.name, err, st.want)
			}
			got := load(t, s)
			if len(got) != len(st.left) || !slices.EqualFunc(got, st.left, Equal) {
				t.Fatalf("%s: Load got %+v, want %+v", st.name, got, st.left)
			}
		}
	})
	// Concurrent Puts of one id: exactly one wins.
	t.Run("one winner", func(t *testing.T) {
		s := newStore(t)
		var wg sync.WaitGroup
		var mu sync.Mutex
		wins := 0
		for i := range 20 {
			wg.Go(func() {
				if s.Put(ctx, Record("race", uint64(i+1))) == nil {
					mu.Lock()
					wins++
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		if wins != 1 || len(load(t, s)) != 1 {
			t.Fatalf("20 concurrent Puts of one id: %d won, want 1", wins)
		}
	})
	// Many concurrent Puts of different ids all land.
	t.Run("many", func(t *testing.T) {
		s := newStore(t)
		var wg sync.WaitGroup
		for i := range 200 {
			wg.Go(func() {
				if err := s.Put(ctx, Record(strings.Repeat("m", 1+i%5)+string(rune('a'+i%26))+string(rune('a'+i/26)), uint64(i+1))); err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
		if n := len(load(t, s)); n != 200 {
			t.Fatalf("after 200 concurrent Puts: %d records, want 200", n)
		}
	})
}
