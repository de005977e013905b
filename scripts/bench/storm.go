package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"sync"
	"time"

	"github.com/coder/websocket"
)

// stormBench is a reconnect storm: -n members connect to one registration
// nobody has joined yet, all at once, as a fleet does after the router
// restarts (the key it remembered is gone). wsrouter checks one key for all
// of them: concurrent checks of the same key share one bcrypt. The
// reference has no keys; it gets a fresh room.
type stormBench struct {
	o *options
	n int
}

func newStorm(fs *flag.FlagSet) bench {
	b := &stormBench{}
	fs.IntVar(&b.n, "n", 1000, "members connecting at once")
	return b
}

func (b *stormBench) check(o *options) error {
	b.o = o
	if b.n < 1 {
		return errors.New("-n must be positive")
	}
	return nil
}

func (b *stormBench) params() map[string]any { return map[string]any{"n": b.n} }

func (b *stormBench) serverArgs() []string {
	return []string{"-max-members", fmt.Sprint(b.n + 10)}
}

func (b *stormBench) describe() string {
	return fmt.Sprintf("storm: %d first connects at once to one registration", b.n)
}

func (b *stormBench) run(ctx context.Context, t *target) (*result, error) {
	res := newResult()
	r, err := t.register(ctx, "lobby")
	if err != nil {
		return res, err
	}
	t.progress("%d connects at once", b.n)
	var (
		failures tally
		mu       sync.Mutex
		dials    []time.Duration
		conns    []*websocket.Conn
		wg       sync.WaitGroup
	)
	cpu, err := startCPU(t.srv)
	if err != nil {
		return res, err
	}
	start := make(chan struct{})
	for range b.n {
		wg.Go(func() {
			<-start
			t0 := time.Now()
			c, err := t.connect(ctx, r, "", 0)
			if err != nil {
				failures.add(failKind(err), err)
				return
			}
			d := time.Since(t0)
			mu.Lock()
			dials, conns = append(dials, d), append(conns, c)
			mu.Unlock()
		})
	}
	close(start)
	wg.Wait()
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
