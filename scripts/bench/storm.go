package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// stormBench is a reconnect storm: -n members connect at once to -regs
// registrations nobody has joined yet, as a fleet does after the router
// restarts. With -auth key, wsrouter checks each registration's key once
// with bcrypt (concurrent checks of the same key share one), the remembered
// keys having died with the process; with -auth token no bcrypt runs.
//
// With -restart the members first connect and stay, the server is
// restarted on a data file (SIGTERM: they get 1001; then the same address
// and flags), and all of them reconnect at once: the figures are those of
// the reconnect, and restart_s is how long the server was away. The
// reference has no keys and no data: it gets fresh rooms, and no restart.
type stormBench struct {
	o       *options
	n       int
	regs    int
	auth    string
	restart bool
	retry   bool
	dir     string       // holds the -restart data file
	retries atomic.Int64 // retries of the last connectAll
	file    string       // the -restart data file, the same in every run
}

func newStorm(fs *flag.FlagSet) bench {
	b := &stormBench{}
	fs.IntVar(&b.n, "n", 1000, "members connecting at once")
	fs.IntVar(&b.regs, "regs", 1, "registrations the members are spread over (a fleet of devices: one each)")
	fs.StringVar(&b.auth, "auth", "key", "key (each registration's key: one bcrypt per registration) or token (one per member, named, from POST /token)")
	fs.BoolVar(&b.restart, "restart", false, "connect the members, restart the server on a data file, and measure their reconnecting (-targets wsrouter)")
	fs.BoolVar(&b.retry, "retry", false, "a member refused with 503 or 429 tries again after a jittered backoff (0.5 s doubling to 8 s), as a device does, until it is in or 10 minutes have passed")
	return b
}

func (b *stormBench) check(o *options) error {
	b.o = o
	switch {
	case b.n < 1:
		return errors.New("-n must be positive")
	case b.regs < 1 || b.regs > b.n:
		return errors.New("-regs must be 1 to -n")
	case b.auth != "key" && b.auth != "token":
		return fmt.Errorf("-auth %q: want key or token", b.auth)
	case b.restart && o.targets != kindWsrouter:
		return errors.New("-restart needs -targets wsrouter: the reference keeps nothing across a restart")
	}
	if b.restart {
		var err error
		if b.dir, err = os.MkdirTemp("", "wsrouter-storm-"); err != nil {
			return err
		}
		b.file = filepath.Join(b.dir, "storm.db")
	}
	return nil
}

// cleanup removes the -restart directory once every run is over.
func (b *stormBench) cleanup() {
	if b.dir != "" {
		os.RemoveAll(b.dir)
	}
}

func (b *stormBench) params() map[string]any {
	return map[string]any{"n": b.n, "regs": b.regs, "auth": b.auth, "restart": b.restart, "retry": b.retry}
}

func (b *stormBench) serverArgs() []string {
	args := []string{"-max-members", fmt.Sprint(b.n/b.regs + 10), "-max-registrations", fmt.Sprint(b.regs + 100)}
	if b.restart {
		// One path for every run; each run removes its file at the end
		// (the server keeps writing to it until stopped), so the next
		// starts on a fresh one.
		args = append(args, "-data", b.file, "-unused-ttl", "10m")
	}
	return args
}

func (b *stormBench) describe() string {
	what := "first connects at once"
	if b.restart {
		what = "members reconnecting at once after a restart"
	}
	return fmt.Sprintf("storm: %d %s to %d registrations, auth %s", b.n, what, b.regs, b.auth)
}

