package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// fanout is the lobby broadcast benchmark: -members members in one lobby,
// the first -senders of them sending -size byte binary messages, every
// member receiving every other member's messages.
//
// Two modes:
//
//   - -rate 0, closed loop: each sender keeps at most -window messages in
//     flight, where a message is in flight until every one of its receivers
//     (members-1) has read it. Receivers count reads per sender and sequence
//     number in a ring of -window counters (see fanSender.ack), so the
//     window is exact and costs one atomic add per delivery. Acknowledging
//     on the slowest receiver, rather than on one probe member, keeps the
//     server's queues bounded by senders×window messages per receiver: the
//     mode measures sustained throughput, never a growing backlog or a
//     slow-consumer drop. Latency is then measured from the actual send.
//   - -rate R, open loop: R deliveries/s in total, that is R/(members-1)
//     messages/s spread evenly over the senders on a fixed schedule.
//     Latency is measured from each message's schedule slot, not from when
//     it was actually written, so a sender held up by the server is charged
//     for the wait (no coordinated omission). send_lag_p50/p99_us say how
//     late the writes started: Go timers here wake up to a millisecond or
//     more late (sub-millisecond netpoll timeouts round up to 1 ms), which
//     is the load generator's share of the latency at low rates.
//
// Messages carry the sender, a sequence number and the intended send time
// (putHeader). Receivers check per-sender order, and after the senders stop
// a drain period waits for stragglers before loss is counted.
type fanout struct {
	o       *options
	members int
	senders int
	size    int
	rate    float64
	window  int
	drain   time.Duration
}

func newFanout(fs *flag.FlagSet) bench {
	f := &fanout{}
	fs.IntVar(&f.members, "members", 100, "members in the lobby")
	fs.IntVar(&f.senders, "senders", 10, "how many of the members send")
	fs.IntVar(&f.size, "size", 256, "message size in bytes (at least 21)")
	fs.Float64Var(&f.rate, "rate", 0, "total deliveries/s on a fixed schedule; 0: max rate with -window in flight per sender")
	fs.IntVar(&f.window, "window", 8, "messages in flight per sender at -rate 0")
	fs.DurationVar(&f.drain, "drain", 5*time.Second, "how long to wait for messages in flight after the senders stop")
	return f
}

func (f *fanout) check(o *options) error {
	f.o = o
	switch {
	case f.members < 2:
		return errors.New("-members must be at least 2")
	case f.senders < 1 || f.senders > f.members:
		return errors.New("-senders must be 1 to -members")
	case f.size < headerSize || f.size > 1<<20:
		return fmt.Errorf("-size must be %d to %d", headerSize, 1<<20)
	case f.rate < 0:
		return errors.New("-rate must not be negative")
	case f.window < 1:
		return errors.New("-window must be at least 1")
	case f.rate > 0 && f.interval() < float64(time.Microsecond):
		return errors.New("-rate too high: under 1µs between one sender's messages")
	}
	return nil
}

// interval is the time between one sender's messages at -rate, in ns.
func (f *fanout) interval() float64 {
	return float64(f.senders) * float64(f.members-1) / f.rate * 1e9
}

func (f *fanout) params() map[string]any {
	return map[string]any{"members": f.members, "senders": f.senders, "size": f.size,
		"rate": f.rate, "window": f.window, "drain": f.drain.String()}
}

func (f *fanout) serverArgs() []string {
	if f.members > 1000 { // wsrouter's default -max-members
		return []string{"-max-members", strconv.Itoa(f.members)}
	}
	return nil
}

func (f *fanout) describe() string {
	mode := fmt.Sprintf("max rate, %d in flight per sender", f.window)
	if f.rate > 0 {
		mode = fmt.Sprintf("%.0f deliveries/s", f.rate)
	}
	return fmt.Sprintf("fanout: %d members, %d senders, %d B, %s", f.members, f.senders, f.size, mode)
}

