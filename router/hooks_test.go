package router

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"wsrouter/registry"
	"wsrouter/router/webhook"
)

const hookSecret = "0123456789abcdef0123"

// hookReceiver is a backend on loopback: it answers connect events with
// connectStatus (and connectBody) and records every event it is sent.
type hookReceiver struct {
	*httptest.Server
	events        chan webhook.Event
	connectStatus int
	connectBody   string
}

func newHookReceiver(t *testing.T, connectStatus int, connectBody string) *hookReceiver {
	h := &hookReceiver{events: make(chan webhook.Event, 1000), connectStatus: connectStatus, connectBody: connectBody}
	h.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if !verifySig(r, body) {
			t.Errorf("webhook signature does not verify")
		}
		var ev webhook.Event
		json.Unmarshal(body, &ev)
		h.events <- ev
		if ev.Type == "connect" {
			w.WriteHeader(h.connectStatus)
			w.Write([]byte(h.connectBody))
			return
		}
		w.WriteHeader(204)
	}))
	t.Cleanup(h.Close)
	return h
}

func verifySig(r *http.Request, body []byte) bool {
	want := webhook.Sign([]byte(hookSecret), r.Header.Get("webhook-id"), r.Header.Get("webhook-timestamp"), body)
	return r.Header.Get("webhook-signature") == want
}

func (h *hookReceiver) next(t *testing.T) webhook.Event {
	t.Helper()
	select {
	case ev := <-h.events:
		return ev
	case <-time.After(testTimeout):
		t.Fatal("no webhook event")
		return webhook.Event{}
	}
}

func hookServer(t *testing.T) *testServer {
	return newTestServer(t, Config{AdminToken: "adm", Registry: regCfgKeep(),
		Webhooks: WebhookConfig{Allow: "127.0.0.1", Backoff: time.Millisecond}})
}

func (ts *testServer) registerHooked(t *testing.T, h *hookReceiver, events string) string {
	t.Helper()
	return ts.register(t, "lobby", "webhook", h.URL, "webhook_secret", hookSecret, "webhook_events", events)
}

func TestWebhookRegister(t *testing.T) {
	off := newTestServer(t, Config{})
	q := url.Values{"key": {"k"}, "host_key": {"h"}, "reg_type": {"lobby"}, "webhook": {"http://127.0.0.1:9/"}, "webhook_secret": {hookSecret}}
	if code, body, _ := off.do(t, "GET", "/register?"+q.Encode(), nil, nil); code != 400 || !strings.Contains(body, "webhooks are off") {
		t.Fatalf("webhook with -webhook-allow unset: got %d %q, want 400 saying why", code, body)
	}
	ts := hookServer(t)
	for _, tt := range []struct {
		name string
		set  map[string]string
		want string
	}{
		{"host not allowed", map[string]string{"webhook": "http://10.1.1.1/"}, "not allowed"},
		{"not http", map[string]string{"webhook": "ftp://127.0.0.1/"}, "http or https"},
		{"short secret", map[string]string{"webhook_secret": "short"}, "webhook_secret"},
		{"bad events", map[string]string{"webhook_events": "connect,later"}, "unknown webhook event"},
		{"secret without webhook", map[string]string{"webhook": ""}, "need a webhook"},
	} {
		q := url.Values{"key": {"k"}, "host_key": {"h"}, "reg_type": {"lobby"}, "webhook": {"http://127.0.0.1:9/"}, "webhook_secret": {hookSecret}}
		for k, v := range tt.set {
			q.Set(k, v)
		}
		if code, body, _ := ts.do(t, "GET", "/register?"+q.Encode(), nil, nil); code != 400 || !strings.Contains(body, tt.want) {
			t.Errorf("%s: got %d %q, want 400 with %q", tt.name, code, body, tt.want)
		}
	}
	h := newHookReceiver(t, 204, "")
	id := ts.registerHooked(t, h, "connect,message")
	_, body, _ := ts.do(t, "GET", "/stats", nil, http.Header{"Authorization": {"Bearer adm"}})
	if !strings.Contains(body, `"webhook":{"url":"`+h.URL+`","events":"connect,message"}`) || strings.Contains(body, hookSecret) {
		t.Fatalf("/stats: got %s, want the webhook of %s without its secret", body, id)
	}
}

