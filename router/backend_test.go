package router

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
	"wsrouter/registry"

	"github.com/coder/websocket"
)

// dialNamed joins id as role with a name and returns the connection and its
// connection id.
func (ts *testServer) dialNamed(t *testing.T, id, role, name string) (*websocket.Conn, string, *http.Response, error) {
	t.Helper()
	q := url.Values{"id": {id}, "key": {testKey}}
	if role != "" {
		q.Set("sock_type", role)
	}
	if name != "" {
		q.Set("name", name)
	}
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, ts.wsURL("/connect", q), nil)
	if err != nil {
		return nil, "", resp, err
	}
	c.SetReadLimit(-1)
	t.Cleanup(func() { c.CloseNow() })
	return c, resp.Header.Get("X-Connection-Id"), resp, nil
}

func TestMemberNames(t *testing.T) {
	ts := newTestServer(t, Config{Registry: regCfgKeep()})
	id := ts.register(t, "hostclient")
	old, _, _, err := ts.dialNamed(t, id, "host", "garage")
	if err != nil {
		t.Fatal(err)
	}
	client, _, _, err := ts.dialNamed(t, id, "client", "phone")
	if err != nil {
		t.Fatal(err)
	}
	// A client can never push a host out.
	if _, _, resp, _ := ts.dialNamed(t, id, "client", "garage"); resp == nil || resp.StatusCode != http.StatusConflict {
		t.Fatalf("a client taking the host's name: got %v, want 409", resp)
	}
	for _, bad := range []string{"has space", strings.Repeat("n", 65), "é", "a/b"} {
		if _, _, resp, _ := ts.dialNamed(t, id, "host", bad); resp == nil || resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("name %q: got %v, want 400", bad, resp)
		}
	}
	// The same role and name replaces: the old one gets 4001, the new
	// one receives from then on, nothing reaches both.
	newer, _, _, err := ts.dialNamed(t, id, "host", "garage")
	if err != nil {
		t.Fatal(err)
	}
	if code, reason := closeStatus(t, old); code != codeReplaced || reason != "replaced" {
		t.Fatalf("the replaced host: got %d %q, want 4001 replaced", code, reason)
	}
	write(t, client, "for the garage")
	expectNext(t, newer, "for the garage")
	if got := metricValue(t, ts, "wsrouter_closes_total", "code", "4001"); got != 1 {
		t.Errorf("closes{code=4001}: got %v, want 1", got)
	}
}

func backendURL(path, id string, q url.Values) string {
	if q == nil {
		q = url.Values{}
	}
	q.Set("id", id)
	return path + "?" + q.Encode()
}