// fanMember is one lobby member's receiving side.
type fanMember struct {
	c         *websocket.Conn
	recv      atomic.Uint64 // data messages read
	synced    atomic.Bool   // a barrier message arrived
	orderErrs atomic.Uint64 // messages not next in their sender's sequence
	bad       atomic.Uint64 // messages of the wrong size or layout

	// Owned by the reader goroutine until done is closed.
	next []uint64 // per sender: the sequence number expected next
	hist histogram
	done chan struct{}
}

// fanSender is one sending member's state.
type fanSender struct {
	sent atomic.Uint64
	err  error // why the sender stopped early; read after it returns
	// lag is, at -rate, how late each measured message was written after
	// its slot (owned by the sender until it returns): the load
	// generator's own timer lateness, or backpressure from the server.
	lag histogram

	// Closed loop only. sem holds a token per message in flight. acks[i]
	// counts the reads of sequence numbers ≡ i (mod window), cumulatively:
	// sequence number seq is fully read once acks[seq%window] reaches
	// (seq/window+1)×receivers. That is exact without ever resetting a
	// counter: seq+window is only sent after a token is freed, which
	// happens only once some message at or after seq is fully read, and
	// as each receiver reads in order, that means every receiver has
	// already counted seq.
	sem  chan struct{}
	acks []atomic.Int64
}

func (s *fanSender) ack(seq uint64, receivers int) {
	w := uint64(len(s.acks))
	if s.acks[seq%w].Add(1) == int64(seq/w+1)*int64(receivers) {
		<-s.sem
	}
}

// fanRun is the shared state of one run.
type fanRun struct {
	f          *fanout
	clk        clock
	windowFrom atomic.Int64 // latency is recorded for messages intended at or after this
	members    []*fanMember
	senders    []*fanSender
	stopping   atomic.Bool // the run is over: read errors are expected
	closes     tally       // unexpected ends of read loops
}

