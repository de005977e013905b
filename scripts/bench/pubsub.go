package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// pubsubBench measures pub/sub registrations on wsrouter alone (-targets
// wsrouter), in two shapes:
//
//   - fan-out (default): -members members, the first -publishers of them
//     publishing -size bytes of data to one event that every member
//     subscribes to, closed loop with -window publishes in flight per
//     publisher. The same run then does the same with a lobby of the same
//     size (plain binary messages, every other member receiving), so that
//     pubsub_vs_lobby compares the two in one run: what the JSON actions
//     and the envelope cost. In pub/sub a publisher hears its own publish
//     (it subscribed), so a publish has members receivers, a lobby message
//     members-1.
//   - -wild: -members members, each with -subs random wildcard
//     subscriptions over events s.<a>.<b> (a, b < 32); publishers publish to
//     random literal events. The tool knows every subscription, so it knows
//     how many members each publish must reach, and a publish is in flight
//     until all of them have read it.
//
// The data carries the publisher, a sequence number and the send time, as
// hex at the start of the data string, so a receiver finds it without
// parsing the envelope.
type pubsubBench struct {
	o          *options
	members    int
	publishers int
	size       int
	window     int
	wild       bool
	subs       int
}

func newPubSub(fs *flag.FlagSet) bench {
	b := &pubsubBench{}
	fs.IntVar(&b.members, "members", 100, "members of the registration")
	fs.IntVar(&b.publishers, "publishers", 10, "how many of the members publish")
	fs.IntVar(&b.size, "size", 256, "bytes of data per publish (at least 42)")
	fs.IntVar(&b.window, "window", 8, "publishes in flight per publisher")
	fs.BoolVar(&b.wild, "wild", false, "each member holds -subs random wildcard subscriptions; publishes go to random literal events")
	fs.IntVar(&b.subs, "subs", 20, "with -wild: subscriptions per member")
	return b
}

func (b *pubsubBench) check(o *options) error {
	b.o = o
	switch {
	case o.targets != kindWsrouter:
		return errors.New("pubsub measures wsrouter against itself: use -targets wsrouter")
	case b.members < 2:
		return errors.New("-members must be at least 2")
	case b.publishers < 1 || b.publishers > b.members:
		return errors.New("-publishers must be 1 to -members")
	case b.size < 2*headerSize || b.size > 1<<20:
		return fmt.Errorf("-size must be %d to %d", 2*headerSize, 1<<20)
	case b.window < 1:
		return errors.New("-window must be at least 1")
	case b.subs < 1 || b.subs > 100:
		return errors.New("-subs must be 1 to 100 (the default -max-subscriptions)")
	}
	return nil
}

func (b *pubsubBench) params() map[string]any {
	return map[string]any{"members": b.members, "publishers": b.publishers, "size": b.size, "window": b.window, "wild": b.wild, "subs": b.subs}
}

func (b *pubsubBench) serverArgs() []string {
	return []string{"-max-members", strconv.Itoa(b.members + 10)}
}

func (b *pubsubBench) describe() string {
	if b.wild {
		return fmt.Sprintf("pubsub: %d members × %d wildcard subscriptions, %d publishers to random events, %d B", b.members, b.subs, b.publishers, b.size)
	}
	return fmt.Sprintf("pubsub: one event, %d subscribers, %d publishers, %d B, beside a lobby of the same size", b.members, b.publishers, b.size)
}

func (b *pubsubBench) run(ctx context.Context, t *target) (*result, error) {
	if b.wild {
		return b.runShape(ctx, t, "wild")
	}
	res, err := runEach([]string{"lobby", "pubsub"}, func(shape string) (*result, error) { return b.runShape(ctx, t, shape) })
	if err != nil {
		return res, err
	}
	if l := res.figures["deliveries_per_s_lobby"]; l > 0 {
		res.set("pubsub_vs_lobby", res.figures["deliveries_per_s_pubsub"]/l)
	}
	if l := res.figures["server_cpu_us_per_delivery_lobby"]; l > 0 {
		res.set("cpu_pubsub_vs_lobby", res.figures["server_cpu_us_per_delivery_pubsub"]/l)
	}
	return res, nil
}

