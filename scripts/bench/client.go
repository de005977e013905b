package main

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coder/websocket"
)

// ipBindAddressNoPort is Linux's IP_BIND_ADDRESS_NO_PORT (not in package
// syscall): bind a source address now but pick the port at connect time,
// from the whole 4-tuple, as an unbound socket would.
const ipBindAddressNoPort = 24

// dialer opens the clients' connections, spreading them over the source
// addresses 127.0.0.2, 127.0.0.3, …: one address pair has only about 28,000
// ephemeral ports, which 10,000s of idle connections or a few seconds of
// connect churn (each close leaves a TIME_WAIT socket) would use up. All
// traffic stays on 127.0.0.0/8.
type dialer struct {
	clients []*http.Client
	next    atomic.Uint64
}

func newDialer(n int) *dialer {
	d := &dialer{}
	for i := range n {
		d.clients = append(d.clients, &http.Client{Transport: &http.Transport{
			DialContext:         sourceDialer(i).DialContext,
			MaxIdleConnsPerHost: 16,
			IdleConnTimeout:     30 * time.Second,
			DisableCompression:  true,
		}})
	}
	return d
}

// sourceDialer dials from the client source address 127.0.0.(2+i).
func sourceDialer(i int) *net.Dialer {
	return &net.Dialer{
		Timeout:   10 * time.Second,
		LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(2+i))},
		Control: func(network, address string, c syscall.RawConn) error {
			// Best effort: without it bind picks the port alone,
			// which only matters near exhaustion.
			return c.Control(func(fd uintptr) {
				syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, ipBindAddressNoPort, 1)
			})
		},
	}
}

// client returns the HTTP client of the next source address.
func (d *dialer) client() *http.Client {
	return d.clients[d.next.Add(1)%uint64(len(d.clients))]
}

func (d *dialer) close() {
	for _, c := range d.clients {
		c.CloseIdleConnections()
	}
}

// target is one started server as the scenarios see it.
type target struct {
	kind string
	name string // in progress lines: kind, or the scenario's label for it
	srv  *serverProc
	dial *dialer
	log  io.Writer
	// restart stops the server and starts it again on the same address
	// and flags (SIGTERM: its members get 1001); srv is then the new one.
	restart func(ctx context.Context) error
	// nodes are a cluster's wsrouter nodes (srv is the first) and others
	// its NATS server (-nodes); both empty for one server.
	nodes, others []*serverProc
	// wsRef: the reference is wsrouter itself (-nodes), not a broadcaster.
	wsRef bool
}

// isRef reports whether the target is the reference broadcaster, which has
// no registrations.
func (t *target) isRef() bool { return t.kind == kindReference && !t.wsRef }

// procs are the target's processes: its servers, then a cluster's NATS.
func (t *target) procs() []*serverProc {
	if len(t.nodes) == 0 {
		return []*serverProc{t.srv}
	}
	return append(append([]*serverProc(nil), t.nodes...), t.others...)
}

// nodeAddr is the address of node i (modulo the nodes) of a cluster, or the
// server's.
func (t *target) nodeAddr(i int) string {
	if len(t.nodes) == 0 {
		return t.srv.addr
	}
	return t.nodes[i%len(t.nodes)].addr
}

// rss is the resident memory of all the target's processes.
func (t *target) rss() (int64, error) {
	var sum int64
	for _, p := range t.procs() {
		n, err := p.rss()
		if err != nil {
			return sum, err
		}
		sum += n
	}
	return sum, nil
}

func (t *target) progress(format string, args ...any) {
	fmt.Fprintf(t.log, "  %s: %s\n", cmp.Or(t.name, t.kind), fmt.Sprintf(format, args...))
}

// reg is a registration to connect to: its id and keys, and the token to
// connect with instead of the key, if set.
type reg struct{ id, key, hostKey, token string }

