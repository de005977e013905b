package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coder/websocket"
)

// nofileHeadroom is how many descriptors -conns max leaves free in each
// process for listeners, logs, the runtime and HTTP requests.
const nofileHeadroom = 512

// idle holds -conns idle connections open in lobby registrations of up to
// -per-reg members and measures what they cost the server: connects/s
// while establishing them, and RSS before and after.
//
// The first member of each registration is connected before the timed
// phase, so on wsrouter the one bcrypt check per registration is not in the
// connect rate (the connect scenario measures that), and every timed
// connect finds its key remembered. RSS before is read once the
// registrations exist and before any connection; RSS after, at the end of
// holding the connections for -duration. Per connection it is the
// difference over all open connections.
type idle struct {
	o        *options
	connsArg string
	conns    int
	perReg   int
	conc     int
	timeout  time.Duration
}

func newIdle(fs *flag.FlagSet) bench {
	b := &idle{}
	fs.StringVar(&b.connsArg, "conns", "10000", "connections to hold, or max: as many as the open-file limit allows")
	fs.IntVar(&b.perReg, "per-reg", 500, "members per registration")
	fs.IntVar(&b.conc, "c", 32, "connects in progress at once")
	fs.DurationVar(&b.timeout, "connect-timeout", 2*time.Minute, "limit on establishing all connections")
	return b
}

func (b *idle) check(o *options) error {
	b.o = o
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return err
	}
	most := int(lim.Cur) - nofileHeadroom
	if b.connsArg == "max" {
		b.conns = most
	} else {
		n, err := strconv.Atoi(b.connsArg)
		if err != nil || n < 1 {
			return fmt.Errorf("-conns %q: want a positive number or max", b.connsArg)
		}
		b.conns = n
	}
	switch {
	case b.conns > most:
		return fmt.Errorf("-conns %d: the open-file limit (%d) allows at most %d with headroom", b.conns, lim.Cur, most)
	case b.conns < 1:
		return errors.New("-conns: no room under the open-file limit")
	case b.perReg < 1:
		return errors.New("-per-reg must be positive")
	case b.conc < 1:
		return errors.New("-c must be positive")
	}
	return nil
}

func (b *idle) regs() int { return (b.conns + b.perReg - 1) / b.perReg }

func (b *idle) params() map[string]any {
	return map[string]any{"conns": b.conns, "conns_arg": b.connsArg, "per_reg": b.perReg,
		"registrations": b.regs(), "c": b.conc}
}

func (b *idle) serverArgs() []string {
	return []string{
		"-max-members", strconv.Itoa(b.perReg),
		"-max-registrations", strconv.Itoa(max(10000, b.regs()+100)),
	}
}

func (b *idle) describe() string {
	return fmt.Sprintf("idle: %d connections in %d registrations of up to %d", b.conns, b.regs(), b.perReg)
}

func (b *idle) run(ctx context.Context, t *target) (*result, error) {
	res := newResult()
	nregs := b.regs()
	t.progress("registering %d lobbies", nregs)
	regs, err := t.registerMany(ctx, nregs, 4, "lobby")
	if err != nil {
		return res, err
	}
	rssBefore, err := t.srv.rss()
	if err != nil {
		return res, err
	}

	conns := make([]*websocket.Conn, b.conns)
	var stopping atomic.Bool
	var closes, failures tally
	var readers sync.WaitGroup
	defer func() {
		stopping.Store(true)
		closeAll(conns)
		readers.Wait()
	}()
	// Member i joins registration i mod nregs: members 0 … nregs-1 are
	// the first of each.
	latencies := make([]time.Duration, b.conns)
	connect := func(ctx context.Context, i int) error {
		t0 := time.Now()
		c, err := t.connect(ctx, regs[i%nregs], "", 0)
		if err != nil {
			failures.add(failKind(err), err)
			return nil // counted; keep going
		}
		latencies[i] = time.Since(t0)
		conns[i] = c
		// Something must read for pings and closes to be answered.
		readers.Add(1)
		go func() {
			defer readers.Done()
			for {
				if _, _, err := c.Read(context.Background()); err != nil {
					if !stopping.Load() {
						closes.add(endKind(err), err)
					}
					return
				}
			}
		}()
		return nil
	}

	cctx, cancel := context.WithTimeout(ctx, b.timeout)
	defer cancel()
	t.progress("connecting the first member of each registration")
	if err := parallel(cctx, nregs, 4, func(i int) error { return connect(cctx, i) }); err != nil {
		return res, err
	}
	timed := b.conns - nregs
	t.progress("connecting %d more", timed)
	cpu, err := startCPU(t.srv)
	if err != nil {
		return res, err
	}
	err = parallel(cctx, timed, b.conc, func(i int) error { return connect(cctx, nregs+i) })
	wall, srvCPU, _, errCPU := cpu.end()
	if err != nil {
		return res, fmt.Errorf("establishing connections: %w (after %v)", err, wall.Round(time.Millisecond))
	}
	if errCPU != nil {
		return res, errCPU
	}

	t.progress("holding for %v", b.o.duration)
	hold, err := startCPU(t.srv)
	if err != nil {
		return res, err
	}
	select {
	case <-ctx.Done():
		return res, ctx.Err()
	case <-time.After(b.o.duration):
	}
	holdWall, holdCPU, _, err := hold.end()
	if err != nil {
		return res, err
	}
	rssAfter, err := t.srv.rss()
	if err != nil {
		return res, err
	}

	open := 0
	var ok []time.Duration
	for i, c := range conns {
		if c != nil {
			open++
			if i >= nregs {
				ok = append(ok, latencies[i])
			}
		}
	}
	open -= closes.total()
	p50, p99, maxMs := percentilesMs(ok)
	res.set("conns_open", float64(open))
	res.set("connects_per_s", float64(len(ok))/wall.Seconds())
	res.set("connect_p50_ms", p50)
	res.set("connect_p99_ms", p99)
	res.set("connect_max_ms", maxMs)
	if len(ok) > 0 {
		res.set("server_cpu_us_per_connect", float64(srvCPU.Microseconds())/float64(len(ok)))
	}
	res.set("server_rss_before_mb", float64(rssBefore)/(1<<20))
	res.set("server_rss_after_mb", float64(rssAfter)/(1<<20))
	if open > 0 {
		res.set("server_rss_per_conn_kb", float64(rssAfter-rssBefore)/float64(open)/1024)
	}
	res.set("server_idle_cpu_cores", holdCPU.Seconds()/holdWall.Seconds())
	res.notes["establish_s"] = wall.Seconds()

	if n := failures.total(); n > 0 {
		res.notes["connect_failures"] = failures.snapshot()
		res.anomaly("%d connects failed: %s", n, failures.String())
	}
	if n := closes.total(); n > 0 {
		res.notes["unexpected_closes"] = closes.snapshot()
		res.anomaly("%d connections ended while held: %s", n, closes.String())
	}
	return res, nil
}
