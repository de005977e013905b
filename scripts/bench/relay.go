package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"wsrouter/client"
)

// Targets from the issue that asked for this scenario.
const (
	goalRateConc  = 50  // relay round trips/s at -c 50 …
	goalRateRatio = 0.4 // … at least this times direct's
	goalP99Conc   = 1   // relay p99 at -c 1 …
	goalP99Ms     = 2.0 // … under this many milliseconds
)

// relayBench measures HTTP relayed to a device (docs/protocol.md §7) beside the same
// handler served directly. -c HTTP clients each run a closed loop: GET
// /relay/{id}/reading?key=…, read the whole answer, send the next. On
// wsrouter the request becomes a frame to the one host of a hostclient
// registration; that host is a device written here, in this process, which
// answers each frame by rid with a JSON reading, as examples/device's
// /reading does. The reference is this program's directserver mode: a plain
// net/http server answering GET /reading with the same body, measured with
// the same loop. So the ratio is what the router (two extra hops on
// loopback, a WebSocket frame each way, JSON both ways) costs a caller over
// reaching the device directly.
//
// Server CPU is the server process's only: on wsrouter the host's work is in
// this process, in client_cpu_cores.
type relayBench struct {
	o           *options
	conc        int
	hostWorkers int
	host        string
	timeout     time.Duration
}

func newRelay(fs *flag.FlagSet) bench {
	b := &relayBench{}
	fs.IntVar(&b.conc, "c", 1, "HTTP clients, each with one request in flight (closed loop)")
	fs.IntVar(&b.hostWorkers, "host-workers", 4, "goroutines of the host answering relay frames (0: answer in its read loop)")
	fs.DurationVar(&b.timeout, "request-timeout", 15*time.Second, "HTTP client timeout per request")
	fs.StringVar(&b.host, "host", "handwritten", "the device: handwritten (frames parsed and built by hand, as examples/device did), serverelay (client.ServeRelay with an http.Handler, -host-workers at once), or both, one after the other in each run (-targets wsrouter)")
	return b
}

func (b *relayBench) check(o *options) error {
	b.o = o
	switch {
	case b.conc < 1 || b.conc > 10000:
		return errors.New("-c must be 1 to 10000")
	case b.hostWorkers < 0 || b.hostWorkers > 1024:
		return errors.New("-host-workers must be 0 to 1024")
	case b.timeout <= 0:
		return errors.New("-request-timeout must be positive")
	case b.host != "handwritten" && b.host != "serverelay" && b.host != "both":
		return fmt.Errorf("-host %q: want handwritten, serverelay or both", b.host)
	case b.host == "both" && o.targets != kindWsrouter:
		return errors.New("-host both needs -targets wsrouter")
	}
	return nil
}

func (b *relayBench) params() map[string]any {
	return map[string]any{"c": b.conc, "host_workers": b.hostWorkers, "host": b.host, "path": readingPath,
		"request_timeout": b.timeout.String()}
}

// serverArgs lets every client have a request pending on the one
// registration (wsrouter's default -relay-max-pending is 100).
func (b *relayBench) serverArgs() []string {
	if b.conc > 100 {
		return []string{"-relay-max-pending", strconv.Itoa(b.conc)}
	}
	return nil
}

func (b *relayBench) reference() refSpec {
	return refSpec{mode: directServerMode, args: []string{}, refName: "direct", wsName: "relay"}
}

func (b *relayBench) describe() string {
	workers := fmt.Sprintf("%d workers", b.hostWorkers)
	if b.hostWorkers == 0 {
		workers = "answering in its read loop"
	}
	return fmt.Sprintf("relay: %d HTTP client(s) in a closed loop, GET /relay/{id}%s via a host in the bench (%s); direct: GET %s on a net/http server",
		b.conc, readingPath, workers, readingPath)
}