// register creates a registration of regType on wsrouter. The reference has
// no registrations: it gets a fresh random id (its rooms are keyed by id)
// and nothing is sent.
func (t *target) register(ctx context.Context, regType string) (reg, error) {
	if t.isRef() {
		return reg{id: randHex(16), key: "unused"}, nil
	}
	r := reg{key: randHex(16), hostKey: randHex(16)}
	q := url.Values{"key": {r.key}, "host_key": {r.hostKey}, "reg_type": {regType}}
	u := "http://" + t.srv.addr + "/register?" + q.Encode()
	// The server hashes both keys on a small bcrypt pool and answers 503
	// "server busy" when a check waits too long: back off and retry.
	for attempt := 0; ; attempt++ {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, nil)
		if err != nil {
			return r, err
		}
		resp, err := t.dial.client().Do(req)
		if err != nil {
			return r, fmt.Errorf("register: %w", err)
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			r.id = string(body)
			return r, nil
		}
		if resp.StatusCode != http.StatusServiceUnavailable || attempt >= 5 {
			return r, fmt.Errorf("register: %s: %s", resp.Status, strings.TrimSpace(string(body)))
		}
		select {
		case <-ctx.Done():
			return r, ctx.Err()
		case <-time.After(time.Duration(50<<attempt) * time.Millisecond):
		}
	}
}

// registerMany creates n registrations with at most conc at once.
func (t *target) registerMany(ctx context.Context, n, conc int, regType string) ([]reg, error) {
	regs := make([]reg, n)
	err := parallel(ctx, n, conc, func(i int) error {
		r, err := t.register(ctx, regType)
		regs[i] = r
		return err
	})
	return regs, err
}

// connect opens a WebSocket to r as sockType ("host", "client" or "" for a
// lobby member). The reference ignores everything but id. readLimit bounds
// incoming messages (0: coder/websocket's 32 KiB default).
func (t *target) connect(ctx context.Context, r reg, sockType string, readLimit int64) (*websocket.Conn, error) {
	return t.connectOn(ctx, 0, r, sockType, readLimit)
}

// connectOn is connect to node i of a cluster (modulo the nodes).
func (t *target) connectOn(ctx context.Context, node int, r reg, sockType string, readLimit int64) (*websocket.Conn, error) {
	q := url.Values{"id": {r.id}, "key": {r.key}}
	if r.token != "" {
		q = url.Values{"id": {r.id}, "token": {r.token}}
	}
	if sockType != "" {
		q.Set("sock_type", sockType)
	}
	c, resp, err := websocket.Dial(ctx, "ws://"+t.nodeAddr(node)+"/connect?"+q.Encode(), &websocket.DialOptions{
		HTTPClient: t.dial.client(),
	})
	if err != nil {
		if resp != nil {
			return nil, &dialError{status: resp.StatusCode, err: err}
		}
		return nil, &dialError{err: err}
	}
	if readLimit > 0 {
		c.SetReadLimit(readLimit)
	}
	return c, nil
}