// psSlot is one publish in flight: how many reads it still waits for.
type psSlot struct {
	left atomic.Int32
	done atomic.Pointer[chan struct{}] // closed when left reaches 0
}

// psRun is one shape's run.
type psRun struct {
	b        *pubsubBench
	shape    string // lobby, pubsub or wild
	clk      clock
	from     atomic.Int64 // latency is recorded for publishes sent at or after this
	slots    [][]psSlot   // per publisher, per seq % window
	recv     atomic.Uint64
	synced   atomic.Int64 // members that have read a sync message
	bad      atomic.Uint64
	stopping atomic.Bool
	ends     tally
	mu       sync.Mutex
	hist     histogram // guarded by mu
	// wild: the events, and how many members each reaches.
	events []string
	reach  map[string]int32
}

func (b *pubsubBench) runShape(ctx context.Context, t *target, shape string) (*result, error) {
	res := newResult()
	pr := &psRun{b: b, shape: shape, clk: newClock()}
	pr.from.Store(1 << 62)
	regType := "pubsub"
	if shape == "lobby" {
		regType = "lobby"
	}
	r, err := t.register(ctx, regType)
	if err != nil {
		return res, err
	}
	conns := make([]*websocket.Conn, b.members)
	defer func() { pr.stopping.Store(true); closeAll(conns) }()
	t.progress("%s: connecting %d members", shape, b.members)
	if conns[0], err = t.connect(ctx, r, "", int64(b.size+512)); err != nil {
		return res, err
	}
	if err := parallel(ctx, b.members-1, 16, func(i int) error {
		var err error
		conns[i+1], err = t.connect(ctx, r, "", int64(b.size+512))
		return err
	}); err != nil {
		return res, err
	}

	// Subscriptions: every member to the one event, or -subs random
	// wildcards each. The tool counts who each event reaches.
	subsOf := make([][]string, b.members)
	switch shape {
	case "pubsub":
		for i := range subsOf {
			subsOf[i] = []string{"bench.event"}
		}
	case "wild":
		pr.reach = map[string]int32{}
		for a := range 32 {
			for c := range 32 {
				pr.events = append(pr.events, fmt.Sprintf("s.%d.%d", a, c))
			}
		}
		rng := rand.New(rand.NewPCG(1, 2))
		for i := range subsOf {
			for len(subsOf[i]) < b.subs {
				a, c := strconv.Itoa(rng.IntN(32)), strconv.Itoa(rng.IntN(32))
				p := [...]string{"s." + a + ".*", "s.*." + c, "s." + a + ".>", "s." + a + "." + c}[rng.IntN(4)]
				if !contains(subsOf[i], p) {
					subsOf[i] = append(subsOf[i], p)
				}
			}
		}
		for _, ev := range pr.events {
			for _, subs := range subsOf {
				for _, p := range subs {
					if matchPattern(p, ev) {
						pr.reach[ev]++
						break
					}
				}
			}
		}
	}
	for i, subs := range subsOf {
		for _, p := range subs {
			if err := conns[i].Write(ctx, websocket.MessageText, []byte(`{"action":"subscribe","event":"`+p+`"}`)); err != nil {
				return res, err
			}
		}
	}

	pr.slots = make([][]psSlot, b.publishers)
	for i := range pr.slots {
		pr.slots[i] = make([]psSlot, b.window)
		for j := range pr.slots[i] {
			done := make(chan struct{})
			close(done)
			pr.slots[i][j].done.Store(&done)
		}
	}
	var readers sync.WaitGroup
	for _, c := range conns {
		readers.Go(func() { pr.receive(c) })
	}
	if err := pr.barrier(ctx, conns); err != nil {
		return res, err
	}

	start := pr.clk.now()
	from := start + int64(b.o.warmup)
	to := from + int64(b.o.duration)
	pr.from.Store(from)
	var sent atomic.Uint64
	var sending sync.WaitGroup
	var sendErrs tally
	for i := range b.publishers {
		sending.Go(func() {
			if err := pr.publish(ctx, conns[i], i, to, &sent); err != nil && !pr.stopping.Load() {
				sendErrs.add(errKind(err), err)
			}
		})
	}
	t.progress("%s: publishing for %v + %v", shape, b.o.warmup, b.o.duration)
	if err := sleepUntil(ctx, pr.clk, from); err != nil {
		return res, err
	}
	recv0, sent0 := pr.recv.Load(), sent.Load()
	cpu, err := startCPU(t.srv)
	if err != nil {
		return res, err
	}
	if err := sleepUntil(ctx, pr.clk, to); err != nil {
		return res, err
	}
	recv1, sent1 := pr.recv.Load(), sent.Load()
	wall, srvCPU, cliCPU, err := cpu.end()
	if err != nil {
		return res, err
	}
	if !waitTimeout(&sending, 10*time.Second) {
		return res, errors.New("publishers still blocked 10s after the window")
	}
	pr.stopping.Store(true)
	closeAll(conns)
	readers.Wait()

	secs := wall.Seconds()
	deliveries := float64(recv1 - recv0)
	publishes := float64(sent1 - sent0)
	res.set("deliveries_per_s", deliveries/secs)
	res.set("publishes_per_s", publishes/secs)
	if deliveries > 0 {
		res.set("server_cpu_us_per_delivery", float64(srvCPU.Microseconds())/deliveries)
	}
	if publishes > 0 {
		res.set("server_cpu_us_per_publish", float64(srvCPU.Microseconds())/publishes)
		res.set("deliveries_per_publish", deliveries/publishes)
	}
	res.set("server_cpu_cores", srvCPU.Seconds()/secs)
	res.set("client_cpu_cores", cliCPU.Seconds()/secs)
	pr.mu.Lock()
	res.set("latency_p50_us", float64(pr.hist.quantile(0.5))/1e3)
	res.set("latency_p99_us", float64(pr.hist.quantile(0.99))/1e3)
	pr.mu.Unlock()
	if n := pr.bad.Load(); n > 0 {
		res.anomaly("%d malformed messages", n)
	}
	if n := pr.ends.total(); n > 0 {
		res.anomaly("%d connections ended during the run: %s", n, pr.ends.String())
	}
	if n := sendErrs.total(); n > 0 {
		res.anomaly("%d publishers stopped early: %s", n, sendErrs.String())
	}
	return res, nil
}

