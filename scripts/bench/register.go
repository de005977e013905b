package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"time"
)

// registerBench measures /register at concurrency -c for -duration: each
// worker registers a fresh lobby, again and again. With -server-flags
// "-data FILE" every answer waits for the record to be on disk (concurrent
// ones share a commit); without, the registrations stay in memory. The
// reference has no /register: measure wsrouter only (-targets wsrouter).
type registerBench struct {
	o    *options
	conc int
}

func newRegister(fs *flag.FlagSet) bench {
	b := &registerBench{}
	fs.IntVar(&b.conc, "c", 50, "registers in progress at once")
	return b
}

func (b *registerBench) check(o *options) error {
	b.o = o
	if b.conc < 1 {
		return errors.New("-c must be positive")
	}
	if o.targets != kindWsrouter {
		return errors.New("register measures wsrouter only: add -targets wsrouter")
	}
	return nil
}

func (b *registerBench) params() map[string]any { return map[string]any{"c": b.conc} }

// serverArgs keep bcrypt cheap (cost 4), so that what is measured is the
// register path and the store, and let every registration fit.
func (b *registerBench) serverArgs() []string {
	return []string{"-bcrypt-cost", "4", "-max-registrations", "0"}
}

func (b *registerBench) describe() string {
	return fmt.Sprintf("register: fresh lobbies at concurrency %d (bcrypt cost 4)", b.conc)
}

func (b *registerBench) run(ctx context.Context, t *target) (*result, error) {
	res := newResult()
	t.progress("registering for %v, %d at once", b.o.duration, b.conc)
	var failures tally
	cpu, err := startCPU(t.srv)
	if err != nil {
		return res, err
	}
	lat := t.closedLoop(ctx, b.conc, time.Now().Add(b.o.duration), &failures, func() (*http.Request, error) {
		q := url.Values{"key": {randHex(16)}, "host_key": {randHex(16)}, "reg_type": {"lobby"}}
		return http.NewRequestWithContext(ctx, http.MethodPost, "http://"+t.srv.addr+"/register?"+q.Encode(), nil)
	})
	wall, srvCPU, cliCPU, err := cpu.end()
	if err != nil {
		return res, err
	}
	p50, p99, pmax := percentilesMs(lat)
	res.set("registers_per_s", float64(len(lat))/wall.Seconds())
	res.set("register_p50_ms", p50)
	res.set("register_p99_ms", p99)
	res.set("register_max_ms", pmax)
	res.set("server_cpu_cores", srvCPU.Seconds()/wall.Seconds())
	res.set("client_cpu_cores", cliCPU.Seconds()/wall.Seconds())
	if k := failures.total(); k > 0 {
		res.notes["failures"] = failures.snapshot()
		res.anomaly("%d registers failed: %s", k, failures.String())
	}
	return res, nil
}