// mint returns r with a token for role (and name, if set) from POST
// /token, authorised by r's host key.
func (t *target) mint(ctx context.Context, r reg, role, name string) (reg, error) {
	q := url.Values{"id": {r.id}, "role": {role}, "ttl": {"1h"}}
	if name != "" {
		q.Set("name", name)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+t.srv.addr+"/token?"+q.Encode(), nil)
	if err != nil {
		return r, err
	}
	req.Header.Set("X-Host-Key", r.hostKey)
	resp, err := t.dial.client().Do(req)
	if err != nil {
		return r, fmt.Errorf("token: %w", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 8192))
	if resp.StatusCode != http.StatusOK {
		return r, fmt.Errorf("token: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	r.token = string(body)
	return r, nil
}

// dialError is a failed connect, with the HTTP status if the server
// answered one.
type dialError struct {
	status int
	err    error
}

func (e *dialError) Error() string {
	if e.status != 0 {
		return fmt.Sprintf("connect: HTTP %d: %v", e.status, e.err)
	}
	return "connect: " + e.err.Error()
}

func (e *dialError) Unwrap() error { return e.err }

// kind names the failure for tallies: "http 503", "timeout", "refused", ….
func (e *dialError) kind() string {
	if e.status != 0 {
		return fmt.Sprintf("http %d", e.status)
	}
	return errKind(e.err)
}

// failKind names a failed connect for tallies.
func failKind(err error) string {
	var de *dialError
	if errors.As(err, &de) {
		return de.kind()
	}
	return errKind(err)
}

// errKind classifies a network error without the addresses and ports that
// would make every error unique.
func errKind(err error) string {
	var ne net.Error
	switch {
	case err == nil:
		return "none"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.As(err, &ne) && ne.Timeout(), errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return "reset"
	case errors.Is(err, syscall.EADDRNOTAVAIL), errors.Is(err, syscall.EADDRINUSE):
		return "no free port"
	case errors.Is(err, syscall.EMFILE), errors.Is(err, syscall.ENFILE):
		return "too many open files"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "eof"
	case errors.Is(err, net.ErrClosed):
		return "closed locally"
	}
	return "other"
}

// endKind names how a connection's read loop ended: "close 4008", "eof", ….
func endKind(err error) string {
	if code := websocket.CloseStatus(err); code != -1 {
		return fmt.Sprintf("close %d", int(code))
	}
	return errKind(err)
}

// tally counts events by kind, keeping the first error text of each kind.
type tally struct {
	mu      sync.Mutex
	counts  map[string]int
	example map[string]string
}

func (t *tally) add(kind string, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.counts == nil {
		t.counts, t.example = map[string]int{}, map[string]string{}
	}
	t.counts[kind]++
	if _, ok := t.example[kind]; !ok && err != nil {
		t.example[kind] = err.Error()
	}
}

func (t *tally) total() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, c := range t.counts {
		n += c
	}
	return n
}

// String is "close 4008 ×3 (e.g. …), eof ×1".
func (t *tally) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var parts []string
	for _, k := range sortedKeys(t.counts) {
		s := fmt.Sprintf("%s ×%d", k, t.counts[k])
		if ex := t.example[k]; ex != "" {
			if len(ex) > 160 {
				ex = ex[:160] + "…"
			}
			s += fmt.Sprintf(" (e.g. %q)", ex)
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, ", ")
}

// snapshot returns the counts for the JSON notes.
func (t *tally) snapshot() map[string]int {
	t.mu.Lock()
	defer t.mu.Unlock()
	m := make(map[string]int, len(t.counts))
	for k, v := range t.counts {
		m[k] = v
	}
	return m
}

// readMessage reads one data message into buf and returns its length. The
// connection's read limit must be below len(buf), so that a message always
// ends (io.EOF) before buf is full. It reuses buf, where Conn.Read would
// allocate a slice per message: the clients must cost little CPU, as they
// share the machine with the server.
func readMessage(c *websocket.Conn, buf []byte) (int, error) {
	// A context without Done costs coder/websocket nothing per call;
	// reads end when the connection is closed.
	_, r, err := c.Reader(context.Background())
	if err != nil {
		return 0, err
	}
	n := 0
	for {
		m, err := r.Read(buf[n:])
		n += m
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		if n == len(buf) {
			return n, errors.New("message larger than the read buffer")
		}
	}
}

// Payload layout of the timed messages (fanout, pair): a kind byte, the
// sender's index, its sequence number and the intended send time, in
// nanoseconds since the run's epoch on this process's monotonic clock
// (senders and receivers are in the same process). The rest is padding.
const (
	kindData   = 'D'
	kindSync   = 'S'
	headerSize = 1 + 4 + 8 + 8
)

func putHeader(p []byte, kind byte, sender uint32, seq uint64, at int64) {
	p[0] = kind
	binary.LittleEndian.PutUint32(p[1:], sender)
	binary.LittleEndian.PutUint64(p[5:], seq)
	binary.LittleEndian.PutUint64(p[13:], uint64(at))
}

func getHeader(p []byte) (kind byte, sender uint32, seq uint64, at int64, ok bool) {
	if len(p) < headerSize {
		return 0, 0, 0, 0, false
	}
	return p[0], binary.LittleEndian.Uint32(p[1:]), binary.LittleEndian.Uint64(p[5:]),
		int64(binary.LittleEndian.Uint64(p[13:])), true
}

// clock is a run's time base: nanoseconds since its epoch, monotonic.
type clock struct{ epoch time.Time }

func newClock() clock { return clock{epoch: time.Now()} }

func (c clock) now() int64 { return int64(time.Since(c.epoch)) }

// parallel runs f(0) … f(n-1) with at most conc at once and returns the
// first error; after an error no new calls start.
func parallel(ctx context.Context, n, conc int, f func(i int) error) error {
	var next atomic.Int64
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	var failed atomic.Bool
	for range min(conc, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !failed.Load() && ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := f(i); err != nil {
					once.Do(func() { first = err })
					failed.Store(true)
					return
				}
			}
		}()
	}
	wg.Wait()
	if first == nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return first
}