func (b *stormBench) run(ctx context.Context, t *target) (*result, error) {
	res := newResult()
	if b.restart {
		defer os.Remove(b.file)
	}
	t.progress("registering %d lobbies", b.regs)
	regs, err := t.registerMany(ctx, b.regs, 4, "lobby")
	if err != nil {
		return res, err
	}
	// Member i joins regs[i % regs], with the key or a token of its own.
	members := make([]reg, b.n)
	for i := range members {
		members[i] = regs[i%b.regs]
	}
	if b.auth == "token" && !t.isRef() {
		t.progress("minting %d tokens", b.n)
		err := parallel(ctx, b.n, 16, func(i int) error {
			var err error
			members[i], err = t.mint(ctx, members[i], "member", fmt.Sprintf("device-%d", i))
			return err
		})
		if err != nil {
			return res, err
		}
	}
	if b.restart {
		t.progress("%d members connecting before the restart", b.n)
		conns, failures, _ := b.connectAll(ctx, t, members)
		if failures.total() > 0 {
			return res, fmt.Errorf("before the restart: %d connects failed: %s", failures.total(), failures.String())
		}
		// Each member reads (connectAll started its reader), so it
		// answers the old server's 1001 and the shutdown need not wait.
		t.progress("restarting the server")
		t0 := time.Now()
		if err := t.restart(ctx); err != nil {
			return res, err
		}
		res.set("restart_s", time.Since(t0).Seconds())
		for _, c := range conns {
			c.CloseNow() // closed with 1001 by the old server already
		}
	}
	t.progress("%d connects at once", b.n)
	cpu, err := startCPU(t.srv)
	if err != nil {
		return res, err
	}
	conns, failures, dials := b.connectAll(ctx, t, members)
	wall, srvCPU, cliCPU, err := cpu.end()
	if err != nil {
		return res, err
	}
	for _, c := range conns {
		c.CloseNow()
	}
	if ctx.Err() != nil {
		return res, ctx.Err()
	}
	p50, p99, pmax := percentilesMs(dials)
	res.set("admitted", float64(len(dials)))
	res.set("refused", float64(failures.total()))
	res.set("retries", float64(b.retries.Load()))
	res.set("all_in_s", pmax/1000)
	res.set("connect_p50_ms", p50)
	res.set("connect_p99_ms", p99)
	res.set("server_cpu_s", srvCPU.Seconds())
	res.set("client_cpu_cores", cliCPU.Seconds()/wall.Seconds())
	if k := failures.total(); k > 0 {
		res.notes["connect_failures"] = failures.snapshot()
		res.anomaly("%d connects failed: %s", k, failures.String())
	}
	return res, nil
}

// retryable reports whether a device would try a failed connect again: the
// server was busy (503) or rate-limited it (429).
func retryable(err error) bool {
	var de *dialError
	return errors.As(err, &de) && (de.status == 503 || de.status == 429)
}

// connectAll connects every member at once and returns the connections,
// the failures and each admitted member's time from the start to its 101.
func (b *stormBench) connectAll(ctx context.Context, t *target, members []reg) ([]*websocket.Conn, *tally, []time.Duration) {
	var (
		failures tally
		mu       sync.Mutex
		dials    []time.Duration
		conns    []*websocket.Conn
		wg       sync.WaitGroup
	)
	b.retries.Store(0)
	retries := &b.retries
	start := make(chan struct{})
	for _, m := range members {
		wg.Go(func() {
			<-start
			t0 := time.Now()
			c, err := t.connect(ctx, m, "", 0)
			for backoff := 500 * time.Millisecond; b.retry && retryable(err) && time.Since(t0) < 10*time.Minute; backoff = min(2*backoff, 8*time.Second) {
				retries.Add(1)
				select {
				case <-time.After(backoff/2 + rand.N(backoff/2)):
				case <-ctx.Done():
				}
				c, err = t.connect(ctx, m, "", 0)
			}
			if err != nil {
				failures.add(failKind(err), err)
				return
			}
			d := time.Since(t0)
			mu.Lock()
			dials, conns = append(dials, d), append(conns, c)
			mu.Unlock()
			// Read, as a device does: reading answers the server's pings
			// (a member that does not is dropped after -ping-timeout) and
			// its close.
			go func() {
				for {
					if _, _, err := c.Read(ctx); err != nil {
						return
					}
				}
			}()
		})
	}
	close(start)
	wg.Wait()
	return conns, &failures, dials
}
