package router

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"wsrouter/registry"
)

var hex32 = regexp.MustCompile(`^[0-9a-f]{32}$`)

func TestRegister(t *testing.T) {
	ts := newTestServer(t, Config{Registry: registry.Config{MaxRegistrations: 5}})
	ts.register(t, "lobby", "id_req", "taken")

	long := strings.Repeat("k", 73)
	tests := []struct {
		name     string
		method   string
		query    string
		form     string
		accept   string
		hdr      http.Header
		want     int
		wantBody string // exact, or a regexp when it starts with ^
	}{
		{name: "minted id", method: "GET", query: "key=a&host_key=b&reg_type=lobby", want: 200, wantBody: `^[0-9a-f]{32}$`},
		{name: "post form", method: "POST", form: "key=a&host_key=b&reg_type=hostclient", want: 200, wantBody: `^[0-9a-f]{32}$`},
		{name: "json", method: "GET", query: "key=a&host_key=b&reg_type=hostclient&id_req=j.s_o-n", accept: "text/html, application/json;q=0.9", want: 200, wantBody: `{"id":"j.s_o-n","reg_type":"hostclient"}` + "\n"},
		{name: "keys in headers", method: "GET", query: "reg_type=lobby", hdr: http.Header{"X-Key": {"a"}, "X-Host-Key": {"b"}}, want: 200},
		{name: "at capacity", method: "GET", query: "key=a&host_key=b&reg_type=lobby", want: 503},
		{name: "id taken", method: "GET", query: "key=a&host_key=b&reg_type=lobby&id_req=taken", want: 409},
		{name: "missing key", method: "GET", query: "host_key=b&reg_type=lobby", want: 400},
		{name: "missing host_key", method: "GET", query: "key=a&reg_type=lobby", want: 400},
		{name: "empty key", method: "GET", query: "key=&host_key=b&reg_type=lobby", want: 400},
		{name: "key too long", method: "GET", query: "key=" + long + "&host_key=b&reg_type=lobby", want: 400},
		{name: "missing reg_type", method: "GET", query: "key=a&host_key=b", want: 400},
		{name: "bad reg_type", method: "GET", query: "key=a&host_key=b&reg_type=topics", want: 400},
		{name: "bad id_req", method: "GET", query: "key=a&host_key=b&reg_type=lobby&id_req=a/b", want: 400},
		{name: "id_req too long", method: "GET", query: "key=a&host_key=b&reg_type=lobby&id_req=" + strings.Repeat("i", 65), want: 400},
		{name: "repeated key", method: "GET", query: "key=a&key=c&host_key=b&reg_type=lobby", want: 400},
		{name: "form too large", method: "POST", form: "key=a&host_key=b&reg_type=lobby&pad=" + strings.Repeat("x", maxFormBytes), want: 413},
		{name: "wrong method", method: "PUT", query: "key=a&host_key=b&reg_type=lobby", want: 405},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var body *strings.Reader
			hdr := http.Header{}
			for k, v := range tt.hdr {
				hdr[k] = v
			}
			if tt.form != "" {
				body = strings.NewReader(tt.form)
				hdr.Set("Content-Type", "application/x-www-form-urlencoded")
			} else {
				body = strings.NewReader("")
			}
			if tt.accept != "" {
				hdr.Set("Accept", tt.accept)
			}
			code, got, h := ts.do(t, tt.method, "/register?"+tt.query, body, hdr)
			if code != tt.want {
				t.Fatalf("got status %d (%q), want %d", code, got, tt.want)
			}
			if code != 200 {
				if ct := h.Get("Content-Type"); ct != "text/plain; charset=utf-8" {
					t.Errorf("got Content-Type %q, want text/plain; charset=utf-8", ct)
				}
				if strings.Count(strings.TrimSuffix(got, "\n"), "\n") != 0 || got == "" {
					t.Errorf("got body %q, want one line", got)
				}
			}
			if code == 405 && h.Get("Allow") == "" {
				t.Errorf("405 without Allow")
			}
			if h.Get("Access-Control-Allow-Origin") != "*" {
				t.Errorf("got Access-Control-Allow-Origin %q, want *", h.Get("Access-Control-Allow-Origin"))
			}
			switch {
			case tt.wantBody == "":
			case strings.HasPrefix(tt.wantBody, "^"):
				if !regexp.MustCompile(tt.wantBody).MatchString(got) {
					t.Errorf("got body %q, want %s", got, tt.wantBody)
				}
			case got != tt.wantBody:
				t.Errorf("got body %q, want %q", got, tt.wantBody)
			}
		})
	}
}