// closeAll closes the connections without a handshake, in parallel: the run
// is over and the servers are stopped right after.
func closeAll(conns []*websocket.Conn) {
	var wg sync.WaitGroup
	const workers = 8
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < len(conns); i += workers {
				if conns[i] != nil {
					conns[i].CloseNow()
				}
			}
		}()
	}
	wg.Wait()
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// percentilesMs returns the median, 99th percentile and maximum of ds in
// milliseconds. It sorts ds.
func percentilesMs(ds []time.Duration) (p50, p99, max float64) {
	if len(ds) == 0 {
		return 0, 0, 0
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	at := func(q float64) float64 {
		i := int(q * float64(len(ds)-1))
		return float64(ds[i]) / 1e6
	}
	return at(0.5), at(0.99), float64(ds[len(ds)-1]) / 1e6
}

// cpuWindow measures server and client CPU time over a window.
type cpuWindow struct {
	srvs          []*serverProc
	start         time.Time
	srv0, client0 time.Duration
}

// startCPU starts measuring the CPU time of srvs (their sum: the servers
// of a cluster) and of this process.
func startCPU(srvs ...*serverProc) (*cpuWindow, error) {
	w := &cpuWindow{srvs: srvs, start: time.Now(), client0: processCPU()}
	s, err := w.serverCPU()
	if err != nil {
		return nil, err
	}
	w.srv0 = s
	return w, nil
}

func (w *cpuWindow) serverCPU() (time.Duration, error) {
	var sum time.Duration
	for _, p := range w.srvs {
		s, err := p.cpu()
		if err != nil {
			return 0, fmt.Errorf("read server cpu: %w", err)
		}
		sum += s
	}
	return sum, nil
}

// end returns the wall time of the window and the CPU time each side used
// in it.
func (w *cpuWindow) end() (wall, server, client time.Duration, err error) {
	s, err := w.serverCPU()
	if err != nil {
		return 0, 0, 0, err
	}
	return time.Since(w.start), s - w.srv0, processCPU() - w.client0, nil
}

// waitTimeout waits for wg, at most d; it reports whether wg finished.
func waitTimeout(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

// closedLoop runs conc workers until deadline, each sending requests made
// by newReq one after another, and returns the latency of every one answered
// 200; the others are tallied in failures.
func (t *target) closedLoop(ctx context.Context, conc int, deadline time.Time, failures *tally, newReq func() (*http.Request, error)) []time.Duration {
	var (
		mu  sync.Mutex
		lat []time.Duration
		wg  sync.WaitGroup
	)
	for range conc {
		wg.Go(func() {
			var mine []time.Duration
			for time.Now().Before(deadline) && ctx.Err() == nil {
				req, err := newReq()
				if err != nil {
					failures.add("request", err)
					return
				}
				t0 := time.Now()
				resp, err := t.dial.client().Do(req)
				if err != nil {
					failures.add("http", err)
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					failures.add(fmt.Sprint("status ", resp.StatusCode), nil)
					continue
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		})
	}
	wg.Wait()
	return lat
}
