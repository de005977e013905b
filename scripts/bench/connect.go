package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// connectBench measures connect+close churn at concurrency -c: each cycle
// dials /connect, gets the 101 and closes with a normal close handshake.
// -auth says how each connect proves itself, and may list several modes,
// measured one after another on the same server in each run so that their
// ratios come from one run:
//
//   - key: every connect uses a registration nobody has joined before, so
//     wsrouter runs bcrypt for it (the "first connect" path). Those
//     registrations are made beforehand, outside the measured window: each
//     costs two bcrypt hashes to the connect's one, so making as many as
//     the window consumes takes about twice the window; by default the tool
//     registers for 3×-duration (a 50 % margin, as -c connects in progress
//     hold one each), or makes exactly -regs of them. Should the pool run
//     out anyway the window ends early, and the report says so.
//   - remembered: every connect goes to one registration with the same
//     key, which wsrouter remembers after the first check.
//   - token: every connect goes to one registration with a token from POST
//     /token, checked with a signature and no bcrypt.
//
// The reference has no keys: it gets a fresh room id per connect (key) or
// the same one, and is measured once whatever -auth lists.
type connectBench struct {
	o     *options
	auth  string
	modes []string
	conc  int
	regs  int
}

func newConnect(fs *flag.FlagSet) bench {
	b := &connectBench{}
	fs.StringVar(&b.auth, "auth", "key", "how connects authenticate, a comma list of key (a fresh registration per connect: bcrypt), remembered (one registration, its key remembered) and token (one registration, a token); several are measured one after another in each run")
	fs.IntVar(&b.conc, "c", 8, "connects in progress at once")
	fs.IntVar(&b.regs, "regs", 0, "with -auth key: registrations to make beforehand (0: as many as 3×-duration allows)")
	return b
}

func (b *connectBench) check(o *options) error {
	b.o = o
	switch {
	case b.conc < 1:
		return errors.New("-c must be positive")
	case b.regs < 0:
		return errors.New("-regs must not be negative")
	}
	b.modes = nil
	for m := range strings.SplitSeq(b.auth, ",") {
		switch m = strings.TrimSpace(m); m {
		case "key", "remembered", "token":
			if slices.Contains(b.modes, m) {
				return fmt.Errorf("-auth lists %s twice", m)
			}
			b.modes = append(b.modes, m)
		default:
			return fmt.Errorf("-auth %q: want key, remembered or token", m)
		}
	}
	return nil
}

// maxPool bounds the automatic pool, and sets -max-registrations.
const maxPool = 50000

func (b *connectBench) params() map[string]any {
	return map[string]any{"auth": b.modes, "c": b.conc, "regs": b.regs}
}

func (b *connectBench) serverArgs() []string {
	return []string{"-max-registrations", strconv.Itoa(max(maxPool, b.regs) + 100)}
}

func (b *connectBench) describe() string {
	return fmt.Sprintf("connect: connect+close, auth %s, concurrency %d", strings.Join(b.modes, " then "), b.conc)
}

// run measures each mode in turn. With one mode its figures keep their
// names; with several each is suffixed _<mode>, and token's ratios to the
// others are figures of their own.
func (b *connectBench) run(ctx context.Context, t *target) (*result, error) {
	modes := b.modes
	if t.isRef() {
		modes = modes[:1]
	}
	if len(modes) == 1 {
		return b.runMode(ctx, t, modes[0])
	}
	res, err := runEach(modes, func(m string) (*result, error) { return b.runMode(ctx, t, m) })
	if err != nil {
		return res, err
	}
	if tok, ok := res.figures["connects_per_s_token"]; ok {
		for _, m := range []string{"remembered", "key"} {
			if v := res.figures["connects_per_s_"+m]; v > 0 {
				res.set("token_vs_"+m, tok/v)
			}
		}
	}
	return res, nil
}

// pool hands out registrations; with -repeat=true always the same one.
type pool struct {
	regs   []reg
	repeat bool // hand out regs[0] every time
	next   atomic.Int64
	// fresh, if set, makes one on demand (the reference's room ids).
	fresh func() reg
}

func (p *pool) get() (reg, bool) {
	if p.fresh != nil {
		return p.fresh(), true
	}
	if p.repeat {
		return p.regs[0], true
	}
	i := p.next.Add(1) - 1
	if int(i) >= len(p.regs) {
		return reg{}, false
	}
	return p.regs[i], true
}