func TestRegisterKeysAreHashedNotEchoed(t *testing.T) {
	ts := newTestServer(t, Config{})
	hdr := http.Header{"X-Key": {"secret-one"}, "X-Host-Key": {"secret-two"}, "Accept": {"application/json"}}
	code, body, _ := ts.do(t, "GET", "/register?reg_type=lobby", nil, hdr)
	if code != 200 {
		t.Fatalf("got %d, want 200", code)
	}
	if strings.Contains(body, "secret") {
		t.Fatalf("body %q echoes a key", body)
	}
	var got struct{ ID, RegType string }
	if err := json.Unmarshal([]byte(body), &got); err != nil || !hex32.MatchString(got.ID) {
		t.Fatalf("got %q (%v), want a JSON object with a 32-hex id", body, err)
	}
	// Header keys work for joining too.
	if _, _, err := ts.tryDial(t, got.ID, "", "", http.Header{"X-Key": {"secret-one"}}); err != nil {
		t.Fatalf("dial with X-Key: %v", err)
	}
}

func TestConnectRefusals(t *testing.T) {
	ts := newTestServer(t, Config{
		AllowedOrigins: []string{"*.example.com"},
		Registry:       registry.Config{MaxMembers: 1},
	})
	lobby := ts.register(t, "lobby")
	hc := ts.register(t, "hostclient")
	full := ts.register(t, "lobby")
	ts.dial(t, full, "")

	tests := []struct {
		name string
		id   string
		key  string
		role string
		hdr  http.Header
		want int
	}{
		{name: "missing id", id: "", key: testKey, want: 400},
		{name: "malformed id", id: "a b", key: testKey, want: 400},
		{name: "missing key", id: lobby, want: 400},
		{name: "unknown id", id: "nope", key: testKey, want: 404},
		{name: "wrong key", id: lobby, key: "wrong", want: 403},
		{name: "host key is not the key", id: lobby, key: testHostKey, want: 403},
		{name: "missing sock_type", id: hc, key: testKey, want: 400},
		{name: "bad sock_type", id: hc, key: testKey, role: "admin", want: 400},
		{name: "origin refused", id: lobby, key: testKey, hdr: http.Header{"Origin": {"https://evil.test"}}, want: 403},
		{name: "full", id: full, key: testKey, want: 503},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, resp, err := ts.tryDial(t, tt.id, tt.key, tt.role, tt.hdr)
			if err == nil {
				t.Fatalf("dial succeeded, want %d", tt.want)
			}
			if resp == nil || resp.StatusCode != tt.want {
				t.Fatalf("got %v, want status %d", resp, tt.want)
			}
		})
	}

	t.Run("origin allowed", func(t *testing.T) {
		lobby := ts.register(t, "lobby")
		c, _, err := ts.tryDial(t, lobby, testKey, "", http.Header{"Origin": {"https://app.example.com"}})
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		c.CloseNow()
	})
	t.Run("sock_type ignored in a lobby", func(t *testing.T) {
		lobby := ts.register(t, "lobby")
		c, _, err := ts.tryDial(t, lobby, testKey, "whatever", nil)
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		c.CloseNow()
	})
	t.Run("not an upgrade", func(t *testing.T) {
		code, _, _ := ts.do(t, "GET", "/connect?"+url.Values{"id": {lobby}, "key": {testKey}}.Encode(), nil, nil)
		if code != 400 {
			t.Fatalf("got %d, want 400", code)
		}
	})
	t.Run("wrong method", func(t *testing.T) {
		code, _, h := ts.do(t, "POST", "/connect?id="+lobby, nil, nil)
		if code != 405 || !strings.Contains(h.Get("Allow"), "GET") {
			t.Fatalf("got %d Allow %q, want 405 with GET", code, h.Get("Allow"))
		}
	})
}

