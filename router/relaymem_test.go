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
	"wsrouter/router/relay"
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
			// Requests never time out here: each round ends when its
			// callers give up, so nothing depends on the machine's speed.
			ts := newTestServer(t, Config{
				RelayMaxBody: maxBody, RelayMaxPending: pending, RelayTimeout: time.Hour,
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
				ctx, cancel := context.WithCancel(context.Background())
				var wg sync.WaitGroup
				for range pending {
					wg.Go(func() {
						req, _ := http.NewRequestWithContext(ctx, "POST", ts.URL+relayURL(id, "/", nil), bytes.NewReader(body))
						req.Header.Set("Content-Type", "text/html")
						resp, err := http.DefaultClient.Do(req)
						if err == nil {
							resp.Body.Close()
							if resp.StatusCode != http.StatusServiceUnavailable {
								t.Errorf("round %d: got %d, want the request pending (or 503 host busy)", round, resp.StatusCode)
							}
						}
					})
				}
				// Measure while the round's requests are all pending.
				eventually(t, "the round's requests pending", func() bool {
					return ts.rt.relay.PendingFor(reg) == pending
				})
				peak = max(peak, heapInUse())
				cancel()
				wg.Wait()
				eventually(t, "the round's requests ended", func() bool {
					return ts.rt.relay.PendingFor(reg) == 0
				})
			}
			// The frames of pending requests, the frames a stuck writer
			// holds (at most the relay queue, 8 MiB by default), and a
			// little for the rest.
			bound := uint64(pending*maxBody + 8<<20 + 4<<20)
			grew := peak - min(peak, base)
			t.Logf("%s device: heap grew %.1f MiB at its peak over %d rounds of %d pending 128 KiB bodies (bound %.1f MiB)",
				mode, float64(grew)/(1<<20), rounds, pending, float64(bound)/(1<<20))
			if grew > bound {
				t.Fatalf("heap grew %d bytes, want at most %d", grew, bound)
			}
			if got, max := ts.rt.relay.MemoryInUse(), int64(8<<20+pending*maxBody); got > max {
				t.Fatalf("relay memory counted after every request ended: %d bytes, want at most a relay queue's worth", got)
			}
			// Once the device is gone, nothing is held.
			dev.CloseNow()
			eventually(t, "relay memory released", func() bool { return ts.rt.relay.MemoryInUse() == 0 })
		})
	}
}

// TestRelayMemoryCap: each client address may hold its share of
// -relay-max-memory (an eighth, or four bodies' worth) and the process the
// whole of it; past either a relay request gets 503. One address filling its
// share leaves the others theirs.
func TestRelayMemoryCap(t *testing.T) {
	const maxBody, limit = 64 << 10, 1 << 20
	ts := newTestServer(t, Config{RelayMaxBody: maxBody, RelayMaxMemory: limit, RelayTimeout: testTimeout, TrustProxy: "X-Forwarded-For"})
	id := ts.register(t, "hostclient")
	_, frames := ts.device(t, id, func(relay.Request) string { return "" })
	body := bytes.Repeat([]byte("a"), maxBody)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()

	// post sends one request from client and returns 0 once it is pending
	// (its frame reached the device), or the status it was answered with.
	post := func(client string) int {
		res := make(chan int, 1)
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(ctx, "POST", ts.URL+relayURL(id, "/", nil), bytes.NewReader(body))
			req.Header.Set("X-Forwarded-For", client)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				return // cancelled at the end of the test
			}
			resp.Body.Close()
			res <- resp.StatusCode
		})
		select {
		case <-frames:
			return 0
		case code := <-res:
			return code
		}
	}
	// fill sends from client until one is refused; it returns how many
	// became pending.
	fill := func(client string) int {
		for n := 0; n < 100; n++ {
			switch code := post(client); code {
			case 0:
			case http.StatusServiceUnavailable:
				return n
			default:
				t.Fatalf("client %s, request %d: got %d, want pending or 503", client, n+1, code)
			}
		}
		t.Fatalf("client %s: 100 requests pending, none refused", client)
		return 0
	}
	perClient := max(limit/8, 4*maxBody)
	a := fill("192.0.2.1")
	if a < 1 || int64(a*maxBody) > int64(perClient) {
		t.Fatalf("first client: %d pending before a 503, want between 1 and %d", a, perClient/maxBody)
	}
	// Other addresses have their own shares, until the whole is taken.
	clients := 1
	for ; clients < 32; clients++ {
		if fill(fmt.Sprintf("192.0.2.%d", clients+1)) == 0 {
			break
		}
	}
	if clients == 32 {
		t.Fatal("32 clients each with pending requests: the process-wide limit never refused one")
	}
	if got := ts.rt.relay.MemoryInUse(); got > limit {
		t.Fatalf("relay memory in use %d, over the limit %d", got, limit)
	}
	t.Logf("%d requests pending for the first client, %d clients before the process-wide limit refused one", a, clients)
	cancel()
	wg.Wait()
	eventually(t, "relay memory released", func() bool { return ts.rt.relay.MemoryInUse() == 0 })
}
