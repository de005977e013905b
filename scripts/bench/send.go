package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// sendBench measures the backend API: -members members join one lobby and
// read everything; -c backends POST /send to one member chosen at random by
// its connection id, in a closed loop, with the host key. Each message must
// reach its member: the tool counts what the members receive. The
// reference has no backend API: measure wsrouter only (-targets wsrouter).
type sendBench struct {
	o       *options
	members int
	conc    int
	size    int
}

func newSend(fs *flag.FlagSet) bench {
	b := &sendBench{}
	fs.IntVar(&b.members, "members", 1000, "members in the lobby")
	fs.IntVar(&b.conc, "c", 50, "/send requests in progress at once")
	fs.IntVar(&b.size, "size", 256, "message size in bytes")
	return b
}

func (b *sendBench) check(o *options) error {
	b.o = o
	switch {
	case b.members < 1 || b.conc < 1 || b.size < 1:
		return errors.New("-members, -c and -size must be positive")
	case o.targets != kindWsrouter:
		return errors.New("send measures wsrouter only: add -targets wsrouter")
	}
	return nil
}

func (b *sendBench) params() map[string]any {
	return map[string]any{"members": b.members, "c": b.conc, "size": b.size}
}

func (b *sendBench) serverArgs() []string {
	return []string{"-max-members", strconv.Itoa(b.members + 10)}
}

func (b *sendBench) describe() string {
	return fmt.Sprintf("send: POST /send to one of %d members by connection id, concurrency %d, %d B", b.members, b.conc, b.size)
}

func (b *sendBench) run(ctx context.Context, t *target) (*result, error) {
	res := newResult()
	hostKey := randHex(16)
	r := reg{key: randHex(16)}
	q := url.Values{"key": {r.key}, "host_key": {hostKey}, "reg_type": {"lobby"}}
	resp, err := t.dial.client().Post("http://"+t.srv.addr+"/register?"+q.Encode(), "", nil)
	if err != nil {
		return res, err
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return res, fmt.Errorf("register: %s", resp.Status)
	}
	r.id = string(body)

	t.progress("%d members joining", b.members)
	ids := make([]string, b.members)
	var received atomic.Int64
	var readers sync.WaitGroup
	rctx, stopReaders := context.WithCancel(ctx)
	defer func() { stopReaders(); readers.Wait() }()
	for i := range b.members {
		u := "ws://" + t.srv.addr + "/connect?" + url.Values{"id": {r.id}, "key": {r.key}}.Encode()
		c, resp, err := websocket.Dial(ctx, u, &websocket.DialOptions{HTTPClient: t.dial.client()})
		if err != nil {
			return res, fmt.Errorf("member %d: %w", i, err)
		}
		ids[i] = resp.Header.Get("X-Connection-Id")
		readers.Go(func() {
			defer c.CloseNow()
			for {
				if _, _, err := c.Read(rctx); err != nil {
					return
				}
				received.Add(1)
			}
		})
	}

	msg := strings.Repeat("x", b.size)
	t.progress("sending for %v, %d at once", b.o.duration, b.conc)
	var failures tally
	cpu, err := startCPU(t.srv)
	if err != nil {
		return res, err
	}
	lat := t.closedLoop(ctx, b.conc, time.Now().Add(b.o.duration), &failures, func() (*http.Request, error) {
		u := "http://" + t.srv.addr + "/send?" + url.Values{"id": {r.id}, "conn": {ids[rand.IntN(len(ids))]}}.Encode()
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, strings.NewReader(msg))
		if err == nil {
			req.Header.Set("X-Host-Key", hostKey)
			req.Header.Set("Content-Type", "text/plain")
		}
		return req, err
	})
	wall, srvCPU, cliCPU, err := cpu.end()
	if err != nil {
		return res, err
	}
	// Let the last messages arrive, then count what was lost.
	sent := int64(len(lat))
	for wait := time.Now().Add(5 * time.Second); received.Load() < sent && time.Now().Before(wait); {
		time.Sleep(10 * time.Millisecond)
	}
	p50, p99, pmax := percentilesMs(lat)
	res.set("sends_per_s", float64(sent)/wall.Seconds())
	res.set("send_p50_ms", p50)
	res.set("send_p99_ms", p99)
	res.set("send_max_ms", pmax)
	res.set("loss", float64(sent-received.Load()))
	res.set("server_cpu_cores", srvCPU.Seconds()/wall.Seconds())
	res.set("server_cpu_us_per_send", float64(srvCPU.Microseconds())/float64(max(sent, 1)))
	res.set("client_cpu_cores", cliCPU.Seconds()/wall.Seconds())
	if k := failures.total(); k > 0 {
		res.notes["failures"] = failures.snapshot()
		res.anomaly("%d sends failed: %s", k, failures.String())
	}
	return res, nil
}