func TestConnectionID(t *testing.T) {
	ts := newTestServer(t, Config{})
	id := ts.register(t, "lobby")
	ids := map[string]bool{}
	for range 3 {
		// Each stays: with zero GC grace the registration would go with
		// its last member.
		_, resp, err := ts.tryDial(t, id, testKey, "", nil)
		if err != nil {
			t.Fatal(err)
		}
		cid := resp.Header.Get("X-Connection-Id")
		if !hex32.MatchString(cid) || ids[cid] {
			t.Fatalf("got X-Connection-Id %q, want fresh 32 hex", cid)
		}
		ids[cid] = true
	}
}

func TestRepeatedConnectSkipsBcrypt(t *testing.T) {
	ts := newTestServer(t, Config{})
	id := ts.register(t, "lobby")
	want := []registry.KeyCheck{registry.KeyBcrypt, registry.KeyRemembered, registry.KeyRemembered}
	for i, w := range want {
		// Each stays connected: with the test's zero GC grace the
		// registration would go with its last member.
		ts.dial(t, id, "")
		select {
		case got := <-ts.checks:
			if got != w {
				t.Fatalf("connect %d: got key check %v, want %v", i, got, w)
			}
		case <-time.After(testTimeout):
			t.Fatal("no key check observed")
		}
	}
	// A wrong key never rides on the memo.
	if _, _, err := ts.tryDial(t, id, "wrong", "", nil); err == nil {
		t.Fatal("wrong key accepted")
	}
	if got := <-ts.checks; got != registry.KeyBcrypt {
		t.Fatalf("wrong key: got %v, want bcrypt", got)
	}
}

func TestLobbyRouting(t *testing.T) {
	ts := newTestServer(t, Config{})
	id := ts.register(t, "lobby")
	a, b, c := ts.dial(t, id, ""), ts.dial(t, id, ""), ts.dial(t, id, "")

	write(t, a, "from a")
	expectNext(t, b, "from a")
	expectNext(t, c, "from a")
	write(t, b, "from b")
	// a never gets its own message: the next thing a sees is b's.
	expectNext(t, a, "from b")
	expectNext(t, c, "from b")
}

func TestHostClientRouting(t *testing.T) {
	ts := newTestServer(t, Config{})
	id := ts.register(t, "hostclient")
	h1, h2 := ts.dial(t, id, "host"), ts.dial(t, id, "host")
	c1, c2 := ts.dial(t, id, "client"), ts.dial(t, id, "client")

	write(t, h1, "host says")
	expectNext(t, c1, "host says")
	expectNext(t, c2, "host says")
	write(t, c1, "client says")
	// h2 must not have seen h1's message: its first message is c1's.
	expectNext(t, h1, "client says")
	expectNext(t, h2, "client says")
	write(t, h2, "host2 says")
	// c2 must not have seen c1's message.
	expectNext(t, c1, "host2 says")
	expectNext(t, c2, "host2 says")
}

func TestBinaryAndTextKeptExact(t *testing.T) {
	ts := newTestServer(t, Config{})
	id := ts.register(t, "hostclient")
	h, c := ts.dial(t, id, "host"), ts.dial(t, id, "client")
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()

	bin := make([]byte, 70000)
	for i := range bin {
		bin[i] = byte(i * 7)
	}
	msgs := []struct {
		typ  websocket.MessageType
		data []byte
	}{
		{websocket.MessageBinary, bin},
		{websocket.MessageText, []byte("héllo ✓")},
		{websocket.MessageBinary, []byte{0, 0xff, 0xfe}},
		{websocket.MessageText, []byte("")},
	}
	for _, m := range msgs {
		if err := c.Write(ctx, m.typ, m.data); err != nil {
			t.Fatal(err)
		}
	}
	for i, m := range msgs {
		typ, got, err := h.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if typ != m.typ || !bytes.Equal(got, m.data) {
			t.Fatalf("message %d: got %v of %d bytes, want %v of %d bytes", i, typ, len(got), m.typ, len(m.data))
		}
	}
	// And back the other way.
	if err := h.Write(ctx, websocket.MessageBinary, bin); err != nil {
		t.Fatal(err)
	}
	if typ, got, err := c.Read(ctx); err != nil || typ != websocket.MessageBinary || !bytes.Equal(got, bin) {
		t.Fatalf("host to client: got %v %d bytes %v, want binary %d bytes", typ, len(got), err, len(bin))
	}
}