func (f *fanout) run(ctx context.Context, t *target) (*result, error) {
	res := newResult()
	fr := &fanRun{f: f, clk: newClock()}
	fr.windowFrom.Store(math.MaxInt64)

	r, err := t.register(ctx, "lobby")
	if err != nil {
		return res, err
	}
	conns := make([]*websocket.Conn, f.members)
	stop := make(chan struct{})
	var stopOnce sync.Once
	var sending sync.WaitGroup
	defer func() {
		// Whatever happened: stop the senders, close every connection
		// (which also frees a sender stuck in Write on a stalled server)
		// and wait for the senders to return.
		fr.stopping.Store(true)
		stopOnce.Do(func() { close(stop) })
		closeAll(conns)
		sending.Wait()
	}()
	// The first connect pays bcrypt on wsrouter; the others find the key
	// remembered.
	connectOne := func(i int) error {
		c, err := t.connectOn(ctx, i, r, "", int64(f.size)) // spread over a cluster's nodes
		conns[i] = c
		return err
	}
	t.progress("connecting %d members", f.members)
	if err := connectOne(0); err != nil {
		return res, err
	}
	if err := parallel(ctx, f.members-1, 16, func(i int) error { return connectOne(i + 1) }); err != nil {
		return res, err
	}

	// Senders before receivers: a receiver acknowledges to its sender.
	fr.senders = make([]*fanSender, f.senders)
	for i := range fr.senders {
		s := &fanSender{}
		if f.rate == 0 {
			s.sem = make(chan struct{}, f.window)
			s.acks = make([]atomic.Int64, f.window)
		}
		fr.senders[i] = s
	}
	fr.members = make([]*fanMember, f.members)
	for i, c := range conns {
		fr.members[i] = &fanMember{c: c, next: make([]uint64, f.senders), done: make(chan struct{})}
	}
	for _, m := range fr.members {
		go fr.receive(m)
	}

	if err := fr.barrier(ctx); err != nil {
		return res, err
	}

	// Schedule: warmup, then the measured window; the senders stop at its
	// end.
	start := fr.clk.now()
	from := start + int64(f.o.warmup)
	to := from + int64(f.o.duration)
	fr.windowFrom.Store(from)
	for i, s := range fr.senders {
		sending.Add(1)
		go func() {
			defer sending.Done()
			if f.rate == 0 {
				fr.sendClosedLoop(i, s, to, stop)
			} else {
				fr.sendFixedRate(i, s, start, to, stop)
			}
		}()
	}

	t.progress("sending for %v + %v", f.o.warmup, f.o.duration)
	if err := sleepUntil(ctx, fr.clk, from); err != nil {
		return res, err
	}
	recv0, sent0 := fr.received(), fr.sent()
	cpu, err := startCPU(t.procs()...)
	if err != nil {
		return res, err
	}
	if err := sleepUntil(ctx, fr.clk, to); err != nil {
		return res, err
	}
	recv1, sent1 := fr.received(), fr.sent()
	wall, srvCPU, cliCPU, err := cpu.end()
	if err != nil {
		return res, err
	}
	stopOnce.Do(func() { close(stop) })
	if !waitTimeout(&sending, 10*time.Second) {
		return res, errors.New("senders still blocked in Write 10s after the window: the server stopped reading")
	}
	rss, _ := t.rss()

	// Drain: wait for what is still in flight, until everything arrived,
	// nothing has arrived for a second, or -drain is up.
	sent := fr.sent()
	expected := sent * uint64(f.members-1)
	drainEnd := time.Now().Add(f.drain)
	last, lastChange := fr.received(), time.Now()
	for got := last; got < expected && time.Now().Before(drainEnd) && time.Since(lastChange) < time.Second; got = fr.received() {
		if got != last {
			last, lastChange = got, time.Now()
		}
		time.Sleep(10 * time.Millisecond)
	}
	received := fr.received()

	fr.stopping.Store(true)
	closeAll(conns)
	var hist histogram
	var orderErrs, bad uint64
	for _, m := range fr.members {
		<-m.done
		hist.merge(&m.hist)
		orderErrs += m.orderErrs.Load()
		bad += m.bad.Load()
	}

	deliveries := float64(recv1 - recv0)
	secs := wall.Seconds()
	res.set("deliveries_per_s", deliveries/secs)
	res.set("messages_sent_per_s", float64(sent1-sent0)/secs)
	res.set("latency_p50_us", float64(hist.quantile(0.5))/1e3)
	res.set("latency_p99_us", float64(hist.quantile(0.99))/1e3)
	res.set("latency_max_us", float64(hist.quantile(1))/1e3)
	loss := int64(expected) - int64(received)
	res.set("loss", float64(loss))
	if f.rate > 0 {
		var lag histogram
		for _, s := range fr.senders {
			lag.merge(&s.lag)
		}
		res.set("send_lag_p50_us", float64(lag.quantile(0.5))/1e3)
		res.set("send_lag_p99_us", float64(lag.quantile(0.99))/1e3)
	}
	if deliveries > 0 {
		res.set("server_cpu_us_per_delivery", float64(srvCPU.Microseconds())/deliveries)
	}
	res.set("server_cpu_cores", srvCPU.Seconds()/secs)
	res.set("client_cpu_cores", cliCPU.Seconds()/secs)
	res.set("server_rss_mb", float64(rss)/(1<<20))
	res.notes["messages_sent"] = sent
	res.notes["deliveries_expected"] = expected
	res.notes["deliveries_received"] = received
	res.notes["latency_samples"] = hist.n
	res.notes["window_s"] = secs

	if loss != 0 {
		res.anomaly("loss: %d of %d deliveries missing after the drain", loss, expected)
	}
	if orderErrs > 0 {
		res.anomaly("%d messages out of their sender's order", orderErrs)
	}
	if bad > 0 {
		res.anomaly("%d malformed messages", bad)
	}
	if n := fr.closes.total(); n > 0 {
		res.notes["unexpected_closes"] = fr.closes.snapshot()
		res.anomaly("%d members' connections ended during the run: %s", n, fr.closes.String())
	}
	var stopped tally
	for _, s := range fr.senders {
		if s.err != nil {
			stopped.add(errKind(s.err), s.err)
		}
	}
	if n := stopped.total(); n > 0 {
		res.anomaly("%d senders stopped early: %s", n, stopped.String())
	}
	return res, nil
}

// received is the number of data messages read so far by all members.
func (fr *fanRun) received() uint64 {
	var n uint64
	for _, m := range fr.members {
		n += m.recv.Load()
	}
	return n
}