func (b *relayBench) goals(rep *report) []goal {
	var rate, p99 *float64
	if r := rep.Ratio["round_trips_per_s"]; r != nil {
		rate = r
	}
	if v, ok := rep.Median[kindWsrouter]["rtt_p99_us"]; ok {
		ms := roundSig(v/1e3, 6)
		p99 = &ms
	}
	return []goal{
		newGoal(fmt.Sprintf("relay round trips/s ≥ %.1f× direct at -c %d", goalRateRatio, goalRateConc),
			b.conc == goalRateConc, goalRateConc, rate, goalRateRatio, "×", func(v float64) bool { return v >= goalRateRatio }),
		newGoal(fmt.Sprintf("relay p99 < %.0f ms at -c %d", goalP99Ms, goalP99Conc),
			b.conc == goalP99Conc, goalP99Conc, p99, goalP99Ms, " ms", func(v float64) bool { return v < goalP99Ms }),
	}
}

func newGoal(name string, applies bool, conc int, v *float64, limit float64, unit string, ok func(float64) bool) goal {
	g := goal{Name: name, Applies: applies, Value: v, Limit: limit, Unit: unit, Status: "unknown (figure missing)"}
	if v == nil {
		return g
	}
	met := ok(*v)
	g.Met = &met
	g.Status = map[bool]string{true: "met", false: "MISSED"}[met]
	if !applies {
		g.Status = fmt.Sprintf("%s, but not applicable (stated for -c %d)", map[bool]string{true: "met", false: "missed"}[met], conc)
	}
	return g
}

// relayClient is one closed-loop HTTP client.
type relayClient struct {
	done atomic.Uint64 // 200 answers fully read
	// Owned by the client's goroutine until it returns.
	hist histogram
	errs uint64
}

func (b *relayBench) run(ctx context.Context, t *target) (*result, error) {
	if b.host != "both" || t.isRef() {
		host := b.host
		if host == "both" {
			host = "handwritten"
		}
		return b.runHost(ctx, t, host)
	}
	res, err := runEach([]string{"handwritten", "serverelay"}, func(h string) (*result, error) { return b.runHost(ctx, t, h) })
	if err != nil {
		return res, err
	}
	if hw := res.figures["round_trips_per_s_handwritten"]; hw > 0 {
		res.set("serverelay_vs_handwritten", res.figures["round_trips_per_s_serverelay"]/hw)
	}
	return res, nil
}