func TestOrderPerSender(t *testing.T) {
	ts := newTestServer(t, Config{})
	id := ts.register(t, "lobby")
	s1, s2, r := ts.dial(t, id, ""), ts.dial(t, id, ""), ts.dial(t, id, "")
	const n = 2000
	var wg sync.WaitGroup
	for _, s := range []struct {
		c    *websocket.Conn
		name string
	}{{s1, "a"}, {s2, "b"}} {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
			defer cancel()
			for i := range n {
				if err := s.c.Write(ctx, websocket.MessageText, fmt.Appendf(nil, "%s%d", s.name, i)); err != nil {
					t.Errorf("write: %v", err)
					return
				}
			}
		})
	}
	// s1 and s2 also receive each other's messages; drain them so they are
	// not slow consumers.
	for _, c := range []*websocket.Conn{s1, s2} {
		wg.Go(func() {
			for range n {
				read(t, c)
			}
		})
	}
	next := map[byte]int{'a': 0, 'b': 0}
	for range 2 * n {
		_, m := read(t, r)
		want := next[m[0]]
		if got := m[1:]; got != fmt.Sprint(want) {
			t.Fatalf("from %c: got %s, want %d", m[0], got, want)
		}
		next[m[0]]++
	}
	wg.Wait()
}

func TestSlowConsumerClosed(t *testing.T) {
	ts := newTestServer(t, Config{SendQueueBytes: 256 << 10, WriteTimeout: testTimeout})
	id := ts.register(t, "lobby")
	sender, slow, fast := ts.dial(t, id, ""), ts.dial(t, id, ""), ts.dial(t, id, "")

	slowClosed := make(chan struct{})
	go func() {
		waitFor(t, ts.closes, "a 4008 close", func(c int) bool { return c == codeSlowConsumer })
		close(slowClosed)
	}()

	// slow never reads, so its socket buffers fill, its writer blocks and
	// its queue overflows. fast reads each message before the next is sent,
	// so it never falls behind and must receive every one.
	payload := bytes.Repeat([]byte("x"), 64<<10)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	sent := 0
loop:
	for {
		select {
		case <-slowClosed:
			break loop
		case <-ctx.Done():
			t.Fatalf("no 4008 after %d messages", sent)
		default:
		}
		if err := sender.Write(ctx, websocket.MessageBinary, payload); err != nil {
			t.Fatalf("write: %v", err)
		}
		sent++
		if _, b, err := fast.Read(ctx); err != nil || len(b) != len(payload) {
			t.Fatalf("fast member, message %d: got %d bytes, %v", sent, len(b), err)
		}
	}
	write(t, sender, "after")
	expectNext(t, fast, "after")
	if code, reason := closeStatus(t, slow); code != codeSlowConsumer || reason != "slow consumer" {
		t.Fatalf("slow member closed with %d %q, want 4008 slow consumer", code, reason)
	}
}

func TestMessageTooBig(t *testing.T) {
	ts := newTestServer(t, Config{MaxMessage: 1024})
	id := ts.register(t, "lobby")
	a, b := ts.dial(t, id, ""), ts.dial(t, id, "")
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	// Exactly at the limit passes.
	if err := a.Write(ctx, websocket.MessageBinary, make([]byte, 1024)); err != nil {
		t.Fatal(err)
	}
	if _, m := read(t, b); len(m) != 1024 {
		t.Fatalf("got %d bytes, want 1024", len(m))
	}
	a.Write(ctx, websocket.MessageBinary, make([]byte, 1025))
	if code, _ := closeStatus(t, a); code != websocket.StatusMessageTooBig {
		t.Fatalf("got close %d, want 1009", code)
	}
	// The other member stays.
	c := ts.dial(t, id, "")
	write(t, c, "still here")
	expectNext(t, b, "still here")
}

