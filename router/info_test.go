package router

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// watch opens /info with q and hdr and fails the test on a refusal.
func (ts *testServer) watch(t *testing.T, q url.Values, hdr http.Header, protocols ...string) *websocket.Conn {
	t.Helper()
	c, code := ts.tryWatch(t, q, hdr, protocols...)
	if c == nil {
		t.Fatalf("/info refused: %d", code)
	}
	return c
}

func (ts *testServer) tryWatch(t *testing.T, q url.Values, hdr http.Header, protocols ...string) (*websocket.Conn, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, ts.wsURL("/info", q), &websocket.DialOptions{HTTPHeader: hdr, Subprotocols: protocols})
	if err != nil {
		if resp == nil {
			t.Fatal(err)
		}
		return nil, resp.StatusCode
	}
	c.SetReadLimit(-1)
	t.Cleanup(func() { c.CloseNow() })
	return c, 101
}

// infoFrame is any frame of the info stream.
type infoMsg struct {
	Type          string          `json:"type"`
	Time          time.Time       `json:"time"`
	Registration  json.RawMessage `json:"registration"`
	Registrations []struct {
		ID      string       `json:"id"`
		RegType string       `json:"reg_type"`
		Members []memberJSON `json:"members"`
	} `json:"registrations"`
	Members []memberJSON `json:"members"`
	memberJSON
	Code    int    `json:"code"`
	Event   string `json:"event"`
	RegType string `json:"reg_type"`
}

func readInfo(t *testing.T, c *websocket.Conn) infoMsg {
	t.Helper()
	return readJSON[infoMsg](t, c)
}

// TestInfoRegistration: a snapshot first, then join, subscribe,
// unsubscribe, leave and remove in order, then 4000.
func TestInfoRegistration(t *testing.T) {
	ts := newTestServer(t, Config{Registry: regCfgKeep()})
	id := ts.register(t, "pubsub")
	first, conn1, _, _ := ts.dialNamed(t, id, "", "first")
	ts.subscribe(t, first, "a.>")

	w := ts.watch(t, url.Values{"id": {id}, "host_key": {testHostKey}}, nil)
	snap := readInfo(t, w)
	var reg struct{ ID, RegType string }
	json.Unmarshal(snap.Registration, &struct {
		ID      *string `json:"id"`
		RegType *string `json:"reg_type"`
	}{&reg.ID, &reg.RegType})
	if snap.Type != "snapshot" || reg.ID != id || reg.RegType != "pubsub" || len(snap.Members) != 1 ||
		snap.Members[0].Conn != conn1 || snap.Members[0].Name != "first" || len(snap.Members[0].Subscriptions) != 1 {
		t.Fatalf("snapshot %+v (registration %s)", snap, snap.Registration)
	}

	second, conn2, _, _ := ts.dialNamed(t, id, "", "second")
	ts.subscribe(t, second, "b")
	write(t, second, `{"action":"unsubscribe","event":"b"}`)
	second.Close(websocket.StatusNormalClosure, "bye")
	for _, want := range []struct {
		typ, event string
		code       int
	}{{"join", "", 0}, {"subscribe", "b", 0}, {"unsubscribe", "b", 0}, {"leave", "", 1000}} {
		m := readInfo(t, w)
		if m.Type != want.typ || m.Conn != conn2 || m.Name != "second" || m.Role != "member" || m.Event != want.event ||
			m.Code != want.code || m.Time.IsZero() || m.RemoteAddr == "" || len(m.Registration) != 0 {
			t.Fatalf("want %s: got %+v", want.typ, m)
		}
	}
	q := url.Values{"id": {id}, "key": {testKey}, "host_key": {testHostKey}}
	if code, body, _ := ts.do(t, http.MethodPost, "/remove?"+q.Encode(), nil, nil); code != 200 {
		t.Fatalf("remove: %d %s", code, body)
	}
	if m := readInfo(t, w); m.Type != "remove" || m.Time.IsZero() {
		t.Fatalf("want remove: %+v", m)
	}
	if code, reason := closeStatus(t, w); code != codeRemoved || reason != "registration removed" {
		t.Fatalf("watcher closed with %d %q, want 4000", code, reason)
	}
}

