package client

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"wsrouter/registry"
	"wsrouter/router"
	"wsrouter/router/webhook"
)

const testTimeout = 10 * time.Second

// server is a real router on a loopback port that can be restarted on the
// same port with the same registrations (a store shared by its lives, as a
// data file is).
type server struct {
	t     *testing.T
	addr  string
	store *registry.MemoryStore
	rt    *router.Router
	srv   *http.Server
	cfg   router.Config
}

func newServer(t *testing.T, cfg router.Config) *server {
	t.Helper()
	s := &server{t: t, store: &registry.MemoryStore{}, cfg: cfg}
	s.start("127.0.0.1:0")
	t.Cleanup(s.stop)
	return s
}

func (s *server) url() string { return "http://" + s.addr }

func (s *server) start(addr string) {
	s.t.Helper()
	cfg := s.cfg
	cfg.Registry.BcryptCost = 4
	cfg.Registry.Store = s.store
	if cfg.Registry.GCGrace == 0 {
		cfg.Registry.GCGrace = time.Hour
	}
	s.rt = router.New(cfg, nil)
	recs, _ := s.store.Load(context.Background())
	if err := s.rt.Registry().Restore(recs); err != nil {
		s.t.Fatal(err)
	}
	var ln net.Listener
	var err error
	for range 50 { // the old listener's port may take a moment to free
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		s.t.Fatal(err)
	}
	s.addr = ln.Addr().String()
	s.srv = &http.Server{Handler: s.rt}
	go s.srv.Serve(ln)
}

func (s *server) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	s.rt.Shutdown(ctx)
	s.srv.Shutdown(ctx)
}

func (s *server) restart() {
	s.stop()
	s.start(s.addr)
}

func (s *server) register(typ, id string) {
	s.t.Helper()
	if _, err := Register(context.Background(), s.url(), Registration{Type: typ, Key: "k", HostKey: "h", ID: id}); err != nil {
		s.t.Fatalf("register %s: %v", id, err)
	}
}

// states records a Conn's states for a test to wait on.
type states chan State

func (ch states) on(s State) {
	select {
	case ch <- s:
	default:
	}
}

func (ch states) wait(t *testing.T, kind StateKind) State {
	t.Helper()
	deadline := time.After(testTimeout)
	for {
		select {
		case s := <-ch:
			if s.Kind == kind {
				return s
			}
		case <-deadline:
			t.Fatalf("no %s state", kind)
		}
	}
}

func dial(t *testing.T, o Options) *Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c, err := Dial(ctx, o)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func read(t *testing.T, c *Conn) Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	m, err := c.Read(ctx)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return m
}

func TestRegisterErrors(t *testing.T) {
	s := newServer(t, router.Config{})
	ctx := context.Background()
	id, err := Register(ctx, s.url(), Registration{Type: "lobby", Key: "k", HostKey: "h"})
	if err != nil || len(id) != 32 {
		t.Fatalf("minted id %q, %v", id, err)
	}
	s.register("lobby", "taken")
	for _, c := range []struct {
		r    Registration
		want error
	}{
		{Registration{Type: "lobby", Key: "k", HostKey: "h", ID: "taken"}, ErrConflict},
		{Registration{Type: "room", Key: "k", HostKey: "h"}, ErrBadRequest},
		{Registration{Type: "lobby", HostKey: "h"}, ErrBadRequest},
	} {
		_, err := Register(ctx, s.url(), c.r)
		var se *StatusError
		if !errors.Is(err, c.want) || !errors.As(err, &se) || se.Body == "" {
			t.Errorf("%+v: %v, want %v", c.r, err, c.want)
		}
	}
	// 429 carries Retry-After.
	limited := newServer(t, router.Config{RateRegister: router.Limit{Rate: 0.001, Burst: 1}})
	Register(ctx, limited.url(), Registration{Type: "lobby", Key: "k", HostKey: "h"})
	_, err = Register(ctx, limited.url(), Registration{Type: "lobby", Key: "k", HostKey: "h"})
	var se *StatusError
	if !errors.Is(err, ErrRateLimited) || !errors.As(err, &se) || se.RetryAfter <= 0 {
		t.Fatalf("rate limited: %v", err)
	}
}

