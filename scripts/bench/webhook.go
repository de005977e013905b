package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// webhookBench measures message webhooks: -members clients of one
// hostclient registration (no host, so nothing is forwarded: the webhook is
// the only work) send in a closed loop, at most -window messages each ahead
// of what a Go receiver in this process has been sent (it answers every
// event 204 at once and counts them). Without the window the senders would
// fill their sockets' buffers (the router stops reading a sender whose
// events pile up) and the load generator would take the CPU. Loss is events
// sent but never received after a drain.
type webhookBench struct {
	o       *options
	members int
	size    int
	window  int
}

func newWebhook(fs *flag.FlagSet) bench {
	b := &webhookBench{}
	fs.IntVar(&b.members, "members", 100, "members sending")
	fs.IntVar(&b.size, "size", 64, "message size in bytes")
	fs.IntVar(&b.window, "window", 8, "messages each member may have sent beyond what the receiver got")
	return b
}

func (b *webhookBench) check(o *options) error {
	b.o = o
	if b.members < 1 || b.size < 1 {
		return errors.New("-members and -size must be positive")
	}
	if o.targets != kindWsrouter {
		return errors.New("webhook measures wsrouter only: add -targets wsrouter")
	}
	return nil
}

func (b *webhookBench) params() map[string]any {
	return map[string]any{"members": b.members, "size": b.size}
}

func (b *webhookBench) serverArgs() []string {
	return []string{"-webhook-allow", "127.0.0.1", "-max-members", strconv.Itoa(b.members + 10)}
}

func (b *webhookBench) describe() string {
	return fmt.Sprintf("webhook: message events from %d members to a receiver that answers 204 at once", b.members)
}

func (b *webhookBench) run(ctx context.Context, t *target) (*result, error) {
	res := newResult()
	var received atomic.Int64
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return res, err
	}
	recv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		if strings.Contains(r.Header.Get("webhook-id"), "msg_") {
			received.Add(1)
		}
		w.WriteHeader(http.StatusNoContent)
	})}
	go recv.Serve(ln)
	defer recv.Close()

	key := randHex(16)
	q := url.Values{"key": {key}, "host_key": {randHex(16)}, "reg_type": {"hostclient"},
		"webhook": {"http://" + ln.Addr().String() + "/hook"}, "webhook_secret": {randHex(16)}, "webhook_events": {"message"}}
	resp, err := t.dial.client().Post("http://"+t.srv.addr+"/register?"+q.Encode(), "", nil)
	if err != nil {
		return res, err
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return res, fmt.Errorf("register: %s %s", resp.Status, body)
	}
	r := reg{id: string(body), key: key}

	conns := make([]*websocket.Conn, b.members)
	for i := range conns {
		if conns[i], err = t.connect(ctx, r, "client", 0); err != nil {
			return res, err
		}
		defer conns[i].CloseNow()
	}
	msg := []byte(strings.Repeat("x", b.size))
	t.progress("%d members sending for %v", b.members, b.o.duration)
	var sent atomic.Int64
	var failures tally
	cpu, err := startCPU(t.srv)
	if err != nil {
		return res, err
	}
	start := received.Load()
	deadline := time.Now().Add(b.o.duration)
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() {
			for time.Now().Before(deadline) && ctx.Err() == nil {
				if sent.Load()-(received.Load()-start) >= int64(b.members*b.window) {
					time.Sleep(100 * time.Microsecond) // the window is full
					continue
				}
				wctx, cancel := context.WithDeadline(ctx, deadline.Add(time.Second))
				err := c.Write(wctx, websocket.MessageText, msg)
				cancel()
				if err != nil {
					if time.Now().Before(deadline) {
						failures.add(errKind(err), err)
					}
					return
				}
				sent.Add(1)
			}
		})
	}
	wg.Wait()
	wall, srvCPU, cliCPU, err := cpu.end()
	if err != nil {
		return res, err
	}
	got := received.Load() - start
	// Drain: events the router still holds arrive now.
	for wait := time.Now().Add(10 * time.Second); received.Load()-start < sent.Load() && time.Now().Before(wait); {
		time.Sleep(20 * time.Millisecond)
	}
	res.set("events_per_s", float64(got)/wall.Seconds())
	res.set("sent_per_s", float64(sent.Load())/wall.Seconds())
	res.set("loss", float64(sent.Load()-(received.Load()-start)))
	res.set("server_cpu_cores", srvCPU.Seconds()/wall.Seconds())
	res.set("server_cpu_us_per_event", float64(srvCPU.Microseconds())/float64(max(got, 1)))
	res.set("client_cpu_cores", cliCPU.Seconds()/wall.Seconds())
	if k := failures.total(); k > 0 {
		res.notes["failures"] = failures.snapshot()
		res.anomaly("%d senders failed: %s", k, failures.String())
	}
	return res, nil
}