// runMode measures connects authenticated one way for -duration.
func (b *connectBench) runMode(ctx context.Context, t *target, mode string) (*result, error) {
	res := newResult()
	p, err := b.pool(ctx, t, mode)
	if err != nil {
		return res, err
	}
	if p.repeat {
		// One connect first, so that a key is remembered (and every
		// mode has the same warm start) before the window.
		c, err := t.connect(ctx, p.regs[0], "", 0)
		if err != nil {
			return res, fmt.Errorf("first connect: %w", err)
		}
		c.Close(websocket.StatusNormalClosure, "")
	}

	t.progress("%s: connecting and closing for %v, %d at once", mode, b.o.duration, b.conc)
	var (
		failures, closeErrs tally
		exhausted           atomic.Bool
		mu                  sync.Mutex
		dials, cycles       []time.Duration
		wg                  sync.WaitGroup
	)
	cpu, err := startCPU(t.srv)
	if err != nil {
		return res, err
	}
	deadline := time.Now().Add(b.o.duration)
	for range b.conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var myDials, myCycles []time.Duration
			defer func() {
				mu.Lock()
				dials, cycles = append(dials, myDials...), append(cycles, myCycles...)
				mu.Unlock()
			}()
			for time.Now().Before(deadline) && ctx.Err() == nil {
				r, ok := p.get()
				if !ok {
					exhausted.Store(true)
					return
				}
				t0 := time.Now()
				c, err := t.connect(ctx, r, "", 0)
				if err != nil {
					failures.add(failKind(err), err)
					continue
				}
				dial := time.Since(t0)
				if err := c.Close(websocket.StatusNormalClosure, ""); err != nil {
					closeErrs.add(errKind(err), err)
					c.CloseNow()
					continue
				}
				myDials = append(myDials, dial)
				myCycles = append(myCycles, time.Since(t0))
			}
		}()
	}
	wg.Wait()
	// The window ends when the last cycle started before the deadline
	// has finished: every cycle counted is inside it.
	wall, srvCPU, cliCPU, err := cpu.end()
	if err != nil {
		return res, err
	}
	if ctx.Err() != nil {
		return res, ctx.Err()
	}

	n := len(cycles)
	d50, d99, dmax := percentilesMs(dials)
	c50, c99, _ := percentilesMs(cycles)
	res.set("connects_per_s", float64(n)/wall.Seconds())
	res.set("connect_p50_ms", d50)
	res.set("connect_p99_ms", d99)
	res.set("connect_max_ms", dmax)
	res.set("cycle_p50_ms", c50)
	res.set("cycle_p99_ms", c99)
	if n > 0 {
		res.set("server_cpu_us_per_connect", float64(srvCPU.Microseconds())/float64(n))
	}
	res.set("server_cpu_cores", srvCPU.Seconds()/wall.Seconds())
	res.set("client_cpu_cores", cliCPU.Seconds()/wall.Seconds())
	res.set("failed_connects", float64(failures.total()))
	res.notes["cycles"] = n
	res.notes["window_s"] = wall.Seconds()
	if exhausted.Load() {
		res.notes["pool_exhausted"] = true
		res.anomaly("the %d pre-made registrations ran out after %v; the window was shortened (raise -regs)", len(p.regs), wall.Round(time.Millisecond))
	}
	if k := failures.total(); k > 0 {
		res.notes["connect_failures"] = failures.snapshot()
		res.anomaly("%d connects failed: %s", k, failures.String())
	}
	if k := closeErrs.total(); k > 0 {
		res.notes["close_failures"] = closeErrs.snapshot()
		res.anomaly("%d close handshakes failed: %s", k, closeErrs.String())
	}
	return res, nil
}

// pool makes the registrations the run will use.
func (b *connectBench) pool(ctx context.Context, t *target, mode string) (*pool, error) {
	switch {
	case t.isRef() && mode != "key":
		return &pool{regs: []reg{{id: randHex(16), key: "unused"}}, repeat: true}, nil
	case t.isRef():
		return &pool{fresh: func() reg { return reg{id: randHex(16), key: "unused"} }}, nil
	case mode == "remembered":
		r, err := t.register(ctx, "lobby")
		return &pool{regs: []reg{r}, repeat: true}, err
	case mode == "token":
		r, err := t.register(ctx, "lobby")
		if err != nil {
			return nil, err
		}
		r, err = t.mint(ctx, r, "member", "")
		return &pool{regs: []reg{r}, repeat: true}, err
	}
	// Registering hashes two keys on the server's small bcrypt pool: a
	// few at once keep it busy without making a request wait so long
	// that the server answers 503.
	const conc = 4
	if b.regs > 0 {
		t.progress("registering %d lobbies", b.regs)
		regs, err := t.registerMany(ctx, b.regs, conc, "lobby")
		return &pool{regs: regs}, err
	}
	limit := 3 * b.o.duration
	t.progress("registering lobbies for %v", limit)
	rctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	var mu sync.Mutex
	var regs []reg
	err := parallel(rctx, maxPool, conc, func(int) error {
		r, err := t.register(rctx, "lobby")
		if err != nil {
			return err
		}
		mu.Lock()
		regs = append(regs, r)
		mu.Unlock()
		return nil
	})
	if err != nil && rctx.Err() == nil {
		return nil, err
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	if len(regs) < 2 {
		return nil, errors.New("could not register more than one lobby; raise -duration or set -regs")
	}
	t.progress("%d lobbies registered", len(regs))
	return &pool{regs: regs}, nil
}