func TestBackendStatuses(t *testing.T) {
	ts := newTestServer(t, Config{AdminToken: "adm", MaxMessage: 100, Registry: regCfgKeep()})
	hc := ts.register(t, "hostclient")
	lobby := ts.register(t, "lobby")
	_, hostConn, _, err := ts.dialNamed(t, hc, "host", "dev")
	if err != nil {
		t.Fatal(err)
	}
	hk := http.Header{"X-Host-Key": {testHostKey}}
	admin := http.Header{"Authorization": {"Bearer adm"}}
	text := http.Header{"X-Host-Key": {testHostKey}, "Content-Type": {"text/plain"}}
	nobody := strings.Repeat("0", 32)
	tests := []struct {
		name, method, path string
		hdr                http.Header
		body               string
		want               int
		wantBody           string
	}{
		{"send: no credentials", "POST", backendURL("/send", hc, nil), nil, "x", 400, "missing host_key"},
		{"send: no id", "POST", "/send?host_key=" + testHostKey, nil, "x", 400, "missing id"},
		{"send: unknown id", "POST", backendURL("/send", "nope", nil), hk, "x", 404, "registration not found"},
		{"send: wrong host key", "POST", backendURL("/send", hc, nil), http.Header{"X-Host-Key": {"wrong"}}, "x", 403, "forbidden"},
		{"send: the key is not the host key", "POST", backendURL("/send", hc, nil), http.Header{"X-Host-Key": {testKey}}, "x", 403, "forbidden"},
		{"send: wrong admin token", "POST", backendURL("/send", hc, nil), http.Header{"Authorization": {"Bearer nope"}}, "x", 403, "forbidden"},
		{"send: to all", "POST", backendURL("/send", hc, nil), hk, "x", 200, `{"delivered":1}`},
		{"send: by admin", "POST", backendURL("/send", hc, nil), admin, "x", 200, `{"delivered":1}`},
		{"send: to hosts", "POST", backendURL("/send", hc, url.Values{"to": {"host"}}), hk, "x", 200, `{"delivered":1}`},
		{"send: to clients (none)", "POST", backendURL("/send", hc, url.Values{"to": {"client"}}), hk, "x", 200, `{"delivered":0}`},
		{"send: to member in a hostclient", "POST", backendURL("/send", hc, url.Values{"to": {"member"}}), hk, "x", 400, "bad to"},
		{"send: to host in a lobby", "POST", backendURL("/send", lobby, url.Values{"to": {"host"}}), hk, "x", 400, "bad to"},
		{"send: by conn", "POST", backendURL("/send", hc, url.Values{"conn": {hostConn}}), hk, "x", 200, `{"delivered":1}`},
		{"send: by name", "POST", backendURL("/send", hc, url.Values{"name": {"dev"}}), hk, "x", 200, `{"delivered":1}`},
		{"send: conn not connected", "POST", backendURL("/send", hc, url.Values{"conn": {nobody}}), hk, "x", 404, "no such member"},
		{"send: name not connected", "POST", backendURL("/send", hc, url.Values{"name": {"ghost"}}), hk, "x", 404, "no such member"},
		{"send: two selectors", "POST", backendURL("/send", hc, url.Values{"name": {"dev"}, "to": {"host"}}), hk, "x", 400, "at most one"},
		{"send: bad conn", "POST", backendURL("/send", hc, url.Values{"conn": {"xyz"}}), hk, "x", 400, "malformed conn"},
		{"send: over -max-message", "POST", backendURL("/send", hc, nil), hk, strings.Repeat("x", 101), 413, "request body too large"},
		{"send: text not UTF-8", "POST", backendURL("/send", hc, nil), text, "\xff", 400, "UTF-8"},
		{"send: GET", "GET", backendURL("/send", hc, nil), hk, "", 405, "method not allowed"},
		{"member: neither conn nor name", "DELETE", backendURL("/member", hc, nil), hk, "", 400, "exactly one"},
		{"member: both", "DELETE", backendURL("/member", hc, url.Values{"conn": {hostConn}, "name": {"dev"}}), hk, "", 400, "at most one"},
		{"member: code out of range", "DELETE", backendURL("/member", hc, url.Values{"name": {"dev"}, "code": {"1000"}}), hk, "", 400, "bad code"},
		{"member: reason too long", "DELETE", backendURL("/member", hc, url.Values{"name": {"dev"}, "reason": {strings.Repeat("r", 121)}}), hk, "", 400, "bad reason"},
		{"member: no such member", "DELETE", backendURL("/member", hc, url.Values{"name": {"ghost"}}), hk, "", 404, "no such member"},
		{"member: wrong host key", "DELETE", backendURL("/member", hc, url.Values{"name": {"dev"}}), http.Header{"X-Host-Key": {"wrong"}}, "", 403, "forbidden"},
		{"members: no credentials", "GET", backendURL("/members", hc, nil), nil, "", 400, "missing host_key"},
		{"members: unknown id", "GET", backendURL("/members", "nope", nil), hk, "", 404, "registration not found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, body, _ := ts.do(t, tt.method, tt.path, strings.NewReader(tt.body), tt.hdr)
			if code != tt.want || !strings.Contains(body, tt.wantBody) {
				t.Fatalf("got %d %q, want %d with %q", code, body, tt.want, tt.wantBody)
			}
		})
	}
}

// TestBackendSend: what /send queues arrives as the member's messages do,
// text or binary by Content-Type, in order.
func TestBackendSend(t *testing.T) {
	ts := newTestServer(t, Config{Registry: regCfgKeep()})
	id := ts.register(t, "hostclient")
	host, _, _, _ := ts.dialNamed(t, id, "host", "dev")
	c1, c1ID, _, _ := ts.dialNamed(t, id, "client", "")
	c2, _, _, _ := ts.dialNamed(t, id, "client", "")
	send := func(q url.Values, ct, body string) string {
		t.Helper()
		code, b, _ := ts.do(t, "POST", backendURL("/send", id, q), strings.NewReader(body), http.Header{"X-Host-Key": {testHostKey}, "Content-Type": {ct}})
		if code != 200 {
			t.Fatalf("send: %d %q", code, b)
		}
		return strings.TrimSpace(b)
	}
	if got := send(url.Values{"to": {"client"}}, "application/json; charset=utf-8", `{"a":1}`); got != `{"delivered":2}` {
		t.Fatalf("to clients: %s", got)
	}
	for _, c := range []*websocket.Conn{c1, c2} {
		if typ, m := read(t, c); typ != websocket.MessageText || m != `{"a":1}` {
			t.Fatalf("client got %v %q", typ, m)
		}
	}
	send(url.Values{"conn": {c1ID}}, "application/octet-stream", "\x00\x01")
	if typ, m := read(t, c1); typ != websocket.MessageBinary || m != "\x00\x01" {
		t.Fatalf("by conn: got %v %q, want the binary message", typ, m)
	}
	send(url.Values{"name": {"dev"}}, "application/vnd.x+json", `{}`)
	if typ, m := read(t, host); typ != websocket.MessageText || m != `{}` {
		t.Fatalf("by name: got %v %q", typ, m)
	}
	// Order: many sends to one member arrive as sent.
	for i := range 50 {
		send(url.Values{"conn": {c1ID}}, "text/plain", string(rune('A'+i%26)))
	}
	for i := range 50 {
		expectNext(t, c1, string(rune('A'+i%26)))
	}
	// c2 got nothing of those: the marker comes first.
	send(url.Values{"to": {"client"}}, "text/plain", "marker")
	expectNext(t, c2, "marker")
}