// sent is the number of messages sent so far by all senders.
func (fr *fanRun) sent() uint64 {
	var n uint64
	for _, s := range fr.senders {
		n += s.sent.Load()
	}
	return n
}

// barrier has member 0 send a barrier message every 20 ms until every
// other member has read one. Reading one proves the member has joined, so
// no measured message can miss it; the reference joins a member only after
// its upgrade, so a dial returning is not enough there.
func (fr *fanRun) barrier(ctx context.Context) error {
	p := make([]byte, fr.f.size)
	putHeader(p, kindSync, 0, 0, 0)
	deadline := time.Now().Add(15 * time.Second)
	for {
		all := true
		for _, m := range fr.members[1:] {
			if !m.synced.Load() {
				all = false
				break
			}
		}
		if all {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("barrier: not every member received within 15s")
		}
		if err := fr.members[0].c.Write(ctx, websocket.MessageBinary, p); err != nil {
			return fmt.Errorf("barrier: %w", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// receive is a member's read loop.
func (fr *fanRun) receive(m *fanMember) {
	defer close(m.done)
	buf := make([]byte, fr.f.size+1)
	receivers := fr.f.members - 1
	closedLoop := fr.f.rate == 0
	for {
		n, err := readMessage(m.c, buf)
		if err != nil {
			if !fr.stopping.Load() {
				fr.closes.add(endKind(err), err)
			}
			return
		}
		now := fr.clk.now()
		kind, s, seq, at, ok := getHeader(buf[:n])
		switch {
		case !ok || n != fr.f.size:
			m.bad.Add(1)
		case kind == kindSync:
			m.synced.Store(true)
		case kind == kindData && int(s) < len(fr.senders):
			if seq != m.next[s] {
				m.orderErrs.Add(1)
			}
			m.next[s] = seq + 1
			if at >= fr.windowFrom.Load() {
				m.hist.record(now - at)
			}
			m.recv.Add(1)
			if closedLoop {
				fr.senders[s].ack(seq, receivers)
			}
		default:
			m.bad.Add(1)
		}
	}
}

// sendClosedLoop sends as fast as the window allows until the clock reaches
// to.
func (fr *fanRun) sendClosedLoop(i int, s *fanSender, to int64, stop <-chan struct{}) {
	c := fr.members[i].c
	p := make([]byte, fr.f.size)
	for seq := uint64(0); ; seq++ {
		select {
		case s.sem <- struct{}{}:
		case <-stop:
			return
		}
		at := fr.clk.now()
		if at >= to {
			return
		}
		putHeader(p, kindData, uint32(i), seq, at)
		if err := c.Write(context.Background(), websocket.MessageBinary, p); err != nil {
			s.err = err
			return
		}
		s.sent.Add(1)
	}
}

// sendFixedRate sends on sender i's schedule from start until to: one
// message every interval, the senders' schedules offset evenly. A sender
// that falls behind sends at once until it has caught up, each message
// still stamped with its slot.
func (fr *fanRun) sendFixedRate(i int, s *fanSender, start, to int64, stop <-chan struct{}) {
	c := fr.members[i].c
	p := make([]byte, fr.f.size)
	interval := fr.f.interval()
	offset := interval * float64(i) / float64(fr.f.senders)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for seq := uint64(0); ; seq++ {
		slot := start + int64(offset+float64(seq)*interval)
		if slot >= to {
			return
		}
		if d := slot - fr.clk.now(); d > 0 {
			timer.Reset(time.Duration(d))
			select {
			case <-timer.C:
			case <-stop:
				return
			}
		}
		now := fr.clk.now()
		if slot >= fr.windowFrom.Load() {
			s.lag.record(now - slot)
		}
		putHeader(p, kindData, uint32(i), seq, slot)
		if err := c.Write(context.Background(), websocket.MessageBinary, p); err != nil {
			s.err = err
			return
		}
		s.sent.Add(1)
	}
}

// sleepUntil sleeps until clk reaches at, or ctx ends.
func sleepUntil(ctx context.Context, clk clock, at int64) error {
	d := time.Duration(at - clk.now())
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