// frame is publisher i's message seq stamped at, in the shape's form, and
// the event it goes to (wild).
func (pr *psRun) frame(buf []byte, kind byte, i int, seq uint64, at int64, event string) ([]byte, websocket.MessageType) {
	var h [headerSize]byte
	putHeader(h[:], kind, uint32(i), seq, at)
	if pr.shape == "lobby" {
		buf = append(buf[:0], h[:]...)
		for len(buf) < pr.b.size {
			buf = append(buf, 'x')
		}
		return buf, websocket.MessageBinary
	}
	buf = append(buf[:0], `{"action":"publish","event":"`...)
	buf = append(buf, event...)
	buf = append(buf, `","data":"`...)
	n := len(buf)
	buf = hex.AppendEncode(buf, h[:])
	for len(buf)-n < pr.b.size {
		buf = append(buf, 'x')
	}
	return append(buf, `"}`...), websocket.MessageText
}

// receivers is how many members read publisher i's message to event.
func (pr *psRun) receivers(event string) int32 {
	switch pr.shape {
	case "lobby":
		return int32(pr.b.members - 1)
	case "pubsub":
		return int32(pr.b.members)
	}
	return pr.reach[event]
}

// publish sends publisher i's messages until the clock reaches to, at most
// -window in flight.
func (pr *psRun) publish(ctx context.Context, c *websocket.Conn, i int, to int64, sent *atomic.Uint64) error {
	var buf []byte
	rng := rand.New(rand.NewPCG(uint64(i), 7))
	for seq := uint64(0); ; seq++ {
		slot := &pr.slots[i][seq%uint64(pr.b.window)]
		select {
		case <-*slot.done.Load():
		case <-ctx.Done():
			return ctx.Err()
		}
		at := pr.clk.now()
		if at >= to {
			return nil
		}
		event := "bench.event"
		if pr.shape == "wild" {
			event = pr.events[rng.IntN(len(pr.events))]
		}
		n := pr.receivers(event)
		if n > 0 {
			done := make(chan struct{})
			slot.left.Store(n)
			slot.done.Store(&done)
		}
		p, typ := pr.frame(buf, kindData, i, seq, at, event)
		buf = p
		if err := c.Write(ctx, typ, p); err != nil {
			return err
		}
		sent.Add(1)
	}
}

