package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// pair runs -pairs independent hostclient registrations, each with one host
// and one client. Each client sends a message, its host echoes it, and the
// client sends the next as soon as the echo arrives: one message in flight
// per pair, so the figures are round trips/s and the round-trip time,
// measured from the send, of a latency-bound workload. On the reference
// each pair is a room of its own (rooms are keyed by id).
type pair struct {
	o     *options
	pairs int
	size  int
}

func newPair(fs *flag.FlagSet) bench {
	b := &pair{}
	fs.IntVar(&b.pairs, "pairs", 1, "host/client pairs, each its own registration")
	fs.IntVar(&b.size, "size", 256, "message size in bytes (at least 21)")
	return b
}

func (b *pair) check(o *options) error {
	b.o = o
	switch {
	case b.pairs < 1:
		return errors.New("-pairs must be positive")
	case b.size < headerSize || b.size > 1<<20:
		return fmt.Errorf("-size must be %d to %d", headerSize, 1<<20)
	}
	return nil
}

func (b *pair) params() map[string]any { return map[string]any{"pairs": b.pairs, "size": b.size} }

func (b *pair) serverArgs() []string { return nil }

func (b *pair) describe() string {
	return fmt.Sprintf("pair: %d hostclient pair(s), %d B, one message in flight per pair", b.pairs, b.size)
}

// pairState is one pair's client side.
type pairState struct {
	host, client *websocket.Conn
	synced       atomic.Bool
	echoed       chan struct{} // capacity 1: a data echo arrived
	sent, recv   atomic.Uint64
	err          error // why the client stopped early; read after it returns

	// Owned by the client's reader until done is closed.
	hist histogram
	done chan struct{}
}

