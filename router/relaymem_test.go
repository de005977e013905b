package router

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"runtime"
	"sync"
	"testing"
	"time"
)

// heapInUse is the live heap after a collection.
func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// TestRelayMemoryBounded: with a device that never reads, and one that reads
// slowly, the relay holds about -relay-max-pending × -relay-max-body however
// many requests time out. The first release escaped each "<" of a body into
// six bytes and left every frame queued to the device after its request had
// ended: its heap grew with every round.
func TestRelayMemoryBounded(t *testing.T) {
	const (
		maxBody = 128 << 10
		pending = 20
		rounds  = 4
	)
	body := bytes.Repeat([]byte("<"), maxBody)
	for _, mode := range []string{"silent", "slow"} {
		t.Run(mode, func(t *testing.T) {
			ts := newTestServer(t, Config{
				RelayMaxBody: maxBody, RelayMaxPending: pending, RelayTimeout: time.Second,
				WriteTimeout: time.Minute, Registry: regCfgKeep(),
			})
			id := ts.register(t, "hostclient")
			dev := ts.dial(t, id, "host")
			if mode == "slow" {
				go func() {
					for {
						if _, _, err := dev.Read(context.Background()); err != nil {
							return
						}
						time.Sleep(20 * time.Millisecond) // the device's pace, not synchronisation
					}
				}()
			}
			reg := mustGet(t, ts, id)
			base := heapInUse()
			var peak uint64
			for round := range rounds {
				var wg sync.WaitGroup
				codes := make(chan int, pending)
				for range pending {
					wg.Go(func() {
						resp, err := http.Post(ts.URL+relayURL(id, "/", nil), "text/html", bytes.NewReader(body))
						if err != nil {
							t.Error(err)
							return
						}
						resp.Body.Close()
						codes <- resp.StatusCode
					})
				}
				// Measure while the round's requests are all pending.
				eventually(t, "the round's requests pending", func() bool {
					return ts.rt.relay.room(reg).pendingLen() == pending
				})
				peak = max(peak, heapInUse())
				wg.Wait()
				close(codes)
				for c := range codes {
					if c != http.StatusGatewayTimeout && c != http.StatusServiceUnavailable {
						t.Fatalf("round %d: got %d, want 504 (or 503 while the device's relay queue is full)", round, c)
					}
				}
			}
			// The frames of pending requests, the batch a stuck writer
			// holds (at most the relay queue, 8 MiB by default), and a
			// little for the rest.
			bound := uint64(pending*maxBody + 8<<20 + 4<<20)
			grew := peak - min(peak, base)
			t.Logf("%s device: heap grew %.1f MiB at its peak over %d rounds of %d pending 128 KiB bodies (bound %.1f MiB)",
				mode, float64(grew)/(1<<20), rounds, pending, float64(bound)/(1<<20))
			if grew > bound {
				t.Fatalf("heap grew %d bytes, want at most %d", grew, bound)
			}
			if got := ts.rt.relay.mem.Load(); got != 0 {
				t.Fatalf("relay memory still counted after every request ended: %d bytes", got)
			}
		})
	}
}

// TestRelayMemoryCap: past -relay-max-memory a relay request is refused with
// 503 before its body is read.
func TestRelayMemoryCap(t *testing.T) {
	ts := newTestServer(t, Config{RelayMaxBody: 64 << 10, RelayMaxMemory: 300 << 10, RelayTimeout: testTimeout})
	id := ts.register(t, "hostclient")
	_, frames := ts.device(t, id, func(relayRequest) string { return "" })
	body := bytes.Repeat([]byte("a"), 64<<10)
	results := make(chan int, 10)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	post := func() {
		req, _ := http.NewRequestWithContext(ctx, "POST", ts.URL+relayURL(id, "/", nil), bytes.NewReader(body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			results <- -1
			return
		}
		resp.Body.Close()
		results <- resp.StatusCode
	}
	// Each pending request holds its 64 KiB body's frame (and charged
	// 64 KiB × 7/3 plus headers while reading it): two fit in 300 KiB.
	for range 2 {
		go post()
		<-frames
	}
	go post()
	if code := <-results; code != http.StatusServiceUnavailable {
		t.Fatalf("request past the relay memory cap: got %d, want 503", code)
	}
	cancel()
	<-results
	<-results
	eventually(t, "relay memory released", func() bool { return ts.rt.relay.mem.Load() == 0 })
}

// TestRelayLateRepliesRememberedByTime drives one registration at 50
// requests a second for 70 s on a fake clock: every rid that ended less
// than 60 s ago still claims its reply (the first release forgot all but the
// last 1,024), and none older does.
func TestRelayLateRepliesRememberedByTime(t *testing.T) {
	rl := &relay{}
	room := &relayRoom{rl: rl, pending: map[rid]*pendingRelay{}, lingering: map[rid]int64{}}
	start := time.Unix(1_000_000, 0)
	type done struct {
		id rid
		at time.Time
	}
	var finished []done
	for i := range 50 * 70 {
		now := start.Add(time.Duration(i) * 20 * time.Millisecond)
		id := newRID()
		if err := room.add(id, &pendingRelay{reply: make(chan relayOutcome, 1)}, 100, now); err != nil {
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
			want := now.Sub(d.at) < relayLinger
			if got := room.claim(d.id.String(), nil, now); got != want {
				t.Fatalf("at %v, reply for a request that ended %v ago: claimed %v, want %v", now.Sub(start), now.Sub(d.at), got, want)
			}
		}
	}
	if n := rl.lingering.Load(); n != 3000 {
		t.Fatalf("remembered rids: got %d, want the last 60 s at 50/s (3000)", n)
	}
}

// TestRelayRecentFull: a registration that has ended maxLingering requests
// within the last minute refuses new ones (503) rather than forget a rid
// early; a minute later it accepts again.
func TestRelayRecentFull(t *testing.T) {
	rl := &relay{}
	room := &relayRoom{rl: rl, pending: map[rid]*pendingRelay{}, lingering: map[rid]int64{}}
	now := time.Unix(1_000_000, 0)
	for i := range maxLingering {
		id := newRID()
		if err := room.add(id, &pendingRelay{}, 100, now); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		room.finish(id, now)
	}
	if err := room.add(newRID(), &pendingRelay{}, 100, now.Add(59*time.Second)); err != errRelayRecent {
		t.Fatalf("with %d rids from the last minute: got %v, want errRelayRecent", maxLingering, err)
	}
	if code, _ := relayStatus(errRelayRecent); code != http.StatusServiceUnavailable {
		t.Fatalf("status: got %d, want 503", code)
	}
	if err := room.add(newRID(), &pendingRelay{}, 100, now.Add(relayLinger)); err != nil {
		t.Fatalf("a minute later: got %v, want nil", err)
	}
	if n := rl.lingering.Load(); n != 0 {
		t.Fatal(fmt.Sprintf("remembered after expiry: %d", n))
	}
}