func TestLobbyTextAndBinary(t *testing.T) {
	s := newServer(t, router.Config{})
	s.register("lobby", "room")
	st := make(states, 16)
	a := dial(t, Options{URL: s.url(), ID: "room", Key: "k", Name: "a", OnState: st.on})
	b := dial(t, Options{URL: s.url(), ID: "room", Key: "k"})
	if got := st.wait(t, Connected); got.ConnID == "" || got.ConnID != a.ConnID() {
		t.Fatalf("connected state %+v, ConnID %q", got, a.ConnID())
	}
	ctx := context.Background()
	a.Write(ctx, websocket.MessageText, []byte("hello"))
	a.Write(ctx, websocket.MessageBinary, []byte{0, 1, 2})
	if m := read(t, b); m.Type != websocket.MessageText || string(m.Data) != "hello" {
		t.Fatalf("got %v %q", m.Type, m.Data)
	}
	if m := read(t, b); m.Type != websocket.MessageBinary || !bytes.Equal(m.Data, []byte{0, 1, 2}) {
		t.Fatalf("got %v %v", m.Type, m.Data)
	}
}

// TestPermanentErrors: refusals and close codes that mean "stop" end the
// Conn for good, each with its own error, and no retry follows.
func TestPermanentErrors(t *testing.T) {
	s := newServer(t, router.Config{})
	s.register("lobby", "room")
	s.register("hostclient", "hc")
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	for _, c := range []struct {
		name string
		o    Options
		want error
	}{
		{"unknown id", Options{ID: "nope", Key: "k"}, ErrNotFound},
		{"wrong key", Options{ID: "room", Key: "wrong"}, ErrForbidden},
		{"no sock_type", Options{ID: "hc", Key: "k"}, ErrBadRequest},
		{"bad token", Options{ID: "room", Token: "x.y.z"}, ErrForbidden},
	} {
		c.o.URL = s.url()
		if _, err := Dial(ctx, c.o); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}

	// Replaced by a newer connection with the same name: 4001.
	st := make(states, 16)
	old := dial(t, Options{URL: s.url(), ID: "room", Key: "k", Name: "dev", OnState: st.on})
	dial(t, Options{URL: s.url(), ID: "room", Key: "k", Name: "dev"})
	if got := st.wait(t, Closed); !errors.Is(got.Err, ErrReplaced) {
		t.Fatalf("replaced: %v", got.Err)
	}
	if _, err := old.Read(ctx); !errors.Is(err, ErrReplaced) {
		t.Fatalf("Read after replaced: %v", err)
	}
	if err := old.Write(ctx, websocket.MessageText, []byte("x")); !errors.Is(err, ErrReplaced) {
		t.Fatalf("Write after replaced: %v", err)
	}

	// Removed: 4000.
	m := dial(t, Options{URL: s.url(), ID: "room", Key: "k"})
	resp, err := http.Post(s.url()+"/remove?id=room&key=k&host_key=h", "", nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("remove: %v %v", resp, err)
	}
	if _, err := m.Read(ctx); !errors.Is(err, ErrRemoved) {
		t.Fatalf("Read after remove: %v", err)
	}
}

// TestReconnectAfterRestart: the router restarts on the same port with the
// same registrations; the Conn reconnects by itself, with a new session,
// and messages flow again, also those written while it was away.
func TestReconnectAfterRestart(t *testing.T) {
	s := newServer(t, router.Config{})
	s.register("lobby", "room")
	st := make(states, 64)
	o := Options{URL: s.url(), ID: "room", Key: "k", MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond}
	a := dial(t, Options{URL: o.URL, ID: o.ID, Key: o.Key, MinBackoff: o.MinBackoff, MaxBackoff: o.MaxBackoff, OnState: st.on})
	b := dial(t, o)
	first := a.ConnID()
	st.wait(t, Connected)

	s.restart()
	got := st.wait(t, Reconnecting)
	if websocket.CloseStatus(got.Err) != websocket.StatusGoingAway {
		t.Errorf("reconnecting because of %v, want the 1001 of a shutdown", got.Err)
	}
	st.wait(t, Connected)
	if a.ConnID() == "" || a.ConnID() == first {
		t.Fatalf("connection id %q after the restart, was %q", a.ConnID(), first)
	}
	// b may still be reconnecting: a write waits for its session.
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	if err := b.Write(ctx, websocket.MessageText, []byte("back")); err != nil {
		t.Fatal(err)
	}
	if m := read(t, a); string(m.Data) != "back" {
		t.Fatalf("after the restart: %q", m.Data)
	}
}