func (b *pair) run(ctx context.Context, t *target) (*result, error) {
	res := newResult()
	clk := newClock()
	var windowFrom atomic.Int64
	windowFrom.Store(math.MaxInt64)

	t.progress("registering and connecting %d pairs", b.pairs)
	regs, err := t.registerMany(ctx, b.pairs, 4, "hostclient")
	if err != nil {
		return res, err
	}
	ps := make([]*pairState, b.pairs)
	for i := range ps {
		ps[i] = &pairState{echoed: make(chan struct{}, 1), done: make(chan struct{})}
	}
	var stopping atomic.Bool
	var closes tally
	var loops sync.WaitGroup
	stop := make(chan struct{})
	var stopOnce sync.Once
	defer func() {
		stopping.Store(true)
		stopOnce.Do(func() { close(stop) })
		var all []*websocket.Conn
		for _, p := range ps {
			all = append(all, p.host, p.client)
		}
		closeAll(all)
		loops.Wait()
	}()
	err = parallel(ctx, b.pairs, 8, func(i int) error {
		// The host first: on wsrouter its connect pays bcrypt, the
		// client's finds the key remembered.
		// With -nodes, every host on the first node and every client on
		// the second: each round trip crosses between nodes twice.
		h, err := t.connectOn(ctx, 0, regs[i], "host", int64(b.size))
		if err != nil {
			return err
		}
		ps[i].host = h
		c, err := t.connectOn(ctx, 1, regs[i], "client", int64(b.size))
		ps[i].client = c
		return err
	})
	if err != nil {
		return res, err
	}

	ended := func(err error) {
		if !stopping.Load() {
			closes.add(endKind(err), err)
		}
	}
	for _, p := range ps {
		loops.Add(2)
		go func() { // the host: echo everything
			defer loops.Done()
			buf := make([]byte, b.size+1)
			for {
				n, err := readMessage(p.host, buf)
				if err == nil {
					err = p.host.Write(context.Background(), websocket.MessageBinary, buf[:n])
				}
				if err != nil {
					ended(err)
					return
				}
			}
		}()
		go func() { // the client's reader
			defer loops.Done()
			defer close(p.done)
			buf := make([]byte, b.size+1)
			for {
				n, err := readMessage(p.client, buf)
				if err != nil {
					ended(err)
					return
				}
				now := clk.now()
				kind, _, _, at, ok := getHeader(buf[:n])
				switch {
				case !ok:
				case kind == kindSync:
					p.synced.Store(true)
				case kind == kindData:
					if at >= windowFrom.Load() {
						p.hist.record(now - at)
					}
					p.recv.Add(1)
					select {
					case p.echoed <- struct{}{}:
					default:
					}
				}
			}
		}()
	}

	// Barrier: a client's message reaches its host only once the host
	// has joined; an echoed barrier message proves both are in.
	err = parallel(ctx, b.pairs, 16, func(i int) error {
		p := ps[i]
		msg := make([]byte, b.size)
		putHeader(msg, kindSync, uint32(i), 0, 0)
		deadline := time.Now().Add(15 * time.Second)
		for !p.synced.Load() {
			if time.Now().After(deadline) {
				return fmt.Errorf("barrier: pair %d got no echo within 15s", i)
			}
			if err := p.client.Write(ctx, websocket.MessageBinary, msg); err != nil {
				return fmt.Errorf("barrier: %w", err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		return nil
	})
	if err != nil {
		return res, err
	}

	start := clk.now()
	from := start + int64(b.o.warmup)
	to := from + int64(b.o.duration)
	windowFrom.Store(from)
	var senders sync.WaitGroup
	for i, p := range ps {
		senders.Add(1)
		go func() {
			defer senders.Done()
			msg := make([]byte, b.size)
			for seq := uint64(0); ; seq++ {
				at := clk.now()
				if at >= to {
					return
				}
				putHeader(msg, kindData, uint32(i), seq, at)
				if err := p.client.Write(context.Background(), websocket.MessageBinary, msg); err != nil {
					p.err = err
					return
				}
				p.sent.Add(1)
				select {
				case <-p.echoed:
				case <-stop:
					return
				}
			}
		}()
	}

	t.progress("ping-ponging for %v + %v", b.o.warmup, b.o.duration)
	if err := sleepUntil(ctx, clk, from); err != nil {
		return res, err
	}
	recv := func() (n uint64) {
		for _, p := range ps {
			n += p.recv.Load()
		}
		return n
	}
	recv0 := recv()
	cpu, err := startCPU(t.procs()...)
	if err != nil {
		return res, err
	}
	if err := sleepUntil(ctx, clk, to); err != nil {
		return res, err
	}
	recv1 := recv()
	wall, srvCPU, cliCPU, err := cpu.end()
	if err != nil {
		return res, err
	}
	// Each client sends again only after an echo, so by now every one is
	// waiting for its last echo or has returned; give the echoes a
	// moment, then stop.
	if !waitTimeout(&senders, 2*time.Second) {
		stopOnce.Do(func() { close(stop) })
		senders.Wait()
	}
	var sent uint64
	for _, p := range ps {
		sent += p.sent.Load()
	}
	received := recv()
	rss, _ := t.rss()

	stopping.Store(true)
	var hist histogram
	for _, p := range ps {
		p.client.CloseNow()
		<-p.done
		hist.merge(&p.hist)
	}

	trips := float64(recv1 - recv0)
	secs := wall.Seconds()
	res.set("round_trips_per_s", trips/secs)
	res.set("rtt_p50_us", float64(hist.quantile(0.5))/1e3)
	res.set("rtt_p99_us", float64(hist.quantile(0.99))/1e3)
	res.set("rtt_max_us", float64(hist.quantile(1))/1e3)
	if trips > 0 {
		res.set("server_cpu_us_per_round_trip", float64(srvCPU.Microseconds())/trips)
	}
	res.set("server_cpu_cores", srvCPU.Seconds()/secs)
	res.set("client_cpu_cores", cliCPU.Seconds()/secs)
	res.set("server_rss_mb", float64(rss)/(1<<20))
	lost := int64(sent) - int64(received)
	res.set("loss", float64(lost))
	res.notes["round_trips"] = received
	res.notes["window_s"] = secs
	if lost != 0 {
		res.anomaly("loss: %d of %d messages got no echo", lost, sent)
	}
	if n := closes.total(); n > 0 {
		res.notes["unexpected_closes"] = closes.snapshot()
		res.anomaly("%d connections ended during the run: %s", n, closes.String())
	}
	var stopped tally
	for _, p := range ps {
		if p.err != nil {
			stopped.add(errKind(p.err), p.err)
		}
	}
	if n := stopped.total(); n > 0 {
		res.anomaly("%d clients stopped early: %s", n, stopped.String())
	}
	return res, nil
}