func TestPingTimeout(t *testing.T) {
	// A timeout long enough that a member which reads always answers in
	// time on a loaded machine.
	ts := newTestServer(t, Config{PingInterval: 50 * time.Millisecond, PingTimeout: time.Second})
	id := ts.register(t, "lobby")

	// A member that reads answers pings and stays through several of them.
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	alive, pings := ts.dialPinged(t, id)
	readErr := make(chan error, 1)
	go func() {
		_, _, err := alive.Read(ctx)
		readErr <- err
	}()

	// A member that never reads never answers.
	mute := ts.dial(t, id, "")
	waitFor(t, ts.closes, "a ping timeout", func(c int) bool { return c == codePingTimeout })
	if code, _ := closeStatus(t, mute); code != -1 {
		t.Fatalf("mute member: got close code %d, want the socket dropped", code)
	}

	for range 5 {
		select {
		case <-pings:
		case <-ctx.Done():
			t.Fatal("no pings")
		}
	}
	other := ts.dial(t, id, "")
	write(t, other, "ping survived")
	if err := <-readErr; err != nil {
		t.Fatalf("alive member: %v", err)
	}
}

func TestRemove(t *testing.T) {
	ts := newTestServer(t, Config{})
	id := ts.register(t, "hostclient")
	h, c := ts.dial(t, id, "host"), ts.dial(t, id, "client")
	q := url.Values{"id": {id}, "key": {testKey}, "host_key": {testHostKey}}

	tests := []struct {
		name   string
		method string
		query  url.Values
		want   int
	}{
		{"wrong host key", "GET", url.Values{"id": {id}, "key": {testKey}, "host_key": {"x"}}, 403},
		{"wrong key", "GET", url.Values{"id": {id}, "key": {"x"}, "host_key": {testHostKey}}, 403},
		{"missing host key", "GET", url.Values{"id": {id}, "key": {testKey}}, 400},
		{"unknown", "GET", url.Values{"id": {"unknown"}, "key": {testKey}, "host_key": {testHostKey}}, 404},
		{"wrong method", "PUT", q, 405},
	}
	bodies := map[string]bool{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, body, _ := ts.do(t, tt.method, "/remove?"+tt.query.Encode(), nil, nil)
			if code != tt.want {
				t.Fatalf("got %d, want %d", code, tt.want)
			}
			if code == 403 {
				bodies[body] = true
			}
		})
	}
	if len(bodies) != 1 {
		t.Errorf("got 403 bodies %v, want one body for both keys", bodies)
	}

	code, body, _ := ts.do(t, "DELETE", "/remove?"+q.Encode(), nil, nil)
	if code != 200 || body != "" {
		t.Fatalf("got %d %q, want 200 and an empty body", code, body)
	}
	for _, m := range []*websocket.Conn{h, c} {
		if code, reason := closeStatus(t, m); code != codeRemoved || reason != "registration removed" {
			t.Fatalf("got close %d %q, want 4000 registration removed", code, reason)
		}
	}
	if code, _, _ := ts.do(t, "GET", "/remove?"+q.Encode(), nil, nil); code != 404 {
		t.Fatalf("remove again: got %d, want 404", code)
	}
	if _, resp, _ := ts.tryDial(t, id, testKey, "host", nil); resp == nil || resp.StatusCode != 404 {
		t.Fatalf("connect after remove: got %v, want 404", resp)
	}
}

func TestRemoveByPostForm(t *testing.T) {
	ts := newTestServer(t, Config{})
	id := ts.register(t, "lobby")
	form := url.Values{"id": {id}}
	hdr := http.Header{"Content-Type": {"application/x-www-form-urlencoded"}, "X-Key": {testKey}, "X-Host-Key": {testHostKey}}
	if code, _, _ := ts.do(t, "POST", "/remove", strings.NewReader(form.Encode()), hdr); code != 200 {
		t.Fatalf("got %d, want 200", code)
	}
}

func TestGarbageCollection(t *testing.T) {
	t.Run("kept within grace", func(t *testing.T) {
		ts := newTestServer(t, Config{Registry: registry.Config{GCGrace: time.Hour}})
		id := ts.register(t, "lobby")
		a := ts.dial(t, id, "")
		a.Close(websocket.StatusNormalClosure, "")
		// Rejoining works: the registration outlives its last member.
		b := ts.dial(t, id, "")
		b.Close(websocket.StatusNormalClosure, "")
		if _, err := ts.rt.registry.Get(id); err != nil {
			t.Fatalf("got %v, want the registration kept", err)
		}
	})
	t.Run("removed after grace", func(t *testing.T) {
		ts := newTestServer(t, Config{Registry: registry.Config{GCGrace: 30 * time.Millisecond}})
		id := ts.register(t, "lobby")
		a := ts.dial(t, id, "")
		a.Close(websocket.StatusNormalClosure, "")
		waitFor(t, ts.removed, "GC", func(c registry.Cause) bool { return c == registry.CauseGC })
		if _, resp, _ := ts.tryDial(t, id, testKey, "", nil); resp == nil || resp.StatusCode != 404 {
			t.Fatalf("got %v, want 404", resp)
		}
	})
	t.Run("unused ttl", func(t *testing.T) {
		ts := newTestServer(t, Config{Registry: registry.Config{UnusedTTL: 30 * time.Millisecond}})
		id := ts.register(t, "lobby")
		waitFor(t, ts.removed, "TTL", func(c registry.Cause) bool { return c == registry.CauseUnused })
		if _, resp, _ := ts.tryDial(t, id, testKey, "", nil); resp == nil || resp.StatusCode != 404 {
			t.Fatalf("got %v, want 404", resp)
		}
	})
}

