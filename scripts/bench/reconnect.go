package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"wsrouter/client"
)

// reconnectBench measures the Go client library's reconnect: -n clients
// (client.Dial, default backoff unless -min/-max-backoff say otherwise) join
// one lobby; the router is restarted on its data file (SIGTERM: they get
// 1001 and start backing off); the figure is the time from the router
// answering /healthz again to the last client's new session, and the
// curve of reconnects per 100 ms shows how the jitter spreads them.
type reconnectBench struct {
	o          *options
	n          int
	minBackoff time.Duration
	maxBackoff time.Duration
	dir, file  string
}

func newReconnect(fs *flag.FlagSet) bench {
	b := &reconnectBench{}
	fs.IntVar(&b.n, "n", 1000, "clients")
	fs.DurationVar(&b.minBackoff, "min-backoff", 0, "client.Options.MinBackoff (0: the library's default)")
	fs.DurationVar(&b.maxBackoff, "max-backoff", 0, "client.Options.MaxBackoff (0: the library's default)")
	return b
}

func (b *reconnectBench) check(o *options) error {
	b.o = o
	if b.n < 1 {
		return errors.New("-n must be positive")
	}
	if o.targets != kindWsrouter {
		return errors.New("reconnect needs -targets wsrouter")
	}
	var err error
	if b.dir, err = os.MkdirTemp("", "wsrouter-reconnect-"); err != nil {
		return err
	}
	b.file = filepath.Join(b.dir, "reconnect.db")
	return nil
}

func (b *reconnectBench) cleanup() { os.RemoveAll(b.dir) }

func (b *reconnectBench) params() map[string]any {
	return map[string]any{"n": b.n, "min_backoff": b.minBackoff.String(), "max_backoff": b.maxBackoff.String()}
}

func (b *reconnectBench) serverArgs() []string {
	return []string{"-max-members", fmt.Sprint(b.n + 10), "-data", b.file}
}

func (b *reconnectBench) describe() string {
	return fmt.Sprintf("reconnect: %d Go clients (wsrouter/client) in one lobby, the router restarted", b.n)
}

func (b *reconnectBench) run(ctx context.Context, t *target) (*result, error) {
	res := newResult()
	defer os.Remove(b.file)
	r, err := t.register(ctx, "lobby")
	if err != nil {
		return res, err
	}
	var (
		mu        sync.Mutex
		restarted time.Time          // zero until the router is back
		back      []time.Time        // each client's first session after it
		sessions  = make([]int, b.n) // per client, sessions so far
	)
	conns := make([]*client.Conn, b.n)
	defer func() {
		for _, c := range conns {
			if c != nil {
				go c.Close()
			}
		}
	}()
	t.progress("connecting %d clients", b.n)
	err = parallel(ctx, b.n, 32, func(i int) error {
		c, err := client.Dial(ctx, client.Options{
			URL: "http://" + t.srv.addr, ID: r.id, Key: r.key, HTTPClient: t.dial.client(),
			MinBackoff: b.minBackoff, MaxBackoff: b.maxBackoff,
			OnState: func(s client.State) {
				if s.Kind != client.Connected {
					return
				}
				mu.Lock()
				defer mu.Unlock()
				sessions[i]++
				if !restarted.IsZero() && sessions[i] == 2 {
					back = append(back, time.Now())
				}
			},
		})
		if err != nil {
			return err
		}
		conns[i] = c
		return nil
	})
	if err != nil {
		return res, err
	}
	t.progress("restarting the router")
	if err := t.restart(ctx); err != nil {
		return res, err
	}
	mu.Lock()
	restarted = time.Now()
	mu.Unlock()
	t.progress("waiting for %d clients to come back", b.n)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		mu.Lock()
		n := len(back)
		mu.Unlock()
		if n >= b.n || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	sort.Slice(back, func(i, j int) bool { return back[i].Before(back[j]) })
	res.set("back", float64(len(back)))
	if len(back) > 0 {
		res.set("all_back_s", back[len(back)-1].Sub(restarted).Seconds())
		res.set("half_back_s", back[len(back)/2].Sub(restarted).Seconds())
	}
	// Reconnects per 100 ms since the router was back, and the busiest
	// second (any 10 consecutive buckets).
	curve := map[int]int{}
	last := 0
	for _, at := range back {
		s := int(at.Sub(restarted) / (100 * time.Millisecond))
		curve[s]++
		last = max(last, s)
	}
	peak := 0
	for i := 0; i <= last; i++ {
		n := 0
		for j := i; j < i+10; j++ {
			n += curve[j]
		}
		peak = max(peak, n)
	}
	res.set("peak_per_s", float64(peak))
	res.notes["per_100ms"] = curve
	if len(back) < b.n {
		res.anomaly("only %d of %d clients came back within 2 minutes", len(back), b.n)
	}
	return res, nil
}