// TestBackoff: full jitter within min·2ⁿ⁻¹ capped at max, and Retry-After
// as a floor; a Conn that cannot connect waits those delays between its
// attempts (a fake clock records them).
func TestBackoff(t *testing.T) {
	top := func(k int64) int64 { return k - 1 }
	zero := func(int64) int64 { return 0 }
	min, max := 100*time.Millisecond, 2*time.Second
	for n, want := range map[int]time.Duration{1: 100 * time.Millisecond, 2: 200 * time.Millisecond, 4: 800 * time.Millisecond, 5: 1600 * time.Millisecond, 6: 2 * time.Second, 100: 2 * time.Second} {
		if got := Backoff(n, min, max, 0, top); got != want {
			t.Errorf("attempt %d: ceiling %v, want %v", n, got, want)
		}
		if got := Backoff(n, min, max, 0, zero); got != 0 {
			t.Errorf("attempt %d: floor %v, want 0", n, got)
		}
	}
	if got := Backoff(1, min, max, 5*time.Second, zero); got != 5*time.Second {
		t.Errorf("Retry-After 5s: %v", got)
	}

	// Nothing listens on this port: every attempt fails at once.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	var mu sync.Mutex
	var slept []time.Duration
	ctx, cancel := context.WithCancel(context.Background())
	o := Options{URL: "http://" + addr, ID: "x", Key: "k", MinBackoff: min, MaxBackoff: max, rand: top,
		sleep: func(_ context.Context, d time.Duration) error {
			mu.Lock()
			defer mu.Unlock()
			slept = append(slept, d)
			if len(slept) == 8 {
				cancel()
				return context.Canceled
			}
			return nil
		}}
	if _, err := Dial(ctx, o); !errors.Is(err, context.Canceled) {
		t.Fatalf("Dial: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	want := []time.Duration{100, 200, 400, 800, 1600, 2000, 2000, 2000}
	for i, d := range slept {
		if d != want[i]*time.Millisecond {
			t.Fatalf("waits %v, want %v ms", slept, want)
		}
	}
}

// TestServeRelay answers /relay requests of every reply shape through a
// plain http.Handler, and bounds the requests handled at once.
func TestServeRelay(t *testing.T) {
	s := newServer(t, router.Config{})
	s.register("hostclient", "dev")
	host := dial(t, Options{URL: s.url(), ID: "dev", Key: "k", Role: "host"})
	png := []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
	var inFlight, peak atomic.Int32
	gate := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("GET /text", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello %s", r.URL.Query().Get("who"))
	})
	mux.HandleFunc("POST /json", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Device", "yes")
		w.Header().Set("Cache-Control", "no-store")
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"got":%q,"auth":%q}`, b, r.Header.Get("Authorization"))
	})
	mux.HandleFunc("GET /image.png", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "image/png")
		w.Write(png)
	})
	mux.HandleFunc("GET /big", func(w http.ResponseWriter, r *http.Request) {
		w.Write(bytes.Repeat([]byte{0xff}, 900<<10)) // base64: over 1 MiB
	})
	mux.HandleFunc("GET /early-hints", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusEarlyHints)
		w.Write([]byte("after the hints"))
	})
	mux.HandleFunc("GET /slow", func(w http.ResponseWriter, r *http.Request) {
		n := inFlight.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		<-gate
		inFlight.Add(-1)
		w.Write([]byte("slow"))
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go ServeRelay(ctx, host, mux, &RelayOptions{Concurrency: 3})

	call := func(method, path, body string, hdr http.Header) (*http.Response, []byte) {
		req, _ := http.NewRequest(method, s.url()+"/relay/dev"+path, strings.NewReader(body))
		req.Header.Set("X-Key", "k")
		for k, v := range hdr {
			req.Header[k] = v
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, b
	}
	if resp, b := call("GET", "/text?who=ann", "", nil); resp.StatusCode != 200 || string(b) != "hello ann" || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
		t.Fatalf("text: %d %q %s", resp.StatusCode, b, resp.Header.Get("Content-Type"))
	}
	resp, b := call("POST", "/json", "café", http.Header{"Authorization": {"Basic dXNlcg=="}})
	if resp.StatusCode != 201 || string(b) != `{"got":"café","auth":"Basic dXNlcg=="}` || resp.Header.Get("Content-Type") != "application/json" ||
		resp.Header.Get("X-Device") != "yes" || resp.Header.Get("Cache-Control") != "no-store" {
		t.Fatalf("json: %d %q %v", resp.StatusCode, b, resp.Header)
	}
	if resp, b := call("GET", "/image.png", "", nil); resp.StatusCode != 200 || !bytes.Equal(b, png) || resp.Header.Get("Content-Type") != "image/png" {
		t.Fatalf("image: %d %v %s", resp.StatusCode, b, resp.Header.Get("Content-Type"))
	}
	if resp, _ := call("GET", "/missing", "", nil); resp.StatusCode != 404 {
		t.Fatalf("missing: %d", resp.StatusCode)
	}
	// Too large for the router: answered 502 by the library, and the
	// session survives (a 1009 would have ended it).
	if resp, _ := call("GET", "/big", "", nil); resp.StatusCode != 502 {
		t.Fatalf("big: %d, want 502", resp.StatusCode)
	}
	if resp, b := call("GET", "/early-hints", "", nil); resp.StatusCode != 200 || string(b) != "after the hints" {
		t.Fatalf("early hints: %d %q", resp.StatusCode, b)
	}

	// Six at once with room for three.
	var wg sync.WaitGroup
	for range 6 {
		wg.Go(func() {
			if resp, b := call("GET", "/slow", "", nil); resp.StatusCode != 200 || string(b) != "slow" {
				t.Errorf("slow: %d %q", resp.StatusCode, b)
			}
		})
	}
	deadline := time.Now().Add(testTimeout)
	for peak.Load() < 3 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond) // polling a counter the handlers raise
	}
	close(gate)
	wg.Wait()
	if p := peak.Load(); p != 3 {
		t.Fatalf("peak concurrency %d, want 3", p)
	}

	// Frames that are not relay requests still reach Read.
	client := dial(t, Options{URL: s.url(), ID: "dev", Key: "k", Role: "client"})
	client.Write(context.Background(), websocket.MessageText, []byte(`{"hello":"host"}`))
	if m := read(t, host); string(m.Data) != `{"hello":"host"}` {
		t.Fatalf("host read %q", m.Data)
	}
}

func TestBackend(t *testing.T) {
	s := newServer(t, router.Config{AdminToken: "adm"})
	s.register("lobby", "room")
	st := make(states, 16)
	m := dial(t, Options{URL: s.url(), ID: "room", Key: "k", Name: "lamp", OnState: st.on})
	ctx := context.Background()
	for _, b := range []*Backend{{URL: s.url(), ID: "room", HostKey: "h"}, {URL: s.url(), ID: "room", AdminToken: "adm"}} {
		ms, err := b.Members(ctx)
		if err != nil || len(ms) != 1 || ms[0].Name != "lamp" || ms[0].Conn != m.ConnID() {
			t.Fatalf("members: %+v %v", ms, err)
		}
		if n, err := b.Send(ctx, Target{Name: "lamp"}, "application/json", []byte(`{"led":"on"}`)); n != 1 || err != nil {
			t.Fatalf("send: %d %v", n, err)
		}
		if got := read(t, m); got.Type != websocket.MessageText || string(got.Data) != `{"led":"on"}` {
			t.Fatalf("member got %q", got.Data)
		}
	}
	if _, err := (&Backend{URL: s.url(), ID: "room", HostKey: "wrong"}).Members(ctx); !errors.Is(err, ErrForbidden) {
		t.Fatalf("wrong host key: %v", err)
	}
	b := &Backend{URL: s.url(), ID: "room", HostKey: "h"}
	if _, err := b.Send(ctx, Target{Name: "nobody"}, "text/plain", []byte("x")); !errors.Is(err, ErrNotFound) {
		t.Fatalf("send to nobody: %v", err)
	}
	if err := b.CloseMember(ctx, "", "lamp", 4321, "bye"); err != nil {
		t.Fatal(err)
	}
	if got := st.wait(t, Closed); !errors.Is(got.Err, ErrClosedByBackend) || !strings.Contains(got.Err.Error(), "4321") {
		t.Fatalf("closed by backend: %v", got.Err)
	}
}

func TestVerifyWebhook(t *testing.T) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	body := []byte(`{"type":"message"}`)
	now := strconv.FormatInt(time.Now().Unix(), 10)
	h := http.Header{"Webhook-Id": {"msg_1"}, "Webhook-Timestamp": {now}}
	h.Set("webhook-signature", webhook.Sign(secret, "msg_1", now, body))
	if err := VerifyWebhook(secret, h, body); err != nil {
		t.Fatalf("a good signature: %v", err)
	}
	for name, mutate := range map[string]func(h http.Header, b []byte) (http.Header, []byte){
		"other body":   func(h http.Header, b []byte) (http.Header, []byte) { return h, []byte(`{"type":"close"}`) },
		"other id":     func(h http.Header, b []byte) (http.Header, []byte) { h.Set("webhook-id", "msg_2"); return h, b },
		"no signature": func(h http.Header, b []byte) (http.Header, []byte) { h.Del("webhook-signature"); return h, b },
		"old": func(h http.Header, b []byte) (http.Header, []byte) {
			ts := strconv.FormatInt(time.Now().Add(-time.Hour).Unix(), 10)
			h.Set("webhook-timestamp", ts)
			h.Set("webhook-signature", webhook.Sign(secret, "msg_1", ts, b))
			return h, b
		},
	} {
		h2, b2 := mutate(h.Clone(), body)
		if err := VerifyWebhook(secret, h2, b2); !errors.Is(err, ErrBadSignature) {
			t.Errorf("%s: %v, want ErrBadSignature", name, err)
		}
	}
}