func TestWebhookConnect(t *testing.T) {
	ts := hookServer(t)
	for _, tt := range []struct {
		name     string
		status   int
		body     string
		want     int
		wantName string
	}{
		{"admitted", 204, "", 101, ""},
		{"admitted and named", 200, `{"name":"sensor-9"}`, 101, "sensor-9"},
		{"refused 401", 401, "", 403, ""},
		{"refused 403", 403, "", 403, ""},
		{"failed 500", 500, "", 503, ""},
		{"bad name from the backend", 200, `{"name":"no spaces"}`, 503, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := newHookReceiver(t, tt.status, tt.body)
			id := ts.registerHooked(t, h, "connect,close")
			c, connID, resp, err := ts.dialNamed(t, id, "", "")
			got := 101
			if err != nil {
				if resp == nil {
					t.Fatal(err)
				}
				got = resp.StatusCode
			}
			ev := h.next(t)
			if ev.Type != "connect" || ev.Registration != id || ev.Role != "member" || !strings.HasPrefix(ev.RemoteAddr, "127.0.0.1:") {
				t.Fatalf("connect event: got %+v", ev)
			}
			if got != tt.want {
				t.Fatalf("connect: got %d, want %d", got, tt.want)
			}
			if got != 101 {
				return
			}
			if ev.Conn != connID {
				t.Fatalf("connect event names conn %s, the upgrade %s", ev.Conn, connID)
			}
			if m, _, ok := mustGet(t, ts, id).Lookup(registryName(tt.wantName, connID)); !ok || m.ID() != connID {
				t.Fatalf("member %q not found by %q", connID, tt.wantName)
			}
			c.Close(4100, "bye")
			if ev := h.next(t); ev.Type != "close" || ev.Conn != connID || *ev.Code != 4100 || *ev.Reason != "bye" || ev.Name != tt.wantName {
				t.Fatalf("close event: got %+v", ev)
			}
		})
	}
	// A backend that cannot be reached: fail closed.
	dead := newHookReceiver(t, 204, "")
	id := ts.registerHooked(t, dead, "connect")
	dead.Close()
	if _, _, resp, _ := ts.dialNamed(t, id, "", ""); resp == nil || resp.StatusCode != 503 {
		t.Fatalf("unreachable backend: got %v, want 503", resp)
	}
}

func TestWebhookMessages(t *testing.T) {
	ts := hookServer(t)
	h := newHookReceiver(t, 204, "")
	id := ts.registerHooked(t, h, "message,close")
	a, aID, _, _ := ts.dialNamed(t, id, "", "talker")
	b, _, _, _ := ts.dialNamed(t, id, "", "")
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	const n = 200
	for i := range n {
		write(t, a, strings.Repeat("m", i%7+1))
	}
	a.Write(ctx, websocket.MessageBinary, []byte{0xff, 0})
	for i := range n {
		// Forwarding goes on as usual whatever the backend does.
		if _, m := read(t, b); m != strings.Repeat("m", i%7+1) {
			t.Fatalf("member b got %q", m)
		}
	}
	for i := range n {
		ev := h.next(t)
		if ev.Type != "message" || ev.Conn != aID || ev.Name != "talker" || ev.Data == nil || *ev.Data != strings.Repeat("m", i%7+1) {
			t.Fatalf("message event %d: got %+v", i, ev)
		}
	}
	if ev := h.next(t); ev.Type != "message" || ev.DataBase64 == nil || *ev.DataBase64 != "/wA=" {
		t.Fatalf("binary message event: got %+v", ev)
	}
	a.CloseNow()
	if ev := h.next(t); ev.Type != "close" || *ev.Code != 1006 || *ev.Reason != "" {
		t.Fatalf("close without a close frame: got %+v, want 1006", ev)
	}
	if got := metricHistCount(t, ts, "wsrouter_webhook_call_seconds", "message/ok"); got != n+1 {
		t.Fatalf("webhook calls {message, ok}: got %d, want %d", got, n+1)
	}
}

// metricHistCount returns a histogram's sample count for labels joined by /.
func metricHistCount(t *testing.T, ts *testServer, name, lbls string) uint64 {
	t.Helper()
	for _, m := range scrape(t, ts)[name].GetMetric() {
		if labels(m) == lbls {
			return m.GetHistogram().GetSampleCount()
		}
	}
	return 0
}

// registryName is the selector of a member by name, or by conn without one.
func registryName(name, connID string) registry.Selector {
	if name != "" {
		return registry.Selector{Name: name}
	}
	return registry.Selector{ID: connID}
}