// barrier has member 0 send sync messages until every member has read one:
// then every member has joined and subscribed (its subscriptions were sent
// before, on the same connection). In wild, a sync goes to an event that
// every member subscribes to for the purpose.
func (pr *psRun) barrier(ctx context.Context, conns []*websocket.Conn) error {
	if pr.shape == "wild" {
		for _, c := range conns {
			if err := c.Write(ctx, websocket.MessageText, []byte(`{"action":"subscribe","event":"sync"}`)); err != nil {
				return err
			}
		}
	}
	event := "bench.event"
	if pr.shape == "wild" {
		event = "sync"
	}
	deadline := time.Now().Add(30 * time.Second)
	for pr.synced.Load() < int64(len(conns)-1) {
		if time.Now().After(deadline) {
			return fmt.Errorf("barrier: %d of %d members synced in 30s", pr.synced.Load(), len(conns)-1)
		}
		p, typ := pr.frame(nil, kindSync, 0, 0, 0, event)
		if err := conns[0].Write(ctx, typ, p); err != nil {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

// receive is one member's read loop.
func (pr *psRun) receive(c *websocket.Conn) {
	buf := make([]byte, pr.b.size+1024)
	var hist histogram
	sawSync := false
	defer func() {
		pr.mu.Lock()
		pr.hist.merge(&hist)
		pr.mu.Unlock()
	}()
	var h [headerSize]byte
	for {
		n, err := readMessage(c, buf)
		if err != nil {
			if !pr.stopping.Load() {
				pr.ends.add(endKind(err), err)
			}
			return
		}
		now := pr.clk.now()
		msg := buf[:n]
		if pr.shape != "lobby" {
			i := bytes.Index(msg, []byte(`"data":"`))
			if i < 0 || len(msg) < i+8+2*headerSize {
				if bytes.Contains(msg, []byte(`"error"`)) {
					pr.ends.add("error reply", errors.New(string(msg)))
				} else {
					pr.bad.Add(1)
				}
				continue
			}
			if _, err := hex.Decode(h[:], msg[i+8:i+8+2*headerSize]); err != nil {
				pr.bad.Add(1)
				continue
			}
			msg = h[:]
		}
		kind, s, seq, at, ok := getHeader(msg)
		switch {
		case !ok:
			pr.bad.Add(1)
		case kind == kindSync:
			if !sawSync {
				sawSync = true
				pr.synced.Add(1)
			}
		case kind == kindData && int(s) < len(pr.slots):
			if at >= pr.from.Load() {
				hist.record(now - at)
			}
			pr.recv.Add(1)
			slot := &pr.slots[s][seq%uint64(pr.b.window)]
			if slot.left.Add(-1) == 0 {
				close(*slot.done.Load())
			}
		default:
			pr.bad.Add(1)
		}
	}
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// matchPattern is the tool's own matcher for NATS-style patterns, to count
// who an event must reach; it is written apart from the server's on purpose.
func matchPattern(pattern, event string) bool {
	p, e := strings.Split(pattern, "."), strings.Split(event, ".")
	for i, tok := range p {
		switch {
		case tok == ">":
			return len(e) > i
		case i >= len(e):
			return false
		case tok != "*" && tok != e[i]:
			return false
		}
	}
	return len(p) == len(e)
}