func (b *relayBench) runHost(ctx context.Context, t *target, host string) (*result, error) {
	res := newResult()
	clk := newClock()
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()

	// One transport for all clients, keeping a connection per client
	// alive; connections come from the client source addresses in turn.
	var nextSrc atomic.Uint64
	srcs := make([]*net.Dialer, b.o.srcIPs)
	for i := range srcs {
		srcs[i] = sourceDialer(i)
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return srcs[nextSrc.Add(1)%uint64(len(srcs))].DialContext(ctx, network, addr)
		},
		MaxIdleConns:        b.conc + 16,
		MaxIdleConnsPerHost: b.conc + 16,
		IdleConnTimeout:     time.Minute,
		DisableCompression:  true,
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: b.timeout}

	var u string
	if t.isRef() {
		u = "http://" + t.srv.addr + readingPath + "?key=" + randHex(16)
	} else {
		start := b.startHost
		if host == "serverelay" {
			start = b.startServeRelay
		}
		r, stop, err := start(ctx, t, res)
		if stop != nil {
			defer stop()
		}
		if err != nil {
			return res, err
		}
		u = "http://" + t.srv.addr + "/relay/" + r.id + readingPath + "?key=" + url.QueryEscape(r.key)
	}

	// Barrier: the host may not be joined yet when its dial returns (503
	// no host); the first answer proves it is, and shows the body.
	t.progress("waiting for a first answer")
	deadline := time.Now().Add(15 * time.Second)
	for {
		status, body, err := getOnce(runCtx, client, u)
		if err == nil && status == http.StatusOK {
			if !bytes.Contains(body, []byte(`"temperature"`)) {
				return res, fmt.Errorf("first answer is not a reading: %q", body)
			}
			res.notes["response_body"] = string(body)
			break
		}
		if time.Now().After(deadline) {
			return res, fmt.Errorf("no 200 answer within 15s: status %d, %v, %q", status, err, body)
		}
		select {
		case <-runCtx.Done():
			return res, runCtx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}

	start := clk.now()
	from := start + int64(b.o.warmup)
	to := from + int64(b.o.duration)
	cs := make([]*relayClient, b.conc)
	var failures tally
	var clients sync.WaitGroup
	for i := range cs {
		c := &relayClient{}
		cs[i] = c
		clients.Add(1)
		go func() {
			defer clients.Done()
			req, err := http.NewRequestWithContext(runCtx, http.MethodGet, u, nil)
			if err != nil {
				failures.add("bad request", err)
				c.errs++
				return
			}
			for runCtx.Err() == nil {
				at := clk.now()
				if at >= to {
					return
				}
				resp, err := client.Do(req)
				if err != nil {
					if runCtx.Err() != nil {
						return
					}
					failures.add(errKind(err), err)
					c.errs++
					// Do not spin on a refused or reset connection.
					time.Sleep(10 * time.Millisecond)
					continue
				}
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				now := clk.now()
				switch {
				case err != nil:
					failures.add("body: "+errKind(err), err)
					c.errs++
				case resp.StatusCode != http.StatusOK:
					failures.add(fmt.Sprintf("http %d", resp.StatusCode), nil)
					c.errs++
				default:
					if at >= from {
						c.hist.record(now - at)
					}
					c.done.Add(1)
				}
			}
		}()
	}

	t.progress("%d client(s) for %v + %v", b.conc, b.o.warmup, b.o.duration)
	if err := sleepUntil(ctx, clk, from); err != nil {
		return res, err
	}
	done := func() (n uint64) {
		for _, c := range cs {
			n += c.done.Load()
		}
		return n
	}
	done0 := done()
	cpu, err := startCPU(t.srv)
	if err != nil {
		return res, err
	}
	if err := sleepUntil(ctx, clk, to); err != nil {
		return res, err
	}
	done1 := done()
	wall, srvCPU, cliCPU, err := cpu.end()
	if err != nil {
		return res, err
	}
	rss, _ := t.srv.rss()
	// Each client ends after its request in flight; a stuck one is cut
	// off.
	if !waitTimeout(&clients, b.timeout+2*time.Second) {
		res.anomaly("clients still waiting %v after the window; cancelled", b.timeout+2*time.Second)
		cancel()
		clients.Wait()
	}

	var hist histogram
	var errs uint64
	for _, c := range cs {
		hist.merge(&c.hist)
		errs += c.errs
	}
	trips := float64(done1 - done0)
	secs := wall.Seconds()
	res.set("round_trips_per_s", trips/secs)
	res.set("rtt_p50_us", float64(hist.quantile(0.5))/1e3)
	res.set("rtt_p99_us", float64(hist.quantile(0.99))/1e3)
	res.set("rtt_max_us", float64(hist.quantile(1))/1e3)
	if trips > 0 {
		res.set("server_cpu_us_per_request", float64(srvCPU.Microseconds())/trips)
	}
	res.set("server_cpu_cores", srvCPU.Seconds()/secs)
	res.set("client_cpu_cores", cliCPU.Seconds()/secs)
	res.set("server_rss_mb", float64(rss)/(1<<20))
	res.set("errors", float64(errs))
	res.notes["round_trips"] = done()
	res.notes["window_s"] = secs
	if errs > 0 {
		res.notes["errors_by_kind"] = failures.snapshot()
		res.anomaly("%d requests failed or were not 200: %s", errs, failures.String())
	}
	return res, nil
}

// getOnce GETs u and returns the status and the start of the body.
func getOnce(ctx context.Context, client *http.Client, u string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, body, err
}

// relayHost is the device: the one host of the relay registration.
type relayHost struct {
	ws       *websocket.Conn
	start    time.Time
	answered atomic.Uint64
	ignored  atomic.Uint64 // frames that were not relay requests
	bad      atomic.Uint64 // requests for anything but GET /reading (404)
}

// relayRequest is the part of a relay frame the host reads.
type relayRequest struct {
	RID    string `json:"rid"`
	Method string `json:"method"`
	Path   string `json:"path"`
}

