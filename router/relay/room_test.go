package relay

import (
	"net/http"
	"testing"
	"time"
)

// TestRelayLateRepliesRememberedByTime drives one registration at 50
// requests a second for 70 s on a fake clock: every rid that ended less
// than 60 s ago still claims its reply (the first release forgot all but the
// last 1,024), and none older does.
func TestRelayLateRepliesRememberedByTime(t *testing.T) {
	p := &Proxy{}
	room := &room{p: p, pending: map[rid]*pending{}, lingering: map[rid]int64{}}
	start := time.Unix(1_000_000, 0)
	type done struct {
		id rid
		at time.Time
	}
	var finished []done
	for i := range 50 * 70 {
		now := start.Add(time.Duration(i) * 20 * time.Millisecond)
		id := newRID()
		if err := room.add(id, &pending{reply: make(chan outcome, 1)}, 100, now); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		room.finish(id, now)
		finished = append(finished, done{id, now})
		// Spot checks: the rid 59.9 s old, and one 60 s old or more.
		for _, back := range []int{2995, 3000, 3001} {
			if back > i {
				continue
			}
			d := finished[i-back]
			want := now.Sub(d.at) < lingerFor
			if got := room.claim(d.id.String(), nil, now); got != want {
				t.Fatalf("at %v, reply for a request that ended %v ago: claimed %v, want %v", now.Sub(start), now.Sub(d.at), got, want)
			}
		}
	}
	if n := p.lingering.Load(); n != 3000 {
		t.Fatalf("remembered rids: got %d, want the last 60 s at 50/s (3000)", n)
	}
}

// TestRelayRecentFull: a registration that has ended maxLingering requests
// within the last minute refuses new ones (503) rather than forget a rid
// early; a minute later it accepts again.
func TestRelayRecentFull(t *testing.T) {
	defer func(n int) { maxLingering = n }(maxLingering)
	maxLingering = 1000
	p := &Proxy{}
	room := &room{p: p, pending: map[rid]*pending{}, lingering: map[rid]int64{}}
	now := time.Unix(1_000_000, 0)
	for i := range maxLingering {
		id := newRID()
		if err := room.add(id, &pending{}, 100, now); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		room.finish(id, now)
	}
	if err := room.add(newRID(), &pending{}, 100, now.Add(59*time.Second)); err != ErrRecent {
		t.Fatalf("with %d rids from the last minute: got %v, want ErrRecent", maxLingering, err)
	}
	if code, _, _ := Status(ErrRecent); code != http.StatusServiceUnavailable {
		t.Fatalf("status: got %d, want 503", code)
	}
	if err := room.add(newRID(), &pending{}, 100, now.Add(lingerFor)); err != nil {
		t.Fatalf("a minute later: got %v, want nil", err)
	}
	if n := p.lingering.Load(); n != 0 {
		t.Fatalf("remembered after expiry: %d", n)
	}
}