// TestInfoEverything: the admin's stream of every registration, register
// and remove events included, each event naming its registration.
func TestInfoEverything(t *testing.T) {
	ts := newTestServer(t, Config{AdminToken: "admin-secret", Registry: regCfgKeep()})
	old := ts.register(t, "lobby")
	ts.dial(t, old, "")
	// The browser's way: the token as a subprotocol.
	w := ts.watch(t, nil, nil, "wsrouter.info", "bearer."+base64.RawURLEncoding.EncodeToString([]byte("admin-secret")))
	if w.Subprotocol() != "wsrouter.info" {
		t.Fatalf("subprotocol %q", w.Subprotocol())
	}
	snap := readInfo(t, w)
	if snap.Type != "snapshot" || len(snap.Registrations) != 1 || snap.Registrations[0].ID != old ||
		snap.Registrations[0].RegType != "lobby" || len(snap.Registrations[0].Members) != 1 {
		t.Fatalf("snapshot %+v", snap)
	}
	id := ts.register(t, "hostclient")
	m := readInfo(t, w)
	if m.Type != "register" || string(m.Registration) != fmt.Sprintf("%q", id) || m.RegType != "hostclient" {
		t.Fatalf("want register: %+v", m)
	}
	_, conn, _, _ := ts.dialNamed(t, id, "host", "dev")
	if m := readInfo(t, w); m.Type != "join" || string(m.Registration) != fmt.Sprintf("%q", id) || m.Conn != conn || m.Role != "host" {
		t.Fatalf("want join: %+v", m)
	}
	q := url.Values{"id": {id}, "key": {testKey}, "host_key": {testHostKey}}
	ts.do(t, http.MethodPost, "/remove?"+q.Encode(), nil, nil)
	// A removal takes its members with it: no leave events.
	if m := readInfo(t, w); m.Type != "remove" || string(m.Registration) != fmt.Sprintf("%q", id) {
		t.Fatalf("want remove: %+v", m)
	}
	// Still open: the stream of everything outlives a registration.
	ts.register(t, "lobby")
	if m := readInfo(t, w); m.Type != "register" {
		t.Fatalf("want register: %+v", m)
	}
}

func TestInfoStatuses(t *testing.T) {
	ts := newTestServer(t, Config{AdminToken: "admin-secret", Registry: regCfgKeep()})
	id := ts.register(t, "lobby")
	admin := http.Header{"Authorization": {"Bearer admin-secret"}}
	for _, c := range []struct {
		name string
		q    url.Values
		hdr  http.Header
		want int
	}{
		{"one, host key", url.Values{"id": {id}, "host_key": {testHostKey}}, nil, 101},
		{"one, X-Host-Key", url.Values{"id": {id}}, http.Header{"X-Host-Key": {testHostKey}}, 101},
		{"one, admin", url.Values{"id": {id}}, admin, 101},
		{"all, admin", nil, admin, 101},
		{"all, no token", nil, nil, 401},
		{"all, wrong token", nil, http.Header{"Authorization": {"Bearer nope"}}, 401},
		{"all, a host key is not enough", url.Values{"host_key": {testHostKey}}, nil, 401},
		{"one, no credentials", url.Values{"id": {id}}, nil, 400},
		{"one, the key is not enough", url.Values{"id": {id}, "key": {testKey}}, nil, 400},
		{"one, wrong host key", url.Values{"id": {id}, "host_key": {"nope"}}, nil, 403},
		{"one, unknown id", url.Values{"id": {"nope"}, "host_key": {testHostKey}}, nil, 404},
	} {
		if _, code := ts.tryWatch(t, c.q, c.hdr); code != c.want {
			t.Errorf("%s: %d, want %d", c.name, code, c.want)
		}
	}
	if code, _, _ := ts.do(t, http.MethodGet, "/info?id="+id, nil, http.Header{"X-Host-Key": {testHostKey}}); code != 400 {
		t.Errorf("plain GET: %d, want 400", code)
	}

	// One registration's owner cannot take every stream: past its cap it
	// gets 503, and the admin's stream of everything still opens.
	other := ts.register(t, "lobby")
	q := url.Values{"id": {other}, "host_key": {testHostKey}}
	for i := range maxWatchersPerReg {
		if _, code := ts.tryWatch(t, q, nil); code != 101 {
			t.Fatalf("watcher %d: %d", i, code)
		}
	}
	if _, code := ts.tryWatch(t, q, nil); code != 503 {
		t.Fatalf("watcher past the cap: %d, want 503", code)
	}
	if _, code := ts.tryWatch(t, nil, admin); code != 101 {
		t.Fatalf("the admin's stream beside them: %d, want 101", code)
	}
}

// TestInfoWatcherFallsBehind: a watcher that never reads is closed with
// 4008 while the members it watches keep talking.
func TestInfoWatcherFallsBehind(t *testing.T) {
	ts := newTestServer(t, Config{SendQueueBytes: 64 << 10, Registry: regCfgKeep()})
	id := ts.register(t, "pubsub")
	a, b := ts.dial(t, id, ""), ts.dial(t, id, "")
	ts.subscribe(t, b, "chat")
	ts.watch(t, url.Values{"id": {id}, "host_key": {testHostKey}}, nil) // never read
	pattern := strings.Repeat("p", 120)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	// Every subscribe and unsubscribe is an event of about 300 bytes.
	for i := 0; ; i++ {
		select {
		case code := <-ts.closes:
			if code != codeSlowConsumer {
				t.Fatalf("closed with %d, want 4008", code)
			}
			write(t, a, `{"action":"publish","event":"chat","data":"still here"}`)
			if p := readEvent(t, b); string(p.Data) != `"still here"` {
				t.Fatalf("after the watcher's 4008: %+v", p)
			}
			return
		case <-ctx.Done():
			t.Fatalf("no 4008 after %d actions", i)
		default:
		}
		act := "subscribe"
		if i%2 == 1 {
			act = "unsubscribe"
		}
		if err := a.Write(ctx, websocket.MessageText, []byte(`{"action":"`+act+`","event":"`+pattern+`"}`)); err != nil {
			t.Fatal(err)
		}
	}
}