func TestIDReuseIsolation(t *testing.T) {
	ts := newTestServer(t, Config{Registry: registry.Config{GCGrace: 20 * time.Millisecond}})
	id := ts.register(t, "lobby", "id_req", "reused")
	old := ts.dial(t, id, "")
	q := url.Values{"id": {id}, "key": {testKey}, "host_key": {testHostKey}}
	if code, _, _ := ts.do(t, "GET", "/remove?"+q.Encode(), nil, nil); code != 200 {
		t.Fatal("remove failed")
	}
	ts.register(t, "lobby", "id_req", "reused")
	a, b := ts.dial(t, id, ""), ts.dial(t, id, "")
	// The old member's socket ends now and leaves its (removed)
	// registration late; the old registration's timers are gone too.
	closeStatus(t, old)
	write(t, a, "new room")
	expectNext(t, b, "new room")
	if _, err := ts.rt.registry.Get(id); err != nil {
		t.Fatalf("new registration: %v", err)
	}
	_, _, members := mustGet(t, ts, id).Counts()
	if members != 2 {
		t.Fatalf("got %d members, want 2", members)
	}
}

func mustGet(t *testing.T, ts *testServer, id string) *registry.Registration {
	t.Helper()
	reg, err := ts.rt.registry.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	return reg
}

func TestShutdown(t *testing.T) {
	ts := newTestServer(t, Config{})
	id := ts.register(t, "hostclient")
	h, c := ts.dial(t, id, "host"), ts.dial(t, id, "client")
	if code, body, _ := ts.do(t, "GET", "/healthz", nil, nil); code != 200 || body != "ok" {
		t.Fatalf("healthz: got %d %q, want 200 ok", code, body)
	}

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		defer cancel()
		done <- ts.rt.Shutdown(ctx)
	}()
	for _, m := range []*websocket.Conn{h, c} {
		if code, reason := closeStatus(t, m); code != websocket.StatusGoingAway || reason != "server shutting down" {
			t.Fatalf("got close %d %q, want 1001 server shutting down", code, reason)
		}
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if code, _, _ := ts.do(t, "GET", "/healthz", nil, nil); code != 503 {
		t.Fatalf("healthz while shutting down: got %d, want 503", code)
	}
	if _, resp, _ := ts.tryDial(t, id, testKey, "host", nil); resp == nil || resp.StatusCode != 503 {
		t.Fatalf("connect while shutting down: got %v, want 503", resp)
	}
	if code, _, _ := ts.do(t, "GET", "/register?key=a&host_key=b&reg_type=lobby", nil, nil); code != 503 {
		t.Fatalf("register while shutting down: got %d, want 503", code)
	}
}

// TestIdleAfterWriteSurvivesPings guards against a batch's write deadline
// outliving the batch: pings and pongs written later would then fail, and
// the member would be dropped on its next message.
func TestIdleAfterWriteSurvivesPings(t *testing.T) {
	ts := newTestServer(t, Config{PingInterval: 50 * time.Millisecond, WriteTimeout: 500 * time.Millisecond})
	id := ts.register(t, "lobby")
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	r, pings := ts.dialPinged(t, id)
	s := ts.dial(t, id, "")
	write(t, s, "first")
	expectNext(t, r, "first")
	// Fifteen pings at 50 ms are past the 500 ms write timeout of the
	// batch that carried "first". r reads meanwhile, so it answers them.
	got := make(chan string, 1)
	go func() {
		_, b, err := r.Read(ctx)
		if err != nil {
			got <- err.Error()
			return
		}
		got <- string(b)
	}()
	for range 15 {
		select {
		case <-pings:
		case <-ctx.Done():
			t.Fatal("pings stopped")
		}
	}
	write(t, s, "second")
	if m := <-got; m != "second" {
		t.Fatalf("got %q, want second", m)
	}
}

