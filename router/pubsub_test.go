package router

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"wsrouter/registry"
)

// subscribe sends a subscribe action and waits until the router has made it.
func (ts *testServer) subscribe(t *testing.T, c *websocket.Conn, pattern string) {
	t.Helper()
	write(t, c, fmt.Sprintf(`{"action":"subscribe","event":%q}`, pattern))
	waitFor(t, ts.subs, "subscribe "+pattern, func(ev registry.Event) bool {
		return ev.Kind == registry.EventSubscribe && ev.Pattern == pattern
	})
}

type published struct {
	Action    string          `json:"action"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	CreatedAt time.Time       `json:"created_at"`
	Error     string          `json:"error"`
}

func readEvent(t *testing.T, c *websocket.Conn) published {
	t.Helper()
	return readJSON[published](t, c)
}

// readJSON reads one message and decodes it as a T.
func readJSON[T any](t *testing.T, c *websocket.Conn) T {
	t.Helper()
	_, s := read(t, c)
	var v T
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("not JSON: %q", s)
	}
	return v
}

func TestPubSubEndToEnd(t *testing.T) {
	ts := newTestServer(t, Config{Registry: regCfgKeep()})
	id := ts.register(t, "pubsub")
	pub, temp, all := ts.dial(t, id, "host"), ts.dial(t, id, ""), ts.dial(t, id, "") // sock_type is ignored
	ts.subscribe(t, temp, "sensors.*.temp")
	ts.subscribe(t, temp, "sensors.kitchen.temp")                           // overlaps: still one delivery
	write(t, temp, `{"action":"subscribe","event":"sensors.kitchen.temp"}`) // twice is one subscription: no event
	ts.subscribe(t, all, "sensors.>")

	before := time.Now()
	write(t, pub, `{"action":"publish","event":"sensors.kitchen.temp","data":{"c":21.5}}`)
	for _, c := range []*websocket.Conn{temp, all} {
		p := readEvent(t, c)
		if p.Action != "publish" || p.Event != "sensors.kitchen.temp" || string(p.Data) != `{"c":21.5}` ||
			p.CreatedAt.Before(before.Add(-time.Second)) || p.CreatedAt.After(time.Now()) {
			t.Fatalf("envelope %+v", p)
		}
	}
	// No data is null; a humidity event reaches only sensors.>.
	write(t, pub, `{"action":"publish","event":"sensors.garage.humid"}`)
	if p := readEvent(t, all); p.Event != "sensors.garage.humid" || string(p.Data) != "null" {
		t.Fatalf("envelope %+v", p)
	}
	// The publisher heard nothing (not subscribed) and temp nothing more:
	// each gets a marker next.
	ts.subscribe(t, pub, "marker")
	write(t, all, `{"action":"publish","event":"marker","data":1}`)
	if p := readEvent(t, pub); string(p.Data) != "1" {
		t.Fatalf("publisher got %+v first, want marker 1", p)
	}
	ts.subscribe(t, temp, "marker")
	write(t, all, `{"action":"publish","event":"marker","data":2}`)
	if p := readEvent(t, temp); string(p.Data) != "2" {
		t.Fatalf("temp got %+v first, want marker 2", p)
	}
	if p := readEvent(t, pub); string(p.Data) != "2" {
		t.Fatalf("publisher got %+v, want marker 2", p)
	}
	// A subscribed publisher hears itself.
	write(t, pub, `{"action":"publish","event":"marker","data":3}`)
	if p := readEvent(t, pub); string(p.Data) != "3" {
		t.Fatalf("publisher got %+v, want its own 3", p)
	}
	if p := readEvent(t, temp); string(p.Data) != "3" {
		t.Fatalf("temp got %+v, want marker 3", p)
	}

	// Order per publisher.
	for i := range 100 {
		write(t, pub, fmt.Sprintf(`{"action":"publish","event":"sensors.x.temp","data":%d}`, i))
	}
	for _, c := range []*websocket.Conn{temp, all} {
		for i := range 100 {
			if p := readEvent(t, c); string(p.Data) != fmt.Sprint(i) {
				t.Fatalf("message %d: %+v", i, p)
			}
		}
	}

	// /members shows the subscriptions.
	code, body, _ := ts.do(t, http.MethodGet, backendURL("/members", id, nil), nil, http.Header{"X-Host-Key": {testHostKey}})
	if code != 200 || !strings.Contains(body, `"subscriptions":["sensors.*.temp","sensors.kitchen.temp","marker"]`) {
		t.Fatalf("members: %d %s", code, body)
	}

	// Unsubscribe and unsubscribe:all.
	write(t, temp, `{"action":"unsubscribe","event":"sensors.*.temp"}`)
	write(t, temp, `{"action":"unsubscribe","event":"never.held"}`) // a no-op
	write(t, all, `{"action":"unsubscribe:all"}`)
	for range 2 {
		waitFor(t, ts.subs, "unsubscribe", func(ev registry.Event) bool { return ev.Kind == registry.EventUnsubscribe })
	}
	write(t, pub, `{"action":"publish","event":"sensors.garage.temp","data":"x"}`)
	write(t, pub, `{"action":"publish","event":"sensors.kitchen.temp","data":"y"}`)
	if p := readEvent(t, temp); string(p.Data) != `"y"` {
		t.Fatalf("after unsubscribing from sensors.*.temp: %+v", p)
	}
	ts.subscribe(t, all, "end")
	write(t, pub, `{"action":"publish","event":"end"}`)
	if p := readEvent(t, all); p.Event != "end" {
		t.Fatalf("after unsubscribe:all: %+v, want only the end marker", p)
	}
}

// TestPubSubErrors: every bad frame gets an error reply and the connection
// stays open.
func TestPubSubErrors(t *testing.T) {
	ts := newTestServer(t, Config{Registry: registry.Config{GCGrace: time.Hour, MaxSubscriptions: 2}})
	id := ts.register(t, "pubsub")
	c := ts.dial(t, id, "")
	for _, f := range []struct{ frame, want string }{
		{`hello`, "not a JSON action object"},
		{`[1,2]`, "not a JSON action object"},
		{`{"event":"a"}`, "missing action"},
		{`{"action":"shout","event":"a"}`, "unknown action"},
		{`{"action":"subscribe"}`, "bad event"},
		{`{"action":"subscribe","event":"a..b"}`, "bad event"},
		{`{"action":"subscribe","event":"a.>.b"}`, "bad event"},
		{`{"action":"publish","event":"a.*"}`, "bad event"},
		{`{"action":"publish","event":"` + strings.Repeat("a", 129) + `"}`, "bad event"},
		{`{"action":"publish","event":"a","data":}`, "not a JSON action object"},
	} {
		write(t, c, f.frame)
		if p := readEvent(t, c); p.Action != "error" || !strings.Contains(p.Error, f.want) {
			t.Errorf("%s: got %+v, want an error containing %q", f.frame, p, f.want)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c.Write(ctx, websocket.MessageBinary, []byte{1, 2})
	if p := readEvent(t, c); p.Action != "error" || !strings.Contains(p.Error, "binary") {
		t.Errorf("binary frame: %+v", p)
	}
	ts.subscribe(t, c, "a")
	ts.subscribe(t, c, "b")
	write(t, c, `{"action":"subscribe","event":"c"}`)
	if p := readEvent(t, c); p.Action != "error" || !strings.Contains(p.Error, "too many subscriptions: at most 2") {
		t.Errorf("third subscription: %+v", p)
	}
	// Still open, still subscribed.
	write(t, c, `{"action":"publish","event":"a","data":"ok"}`)
	if p := readEvent(t, c); p.Action != "publish" || string(p.Data) != `"ok"` {
		t.Fatalf("after the errors: %+v", p)
	}
}

func TestPublishHTTP(t *testing.T) {
	ts := newTestServer(t, Config{MaxMessage: 1024, Registry: regCfgKeep()})
	id := ts.register(t, "pubsub")
	lobby := ts.register(t, "lobby")
	s1, s2 := ts.dial(t, id, ""), ts.dial(t, id, "")
	ts.subscribe(t, s1, "alerts.>")
	ts.subscribe(t, s2, "alerts.fire")
	tok := ts.mint(t, id, "member", nil)
	key := http.Header{"X-Key": {testKey}}
	pub := func(id string, q url.Values, hdr http.Header, body string) (int, string) {
		if q == nil {
			q = url.Values{}
		}
		q.Set("id", id)
		code, b, _ := ts.do(t, http.MethodPost, "/publish?"+q.Encode(), strings.NewReader(body), hdr)
		return code, b
	}
	cases := []struct {
		name string
		id   string
		q    url.Values
		hdr  http.Header
		body string
		want int
		resp string
	}{
		{"two subscribers", id, nil, key, `{"event":"alerts.fire","data":{"room":"kitchen"}}`, 200, `{"delivered":2}`},
		{"one subscriber", id, url.Values{"key": {testKey}}, nil, `{"event":"alerts.flood"}`, 200, `{"delivered":1}`},
		{"nobody", id, nil, key, `{"event":"other","data":1}`, 200, `{"delivered":0}`},
		{"member token", id, url.Values{"token": {tok}}, nil, `{"event":"alerts.fire","data":2}`, 200, `{"delivered":2}`},
		{"no key", id, nil, nil, `{"event":"a"}`, 400, ""},
		{"not JSON", id, nil, key, `event=a`, 400, ""},
		{"two objects", id, nil, key, `{"event":"a"}{"event":"b"}`, 400, ""},
		{"a stray brace after it", id, nil, key, `{"event":"a"}}`, 400, ""},
		{"not UTF-8", id, nil, key, "{\"event\":\"a\",\"data\":\"\xff\"}", 400, ""},
		{"wildcard event", id, nil, key, `{"event":"alerts.*"}`, 400, ""},
		{"no event", id, nil, key, `{"data":1}`, 400, ""},
		{"not pubsub", lobby, nil, key, `{"event":"a"}`, 400, ""},
		{"too large", id, nil, key, `{"event":"a","data":"` + strings.Repeat("x", 1024) + `"}`, 413, ""},
		{"wrong key", id, nil, http.Header{"X-Key": {"nope"}}, `{"event":"a"}`, 403, ""},
		{"unknown id", "no-such", nil, key, `{"event":"a"}`, 404, ""},
	}
	for _, c := range cases {
		code, body := pub(c.id, c.q, c.hdr, c.body)
		if code != c.want || (c.resp != "" && strings.TrimSpace(body) != c.resp) {
			t.Errorf("%s: %d %q, want %d %s", c.name, code, body, c.want, c.resp)
		}
	}
	if code, _, _ := ts.do(t, http.MethodGet, "/publish?id="+id, nil, key); code != 405 {
		t.Errorf("GET /publish: %d, want 405", code)
	}
	// What the first publish delivered.
	if p := readEvent(t, s2); p.Event != "alerts.fire" || string(p.Data) != `{"room":"kitchen"}` {
		t.Fatalf("s2 got %+v", p)
	}
}

// TestPubSubSlowConsumer: a subscriber that never reads is closed with
// 4008 and the others keep receiving.
func TestPubSubSlowConsumer(t *testing.T) {
	ts := newTestServer(t, Config{SendQueueBytes: 256 << 10, Registry: regCfgKeep()})
	id := ts.register(t, "pubsub")
	pub, slow, fast := ts.dial(t, id, ""), ts.dial(t, id, ""), ts.dial(t, id, "")
	ts.subscribe(t, slow, "x")
	ts.subscribe(t, fast, "x")
	frame := `{"action":"publish","event":"x","data":"` + strings.Repeat("y", 60<<10) + `"}`
	deadline := time.Now().Add(testTimeout)
	for sent := 0; ; sent++ {
		select {
		case code := <-ts.closes:
			if code != codeSlowConsumer {
				t.Fatalf("closed with %d", code)
			}
			write(t, pub, `{"action":"publish","event":"x","data":"after"}`)
			for {
				if p := readEvent(t, fast); string(p.Data) == `"after"` {
					return
				}
			}
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no 4008 after %d publishes", sent)
		}
		write(t, pub, frame)
		readEvent(t, fast)
	}
}

// FuzzParseAction: whatever a member sends, parseAction never panics, and
// what it accepts makes a publish envelope that is valid JSON carrying the
// event and the data unchanged.
func FuzzParseAction(f *testing.F) {
	for _, s := range []string{
		`{"action":"publish","event":"a.b","data":{"x":[1,"2",null]}}`,
		`{"action":"subscribe","event":"a.*.>"}`,
		`{"action":"unsubscribe:all"}`,
		`{"action":"publish","event":"a","data":"\u2028<\/script>"}`,
		`{"action":"publish","event":"a","data":1e400}`,
		`{"action":"publish","event":"a","event":"b"}`,
		`[]`, `null`, `{"action":1}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := parseAction(b)
		if err != nil {
			return
		}
		switch a.Action {
		case "subscribe", "unsubscribe":
			if !registry.ValidPattern(a.Event) {
				t.Fatalf("accepted pattern %q", a.Event)
			}
		case "unsubscribe:all":
		case "publish":
			if !registry.ValidEvent(a.Event) {
				t.Fatalf("accepted event %q", a.Event)
			}
			env := envelope(a.Event, a.Data, time.Unix(0, 0))
			var got struct {
				Event string          `json:"event"`
				Data  json.RawMessage `json:"data"`
			}
			if err := json.Unmarshal(env, &got); err != nil || got.Event != a.Event {
				t.Fatalf("envelope %s: %v", env, err)
			}
		default:
			t.Fatalf("accepted action %q", a.Action)
		}
	})
}
