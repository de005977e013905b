package router

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"wsrouter/registry"
)

// testTimeout bounds every wait in these tests: a wait is for an event, and
// the deadline only turns a hang into a failure.
const testTimeout = 10 * time.Second

const (
	testKey     = "member-key"
	testHostKey = "host-key"
)

// testServer is a real router on a loopback port.
type testServer struct {
	*httptest.Server
	rt      *Router
	closes  chan int            // every server-side close code
	removed chan registry.Cause // every registration removal
	checks  chan registry.KeyCheck
	subs    chan registry.Event // every subscribe and unsubscribe
}

func newTestServer(t testing.TB, cfg Config) *testServer {
	t.Helper()
	ts := &testServer{
		closes:  make(chan int, 1024),
		removed: make(chan registry.Cause, 1024),
		checks:  make(chan registry.KeyCheck, 1024),
		subs:    make(chan registry.Event, 1024),
	}
	if cfg.Registry.BcryptCost == 0 {
		cfg.Registry.BcryptCost = 4 // bcrypt.MinCost: keep tests fast
	}
	// Hooks never block the server: a test that cares reads promptly, and
	// one that does not (thousands of requests) must not wedge it.
	cfg.Registry.Observers = append(cfg.Registry.Observers, func(ev registry.Event) {
		switch ev.Kind {
		case registry.EventRemove:
			offer(ts.removed, ev.Cause)
		case registry.EventSubscribe, registry.EventUnsubscribe:
			offer(ts.subs, ev)
		}
	})
	cfg.Registry.OnKeyCheck = func(how registry.KeyCheck, _ time.Duration) { offer(ts.checks, how) }
	ts.rt = New(cfg, nil)
	ts.rt.onClose = func(code int) { offer(ts.closes, code) }
	ts.Server = httptest.NewServer(ts.rt)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		defer cancel()
		ts.rt.Shutdown(ctx)
		ts.Server.Close()
	})
	return ts
}

func offer[T any](ch chan T, v T) {
	select {
	case ch <- v:
	default:
	}
}

func (ts *testServer) wsURL(path string, q url.Values) string {
	return "ws" + strings.TrimPrefix(ts.URL, "http") + path + "?" + q.Encode()
}

// register creates a registration and returns its id.
func (ts *testServer) register(t testing.TB, regType string, extra ...string) string {
	t.Helper()
	q := url.Values{"key": {testKey}, "host_key": {testHostKey}, "reg_type": {regType}}
	for i := 0; i+1 < len(extra); i += 2 {
		q.Set(extra[i], extra[i+1])
	}
	code, body, _ := ts.do(t, http.MethodGet, "/register?"+q.Encode(), nil, nil)
	if code != http.StatusOK {
		t.Fatalf("register: got %d %q, want 200", code, body)
	}
	return body
}

// do makes one HTTP request and returns status, body and headers.
func (ts *testServer) do(t testing.TB, method, path string, body io.Reader, hdr http.Header) (int, string, http.Header) {
	t.Helper()
	req, err := http.NewRequest(method, ts.URL+path, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b), resp.Header
}

// dial joins id with key as role ("" for a lobby) and fails the test on a
// refusal.
func (ts *testServer) dial(t testing.TB, id, role string) *websocket.Conn {
	t.Helper()
	c, resp, err := ts.tryDial(t, id, testKey, role, nil)
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("dial %s as %q: %v (status %d)", id, role, err, status)
	}
	return c
}

func (ts *testServer) tryDial(t testing.TB, id, key, role string, hdr http.Header) (*websocket.Conn, *http.Response, error) {
	t.Helper()
	q := url.Values{"id": {id}}
	if key != "" {
		q.Set("key", key)
	}
	if role != "" {
		q.Set("sock_type", role)
	}
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, ts.wsURL("/connect", q), &websocket.DialOptions{HTTPHeader: hdr})
	if err == nil {
		c.SetReadLimit(-1)
		t.Cleanup(func() { c.CloseNow() })
	}
	return c, resp, err
}

// read reads one message within the test timeout.
func read(t *testing.T, c *websocket.Conn) (websocket.MessageType, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	typ, b, err := c.Read(ctx)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return typ, string(b)
}

func write(t *testing.T, c *websocket.Conn, msg string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	if err := c.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
}

// closeStatus reads until the connection ends and returns its close code
// (-1 when it ended without a close frame).
func closeStatus(t *testing.T, c *websocket.Conn) (websocket.StatusCode, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	for {
		_, _, err := c.Read(ctx)
		if err == nil {
			continue
		}
		if ctx.Err() != nil {
			t.Fatalf("connection still open after %v", testTimeout)
		}
		var ce websocket.CloseError
		if errors.As(err, &ce) {
			return ce.Code, ce.Reason
		}
		return -1, err.Error()
	}
}

// expectNext reads one message and checks it is want. Tests that must show
// a member did NOT receive something send a marker afterwards from a sender
// that does reach it: per-sender order means the marker comes first.
func expectNext(t *testing.T, c *websocket.Conn, want string) {
	t.Helper()
	if _, got := read(t, c); got != want {
		t.Fatalf("got message %q, want %q", got, want)
	}
}

// waitFor receives from ch until f accepts a value, within the test timeout.
func waitFor[T any](t *testing.T, ch <-chan T, what string, f func(T) bool) {
	t.Helper()
	deadline := time.After(testTimeout)
	for {
		select {
		case v := <-ch:
			if f(v) {
				return
			}
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// regCfgKeep keeps emptied registrations for the test's duration.
func regCfgKeep() registry.Config { return registry.Config{GCGrace: time.Hour} }

// dialPinged joins a lobby as a member that reports each ping it receives
// (and, since coder/websocket answers while reading, pongs while it reads).
func (ts *testServer) dialPinged(t testing.TB, id string) (*websocket.Conn, <-chan struct{}) {
	t.Helper()
	pings := make(chan struct{}, 1000)
	q := url.Values{"id": {id}, "key": {testKey}}
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c, _, err := websocket.Dial(ctx, ts.wsURL("/connect", q), &websocket.DialOptions{
		OnPingReceived: func(context.Context, []byte) bool { offer(pings, struct{}{}); return true },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.CloseNow() })
	return c, pings
}