func TestBackendCloseAndList(t *testing.T) {
	ts := newTestServer(t, Config{AdminToken: "adm", Registry: regCfgKeep()})
	id := ts.register(t, "lobby")
	a, aID, _, _ := ts.dialNamed(t, id, "", "alice")
	_, bID, _, _ := ts.dialNamed(t, id, "", "")
	hk := http.Header{"X-Host-Key": {testHostKey}}
	code, body, h := ts.do(t, "GET", backendURL("/members", id, nil), nil, hk)
	if code != 200 || h.Get("Content-Type") != "application/json" {
		t.Fatalf("members: %d %q", code, body)
	}
	var list struct {
		Members []map[string]any `json:"members"`
	}
	if err := json.Unmarshal([]byte(body), &list); err != nil {
		t.Fatal(err)
	}
	if len(list.Members) != 2 {
		t.Fatalf("members: got %s", body)
	}
	first := list.Members[0]
	if first["conn"] != aID || first["role"] != "member" || first["name"] != "alice" || !strings.HasPrefix(first["remote_addr"].(string), "127.0.0.1:") {
		t.Fatalf("first member: got %v", first)
	}
	if at, err := time.Parse(time.RFC3339Nano, first["connected_at"].(string)); err != nil || time.Since(at) > time.Minute {
		t.Fatalf("connected_at: %v %v", first["connected_at"], err)
	}
	if _, named := list.Members[1]["name"]; named || list.Members[1]["conn"] != bID {
		t.Fatalf("second member: got %v, want no name", list.Members[1])
	}
	if _, body, _ := ts.do(t, "GET", "/stats", nil, http.Header{"Authorization": {"Bearer adm"}}); !strings.Contains(body, `"names":["alice"]`) {
		t.Fatalf("/stats: got %s, want alice's name", body)
	}

	q := url.Values{"name": {"alice"}, "code": {"4100"}, "reason": {"bye"}}
	if code, body, _ := ts.do(t, "DELETE", backendURL("/member", id, q), nil, hk); code != 200 || body != "" {
		t.Fatalf("close: %d %q", code, body)
	}
	if code, reason := closeStatus(t, a); code != 4100 || reason != "bye" {
		t.Fatalf("closed with %d %q, want 4100 bye", code, reason)
	}
	cConn, cID, _, _ := ts.dialNamed(t, id, "", "")
	if code, _, _ := ts.do(t, "DELETE", backendURL("/member", id, url.Values{"conn": {cID}}), nil, hk); code != 200 {
		t.Fatalf("close by conn: %d", code)
	}
	if code, reason := closeStatus(t, cConn); code != codeByBackend || reason != "closed by backend" {
		t.Fatalf("closed with %d %q, want the default 4002 closed by backend", code, reason)
	}
}

// brokenStore fails every write.
type brokenStore struct{ registry.MemoryStore }

func (*brokenStore) Put(context.Context, registry.Record) error { return errors.New("disk full") }
func (*brokenStore) Delete(context.Context, registry.Ref) error { return errors.New("disk full") }

// TestStoreFailure: a store that fails is a 503 with Retry-After (not a
// 500), counted, and the registration stays as it was.
func TestStoreFailure(t *testing.T) {
	ts := newTestServer(t, Config{Registry: registry.Config{Store: &brokenStore{}}})
	code, body, h := ts.do(t, "GET", "/register?key=a&host_key=b&reg_type=lobby", nil, nil)
	if code != 503 || !strings.Contains(body, "storage unavailable") || h.Get("Retry-After") == "" {
		t.Fatalf("register on a broken store: got %d %q (Retry-After %q), want 503 storage unavailable", code, body, h.Get("Retry-After"))
	}
	if got := metricValue(t, ts, "wsrouter_store_errors_total", "op", "register"); got != 1 {
		t.Fatalf("store errors{op=register}: got %v, want 1", got)
	}
}