// TestFailedUpgradeDoesNotHoldShutdown: a request that looks like an
// upgrade but fails in Accept must not leave Shutdown waiting for it.
func TestFailedUpgradeDoesNotHoldShutdown(t *testing.T) {
	ts := newTestServer(t, Config{Registry: registry.Config{GCGrace: time.Hour}})
	id := ts.register(t, "lobby")
	hdr := http.Header{"Connection": {"Upgrade"}, "Upgrade": {"websocket"}, "Sec-Websocket-Version": {"13"}, "Sec-Websocket-Key": {"x"}}
	q := url.Values{"id": {id}, "key": {testKey}}
	if code, _, _ := ts.do(t, "GET", "/connect?"+q.Encode(), nil, hdr); code < 400 {
		t.Fatalf("got %d, want a refusal from Accept", code)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := ts.rt.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v, want it to finish", err)
	}
}

func TestRemoveByDeleteForm(t *testing.T) {
	ts := newTestServer(t, Config{})
	id := ts.register(t, "lobby")
	form := url.Values{"id": {id}, "key": {testKey}, "host_key": {testHostKey}}
	hdr := http.Header{"Content-Type": {"application/x-www-form-urlencoded"}}
	if code, body, _ := ts.do(t, "DELETE", "/remove", strings.NewReader(form.Encode()), hdr); code != 200 {
		t.Fatalf("got %d %q, want 200", code, body)
	}
}

func TestCORSPreflight(t *testing.T) {
	ts := newTestServer(t, Config{})
	hdr := http.Header{"Origin": {"https://app.example"}, "Access-Control-Request-Method": {"DELETE"}, "Access-Control-Request-Headers": {"x-key"}}
	code, _, h := ts.do(t, "OPTIONS", "/remove", nil, hdr)
	if code != 204 || h.Get("Access-Control-Allow-Origin") != "*" ||
		!strings.Contains(h.Get("Access-Control-Allow-Methods"), "DELETE") ||
		!strings.Contains(h.Get("Access-Control-Allow-Headers"), "X-Key") {
		t.Fatalf("got %d %v, want 204 allowing DELETE and X-Key from any origin", code, h)
	}
	if code, _, _ := ts.do(t, "HEAD", "/healthz", nil, nil); code != 200 {
		t.Fatalf("HEAD /healthz: got %d, want 200", code)
	}
}

// TestStalledWriteDropped: a member whose writes stall past -write-timeout
// is dropped (no close frame can follow a broken write) while the others
// carry on.
func TestStalledWriteDropped(t *testing.T) {
	ts := newTestServer(t, Config{SendQueueBytes: 256 << 20, WriteTimeout: 500 * time.Millisecond})
	id := ts.register(t, "lobby")
	sender, stalled, fast := ts.dial(t, id, ""), ts.dial(t, id, ""), ts.dial(t, id, "")
	dropped := make(chan struct{})
	go func() {
		waitFor(t, ts.closes, "a write failure", func(c int) bool { return c == codeWriteFailed })
		close(dropped)
	}()
	payload := bytes.Repeat([]byte("y"), 256<<10)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	for sent := 0; ; sent++ {
		select {
		case <-dropped:
			write(t, sender, "after")
			for {
				if _, m := read(t, fast); m == "after" {
					break
				}
			}
			if code, _ := closeStatus(t, stalled); code != -1 {
				t.Fatalf("stalled member: got close %d, want the socket dropped", code)
			}
			return
		case <-ctx.Done():
			t.Fatalf("no write failure after %d messages", sent)
		default:
		}
		if err := sender.Write(ctx, websocket.MessageBinary, payload); err != nil {
			t.Fatal(err)
		}
		if _, b, err := fast.Read(ctx); err != nil || len(b) != len(payload) {
			t.Fatalf("fast member: %d bytes, %v", len(b), err)
		}
	}
}