// startHost registers a hostclient registration on wsrouter and connects
// the host, whose read loop (and workers) run until stop is called.
func (b *relayBench) startHost(ctx context.Context, t *target, res *result) (reg, func(), error) {
	t.progress("registering and connecting the host")
	r, err := t.register(ctx, "hostclient")
	if err != nil {
		return r, nil, err
	}
	ws, err := t.connect(ctx, r, "host", 64<<10)
	if err != nil {
		return r, nil, err
	}
	h := &relayHost{ws: ws, start: time.Now()}
	var stopping atomic.Bool
	var closes tally
	var loops sync.WaitGroup
	work := make(chan relayRequest, 4*b.conc+64)

	for range b.hostWorkers {
		loops.Add(1)
		go func() {
			defer loops.Done()
			buf := make([]byte, 0, 256)
			for req := range work {
				buf = h.reply(buf[:0], req)
				if err := ws.Write(context.Background(), websocket.MessageText, buf); err != nil {
					if !stopping.Load() {
						closes.add("write: "+endKind(err), err)
					}
					return
				}
			}
		}()
	}
	loops.Add(1)
	go func() { // the read loop
		defer loops.Done()
		defer close(work)
		buf := make([]byte, 64<<10+1)
		out := make([]byte, 0, 256)
		for {
			n, err := readMessage(ws, buf)
			if err != nil {
				if !stopping.Load() {
					closes.add(endKind(err), err)
				}
				return
			}
			var req relayRequest
			if json.Unmarshal(buf[:n], &req) != nil || !isHex(req.RID) || req.Method == "" {
				h.ignored.Add(1)
				continue
			}
			if b.hostWorkers > 0 {
				work <- req
				continue
			}
			out = h.reply(out[:0], req)
			if err := ws.Write(context.Background(), websocket.MessageText, out); err != nil {
				if !stopping.Load() {
					closes.add("write: "+endKind(err), err)
				}
				return
			}
		}
	}()

	stop := func() {
		stopping.Store(true)
		ws.CloseNow()
		loops.Wait()
		res.notes["host_answered"] = h.answered.Load()
		if n := h.ignored.Load(); n > 0 {
			res.notes["host_ignored_frames"] = n
			res.anomaly("the host got %d frames that were not relay requests", n)
		}
		if n := h.bad.Load(); n > 0 {
			res.anomaly("the host got %d requests for something other than GET %s", n, readingPath)
		}
		if n := closes.total(); n > 0 {
			res.notes["host_unexpected_end"] = closes.snapshot()
			res.anomaly("the host connection ended during the run: %s", closes.String())
		}
	}
	return r, stop, nil
}

// startServeRelay is startHost with the client library's device side: a
// client.Conn answering with client.ServeRelay and an http.Handler for GET
// /reading, -host-workers requests at once.
func (b *relayBench) startServeRelay(ctx context.Context, t *target, res *result) (reg, func(), error) {
	t.progress("registering and connecting the host (client.ServeRelay)")
	r, err := t.register(ctx, "hostclient")
	if err != nil {
		return r, nil, err
	}
	conn, err := client.Dial(ctx, client.Options{URL: "http://" + t.srv.addr, ID: r.id, Key: r.key, Role: "host", HTTPClient: t.dial.client()})
	if err != nil {
		return r, nil, err
	}
	started := time.Now()
	var answered atomic.Uint64
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+readingPath, func(w http.ResponseWriter, _ *http.Request) {
		answered.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Write(appendReading(nil, time.Since(started)))
	})
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		client.ServeRelay(sctx, conn, mux, &client.RelayOptions{Concurrency: max(b.hostWorkers, 1)})
	}()
	stop := func() {
		cancel()
		<-done
		conn.Close()
		res.notes["host_answered"] = answered.Load()
	}
	return r, stop, nil
}

// reply appends the answer frame to req to b: the reading for GET /reading,
// else a 404, as examples/device answers.
func (h *relayHost) reply(b []byte, req relayRequest) []byte {
	h.answered.Add(1)
	b = append(b, `{"rid":"`...)
	b = append(b, req.RID...) // hex: nothing to escape
	if req.Method != http.MethodGet || req.Path != readingPath {
		h.bad.Add(1)
		return append(b, `","status":404,"type":"text","content":"no such page on this device\n"}`...)
	}
	b = append(b, `","status":200,"type":"json","content":`...)
	b = appendReading(b, time.Since(h.start))
	return append(b, '}')
}

func isHex(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') && (c < 'A' || c > 'F') {
			return false
		}
	}
	return true
}
