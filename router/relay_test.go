package router

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
	"wsrouter/router/relay"

	"github.com/coder/websocket"
)

// pngBytes is the start of a PNG file: enough for content sniffing.
var pngBytes = []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde")

// device joins id as a host and answers each relay frame with whatever
// answer returns ("" answers nothing). It returns the received frames.
func (ts *testServer) device(t testing.TB, id string, answer func(relay.Request) string) (*websocket.Conn, <-chan relay.Request) {
	t.Helper()
	c := ts.dial(t, id, "host")
	frames := make(chan relay.Request, 10000)
	go func() {
		for {
			typ, b, err := c.Read(context.Background())
			if err != nil {
				return
			}
			var f relay.Request
			if typ != websocket.MessageText || json.Unmarshal(b, &f) != nil || f.RID == "" {
				continue
			}
			offer(frames, f) // a benchmark never reads them
			if reply := answer(f); reply != "" {
				if c.Write(context.Background(), websocket.MessageText, []byte(reply)) != nil {
					return
				}
			}
		}
	}()
	return c, frames
}

// reply builds a reply frame for f from the given fields.
func reply(f relay.Request, fields map[string]any) string {
	m := map[string]any{"rid": f.RID}
	for k, v := range fields {
		m[k] = v
	}
	b, _ := json.Marshal(m)
	return string(b)
}

func relayURL(id, path string, q url.Values) string {
	if q == nil {
		q = url.Values{}
	}
	if q.Get("key") == "" {
		q.Set("key", testKey)
	}
	return "/relay/" + id + path + "?" + q.Encode()
}

func TestRelayRequestFrame(t *testing.T) {
	ts := newTestServer(t, Config{})
	id := ts.register(t, "hostclient")
	_, frames := ts.device(t, id, func(f relay.Request) string { return reply(f, map[string]any{"content": "ok"}) })

	hdr := http.Header{
		"Content-Type":  {"text/plain"},
		"Authorization": {"Bearer device-token"},
		"Cookie":        {"session=1"},
		"X-Host-Key":    {"hk"},
		"Connection":    {"X-Hop, keep-alive"},
		"X-Hop":         {"gone"},
		"Keep-Alive":    {"timeout=5"},
		"Te":            {"trailers"},
		"X-Multi":       {"a", "b"},
	}
	q := url.Values{"led": {"on"}, "tag": {"x", "y"}}
	code, body, _ := ts.do(t, "POST", relayURL(id, "/status/now", q), strings.NewReader("héllo"), hdr)
	if code != 200 || body != "ok" {
		t.Fatalf("got %d %q, want 200 ok", code, body)
	}
	f := <-frames
	if !hex32.MatchString(f.RID) {
		t.Errorf("got rid %q, want 32 hex", f.RID)
	}
	if f.Method != "POST" || f.Path != "/status/now" {
		t.Errorf("got %s %s, want POST /status/now", f.Method, f.Path)
	}
	if got, _ := json.Marshal(f.Query); string(got) != `{"led":"on","tag":["x","y"]}` {
		t.Errorf("got query %s, want led and a tag array, no key", got)
	}
	for _, name := range []string{"Cookie", "X-Key", "X-Host-Key", "Connection", "X-Hop", "Keep-Alive", "Te"} {
		if v, ok := f.Headers[name]; ok {
			t.Errorf("header %s = %q passed, want it dropped", name, v)
		}
	}
	want := map[string]string{"Authorization": "Bearer device-token", "Content-Type": "text/plain", "X-Multi": "a, b"}
	for k, v := range want {
		if f.Headers[k] != v {
			t.Errorf("header %s: got %q, want %q", k, f.Headers[k], v)
		}
	}
	if f.Body == nil || *f.Body != "héllo" || f.BodyEncoding != "" {
		t.Errorf("got body %v encoding %q, want héllo as a string", f.Body, f.BodyEncoding)
	}

	// Binary body, key in a header, bare path, no query.
	bin := []byte{0xff, 0x00, 0xfe}
	req, _ := http.NewRequest("PUT", ts.URL+"/relay/"+id, bytes.NewReader(bin))
	req.Header.Set("X-Key", testKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	f = <-frames
	if _, ok := f.Headers["X-Key"]; ok {
		t.Error("X-Key passed to the device, want it stripped")
	}
	if f.Method != "PUT" || f.Path != "/" || f.Query != nil {
		t.Errorf("got %s %s %v, want PUT / and no query", f.Method, f.Path, f.Query)
	}
	if f.BodyEncoding != "base64" || f.Body == nil || *f.Body != base64.StdEncoding.EncodeToString(bin) {
		t.Errorf("got body %v encoding %q, want base64 of the bytes", f.Body, f.BodyEncoding)
	}

	// GET without a body has no body field.
	ts.do(t, "GET", relayURL(id, "/x", nil), nil, nil)
	if f = <-frames; f.Body != nil {
		t.Errorf("GET: got body %q, want none", *f.Body)
	}
}

func TestRelayReplyMapping(t *testing.T) {
	ts := newTestServer(t, Config{RelayMaxBody: 1000})
	id := ts.register(t, "hostclient")
	// The device answers with the reply named by the request's path.
	replies := map[string]map[string]any{}
	ts.device(t, id, func(f relay.Request) string {
		r, ok := replies[f.Path]
		if !ok {
			return ""
		}
		return reply(f, r)
	})

	tests := []struct {
		name     string
		reply    map[string]any
		status   int
		ctype    string
		body     string
		wantHdr  map[string]string
		noHeader []string
	}{
		{name: "html", reply: map[string]any{"status": 201, "type": "html", "content": "<h1>on</h1>"}, status: 201, ctype: "text/html; charset=utf-8", body: "<h1>on</h1>"},
		{name: "text", reply: map[string]any{"type": "text", "content": "t"}, status: 200, ctype: "text/plain; charset=utf-8", body: "t"},
		{name: "json type", reply: map[string]any{"type": "json", "content": `{"a":1}`}, status: 200, ctype: "application/json", body: `{"a":1}`},
		{name: "xml", reply: map[string]any{"type": "xml", "content": "<a/>"}, status: 200, ctype: "application/xml", body: "<a/>"},
		{name: "css", reply: map[string]any{"type": "css", "content": "a{}"}, status: 200, ctype: "text/css; charset=utf-8", body: "a{}"},
		{name: "js", reply: map[string]any{"type": "js", "content": "x()"}, status: 200, ctype: "text/javascript; charset=utf-8", body: "x()"},
		{name: "raw", reply: map[string]any{"type": "raw", "content": "AAEC", "encoding": "base64"}, status: 200, ctype: "application/octet-stream", body: "\x00\x01\x02"},
		{name: "image sniffed", reply: map[string]any{"type": "image", "content": base64.StdEncoding.EncodeToString(pngBytes), "encoding": "base64"}, status: 200, ctype: "image/png", body: string(pngBytes)},
		{name: "media type as given", reply: map[string]any{"type": "application/vnd.x+json", "content": "{}"}, status: 200, ctype: "application/vnd.x+json", body: "{}"},
		{name: "absent type, string", reply: map[string]any{"content": "plain"}, status: 200, ctype: "text/plain; charset=utf-8", body: "plain"},
		{name: "absent type, JSON object", reply: map[string]any{"content": map[string]any{"t": 21.5}}, status: 200, ctype: "application/json", body: `{"t":21.5}`},
		{name: "JSON array", reply: map[string]any{"content": []int{1, 2}}, status: 200, ctype: "application/json", body: `[1,2]`},
		{name: "JSON number", reply: map[string]any{"content": 42}, status: 200, ctype: "application/json", body: `42`},
		{name: "legacy form", reply: map[string]any{"status": 202, "temp": 21, "led": "on", "headers": map[string]string{"X-A": "b"}}, status: 202, ctype: "application/json", body: `{"led":"on","temp":21}`, wantHdr: map[string]string{"X-A": "b"}},
		{name: "status below range", reply: map[string]any{"status": 99, "content": "x"}, status: 200, ctype: "text/plain; charset=utf-8", body: "x"},
		{name: "status above range", reply: map[string]any{"status": 600, "content": "x"}, status: 200, body: "x"},
		{name: "status not a number", reply: map[string]any{"status": "404", "content": "x"}, status: 200, body: "x"},
		{name: "status fraction", reply: map[string]any{"status": 404.5, "content": "x"}, status: 200, body: "x"},
		{name: "status 599", reply: map[string]any{"status": 599, "content": "x"}, status: 599, body: "x"},
		{name: "informational status unusable", reply: map[string]any{"status": 101, "content": "x"}, status: 502},
		{name: "bad base64", reply: map[string]any{"content": "!!!", "encoding": "base64"}, status: 502},
		{name: "body over limit", reply: map[string]any{"content": strings.Repeat("a", 1001)}, status: 502},
		{name: "decoded body over limit", reply: map[string]any{"content": base64.StdEncoding.EncodeToString(make([]byte, 1001)), "encoding": "base64"}, status: 502},
		{name: "headers not an object", reply: map[string]any{"content": "x", "headers": "X-A: b"}, status: 502},
		{name: "response headers filtered", reply: map[string]any{"content": "x", "headers": map[string]any{
			"X-Custom": "1", "X-List": []string{"a", "b"}, "Set-Cookie": "s=1", "Connection": "close", "Transfer-Encoding": "chunked", "Bad Name": "x", "X-Nl": "a\r\nInjected: 1",
		}}, status: 200, body: "x", wantHdr: map[string]string{"X-Custom": "1", "X-List": "a"}, noHeader: []string{"Set-Cookie", "Bad Name", "X-Nl", "Injected"}},
		{name: "type beats Content-Type header", reply: map[string]any{"type": "html", "content": "x", "headers": map[string]string{"Content-Type": "text/css"}}, status: 200, ctype: "text/html; charset=utf-8", body: "x"},
		{name: "Content-Type header without type", reply: map[string]any{"content": "x", "headers": map[string]string{"Content-Type": "text/csv"}}, status: 200, ctype: "text/csv", body: "x"},
		{name: "unknown short type", reply: map[string]any{"type": "weird", "content": "x"}, status: 200, ctype: "text/plain; charset=utf-8", body: "x"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := fmt.Sprintf("/case%d", i)
			replies[path] = tt.reply
			code, body, h := ts.do(t, "GET", relayURL(id, path, nil), nil, nil)
			if code != tt.status {
				t.Fatalf("got status %d (%q), want %d", code, body, tt.status)
			}
			if code == 502 {
				return
			}
			if tt.ctype != "" && h.Get("Content-Type") != tt.ctype {
				t.Errorf("got Content-Type %q, want %q", h.Get("Content-Type"), tt.ctype)
			}
			if body != tt.body {
				t.Errorf("got body %q, want %q", body, tt.body)
			}
			for k, v := range tt.wantHdr {
				if h.Get(k) != v {
					t.Errorf("header %s: got %q, want %q", k, h.Get(k), v)
				}
			}
			for _, k := range tt.noHeader {
				if _, ok := h[http.CanonicalHeaderKey(k)]; ok {
					t.Errorf("header %s passed, want it dropped", k)
				}
			}
		})
	}
}

func TestRelayStatuses(t *testing.T) {
	// Answers that come must never lose a race against the timeout on a
	// loaded machine; /silent waits it out.
	ts := newTestServer(t, Config{RelayTimeout: time.Second, RelayMaxBody: 100})
	hc := ts.register(t, "hostclient")
	lobby := ts.register(t, "lobby")
	empty := ts.register(t, "hostclient")
	ts.dial(t, empty, "client") // a client is no host
	ts.device(t, hc, func(f relay.Request) string {
		if f.Path == "/silent" {
			return ""
		}
		if f.Path == "/garbage" {
			return reply(f, map[string]any{"content": "%%", "encoding": "base64"})
		}
		return reply(f, map[string]any{"content": "ok"})
	})

	tests := []struct {
		name   string
		method string
		path   string
		body   string
		want   int
	}{
		{"answer", "GET", relayURL(hc, "/", nil), "", 200},
		{"unknown id", "GET", relayURL("nope", "/", nil), "", 404},
		{"malformed id", "GET", "/relay/a%20b/?key=" + testKey, "", 400},
		{"wrong key", "GET", relayURL(hc, "/", url.Values{"key": {"wrong"}}), "", 403},
		{"missing key", "GET", "/relay/" + hc + "/", "", 400},
		{"lobby", "GET", relayURL(lobby, "/", nil), "", 400},
		{"no host", "GET", relayURL(empty, "/", nil), "", 503},
		{"timeout", "GET", relayURL(hc, "/silent", nil), "", 504},
		{"unusable answer", "GET", relayURL(hc, "/garbage", nil), "", 502},
		{"body too large", "POST", relayURL(hc, "/", nil), strings.Repeat("b", 101), 413},
		{"body at the limit", "POST", relayURL(hc, "/", nil), strings.Repeat("b", 100), 200},
		{"any method", "PROPFIND", relayURL(hc, "/", nil), "", 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, body, h := ts.do(t, tt.method, tt.path, strings.NewReader(tt.body), nil)
			if code != tt.want {
				t.Fatalf("got %d %q, want %d", code, body, tt.want)
			}
			if code >= 400 && h.Get("Content-Type") != "text/plain; charset=utf-8" {
				t.Errorf("got Content-Type %q for an error", h.Get("Content-Type"))
			}
		})
	}
}

func TestRelayTooManyPending(t *testing.T) {
	ts := newTestServer(t, Config{RelayMaxPending: 2})
	id := ts.register(t, "hostclient")
	dev, frames := ts.device(t, id, func(relay.Request) string { return "" })
	results := make(chan int, 2)
	for range 2 {
		go func() {
			code, _, _ := ts.do(t, "GET", relayURL(id, "/hold", nil), nil, nil)
			results <- code
		}()
	}
	held := []relay.Request{<-frames, <-frames} // both are pending now
	code, _, h := ts.do(t, "GET", relayURL(id, "/third", nil), nil, nil)
	if code != 429 || h.Get("Retry-After") == "" {
		t.Fatalf("got %d Retry-After %q, want 429 with Retry-After", code, h.Get("Retry-After"))
	}
	for _, f := range held {
		dev.Write(context.Background(), websocket.MessageText, []byte(reply(f, map[string]any{"content": "done"})))
	}
	for range 2 {
		if code := <-results; code != 200 {
			t.Fatalf("held request: got %d, want 200", code)
		}
	}
}

func TestRelayConcurrentOutOfOrder(t *testing.T) {
	ts := newTestServer(t, Config{})
	id := ts.register(t, "hostclient")
	const n = 50
	dev, frames := ts.device(t, id, func(relay.Request) string { return "" })

	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			path := fmt.Sprintf("/item/%d", i)
			code, body, _ := ts.do(t, "GET", relayURL(id, path, nil), nil, nil)
			if code != 200 || body != "answer for "+path {
				t.Errorf("%s: got %d %q", path, code, body)
			}
		})
	}
	got := make([]relay.Request, 0, n)
	for range n {
		got = append(got, <-frames)
	}
	// Answer in a shuffled order.
	rand.Shuffle(len(got), func(i, j int) { got[i], got[j] = got[j], got[i] })
	for _, f := range got {
		r := reply(f, map[string]any{"content": "answer for " + f.Path})
		if err := dev.Write(context.Background(), websocket.MessageText, []byte(r)); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	if p := ts.rt.relay.Pending(); p != 0 {
		t.Fatalf("got %d pending, want 0", p)
	}
}

func TestRelayRoundRobin(t *testing.T) {
	ts := newTestServer(t, Config{})
	id := ts.register(t, "hostclient")
	var counts [2]int
	var mu sync.Mutex
	for i := range 2 {
		ts.device(t, id, func(f relay.Request) string {
			mu.Lock()
			counts[i]++
			mu.Unlock()
			return reply(f, map[string]any{"content": "x"})
		})
	}
	for range 10 {
		if code, _, _ := ts.do(t, "GET", relayURL(id, "/", nil), nil, nil); code != 200 {
			t.Fatalf("got %d, want 200", code)
		}
	}
	if counts != [2]int{5, 5} {
		t.Fatalf("got %v requests per host, want 5 and 5", counts)
	}
}

func TestRelayRepliesNeverReachClients(t *testing.T) {
	ts := newTestServer(t, Config{RelayTimeout: time.Second})
	id := ts.register(t, "hostclient")
	client := ts.dial(t, id, "client")
	dev, frames := ts.device(t, id, func(f relay.Request) string {
		if f.Path == "/late" {
			return ""
		}
		return reply(f, map[string]any{"content": "x"})
	})
	if code, _, _ := ts.do(t, "GET", relayURL(id, "/now", nil), nil, nil); code != 200 {
		t.Fatalf("got %d, want 200", code)
	}
	<-frames
	if code, _, _ := ts.do(t, "GET", relayURL(id, "/late", nil), nil, nil); code != 504 {
		t.Fatalf("got %d, want 504", code)
	}
	late := <-frames
	ctx := context.Background()
	// The late answer, after its timeout, is swallowed too.
	dev.Write(ctx, websocket.MessageText, []byte(reply(late, map[string]any{"content": "too late"})))
	// A frame with an unknown rid, a JSON frame without one, and binary
	// frames are ordinary host messages.
	for _, m := range []string{`{"rid":"not-a-request","x":1}`, `{"event":"tick"}`, `marker`} {
		dev.Write(ctx, websocket.MessageText, []byte(m))
	}
	for _, want := range []string{`{"rid":"not-a-request","x":1}`, `{"event":"tick"}`, `marker`} {
		expectNext(t, client, want)
	}
}

// holdRelay starts a relay request to a silent device and returns once
// the device holds it: the device's socket and the request's status to come.
func holdRelay(t *testing.T, ts *testServer, id string) (*websocket.Conn, <-chan int) {
	t.Helper()
	dev, frames := ts.device(t, id, func(relay.Request) string { return "" })
	res := make(chan int, 1)
	go func() {
		code, _, _ := ts.do(t, "GET", relayURL(id, "/", nil), nil, nil)
		res <- code
	}()
	<-frames
	return dev, res
}

// TestRelayPendingEnds covers the ends of a request its device holds.
func TestRelayPendingEnds(t *testing.T) {
	tests := []struct {
		name string
		end  func(t *testing.T, ts *testServer, id string, dev *websocket.Conn)
		want int
	}{
		{"host leaves", func(t *testing.T, ts *testServer, id string, dev *websocket.Conn) {
			dev.Close(websocket.StatusNormalClosure, "bye")
		}, 502},
		{"registration removed", func(t *testing.T, ts *testServer, id string, dev *websocket.Conn) {
			q := url.Values{"id": {id}, "key": {testKey}, "host_key": {testHostKey}}
			if code, _, _ := ts.do(t, "GET", "/remove?"+q.Encode(), nil, nil); code != 200 {
				t.Fatal("remove failed")
			}
		}, 502},
		{"shutdown", func(t *testing.T, ts *testServer, id string, dev *websocket.Conn) {
			ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
			t.Cleanup(cancel)
			go ts.rt.Shutdown(ctx)
		}, 503},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ts := newTestServer(t, Config{})
			id := ts.register(t, "hostclient")
			ts.dial(t, id, "client") // keeps the registration when the host goes
			dev, res := holdRelay(t, ts, id)
			tt.end(t, ts, id, dev)
			if code := <-res; code != tt.want {
				t.Fatalf("got %d, want %d", code, tt.want)
			}
			if p := ts.rt.relay.Pending(); p != 0 {
				t.Fatalf("got %d pending, want 0", p)
			}
		})
	}
}

// TestRelayNoLeaks drives requests through every exit path — answer,
// timeout, host gone, caller gone, registration removed — and checks that
// no pending entry survives any of them.
func TestRelayNoLeaks(t *testing.T) {
	// Answers get the whole test timeout, so none can time out on a loaded
	// machine; timeouts are made on a server of their own whose device
	// never answers.
	ts := newTestServer(t, Config{RelayTimeout: testTimeout, RelayMaxPending: 10000})
	tsT := newTestServer(t, Config{RelayTimeout: 200 * time.Millisecond, RelayMaxPending: 10000})
	const perPath = 400
	ctx, cancel := context.WithTimeout(context.Background(), 4*testTimeout)
	defer cancel()
	get := func(ts *testServer, id, path string, ctx context.Context) int {
		req, _ := http.NewRequestWithContext(ctx, "GET", ts.URL+relayURL(id, path, nil), nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return -1
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	parallel := func(n int, f func(i int)) {
		var wg sync.WaitGroup
		sem := make(chan struct{}, 32)
		for i := range n {
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				f(i)
			})
		}
		wg.Wait()
	}
	counts := map[string]map[int]int{}
	var mu sync.Mutex
	tally := func(path string, code int) {
		mu.Lock()
		defer mu.Unlock()
		if counts[path] == nil {
			counts[path] = map[int]int{}
		}
		counts[path][code]++
	}

	id := ts.register(t, "hostclient")
	ts.dial(t, id, "client")
	ts.device(t, id, func(f relay.Request) string {
		if f.Path == "/answer" {
			return reply(f, map[string]any{"content": "x"})
		}
		return ""
	})
	idT := tsT.register(t, "hostclient")
	tsT.device(t, idT, func(relay.Request) string { return "" })
	parallel(perPath, func(int) { tally("/answer", get(ts, id, "/answer", ctx)) })
	parallel(perPath, func(int) { tally("/timeout", get(tsT, idT, "/timeout", ctx)) })
	parallel(perPath, func(int) {
		cctx, ccancel := context.WithTimeout(ctx, 5*time.Millisecond)
		defer ccancel()
		tally("/gone-caller", get(ts, id, "/gone-caller", cctx))
	})

	// Host gone and registration removed: a batch of requests is pending
	// when the host (then the registration) goes. A long relay timeout here,
	// so that none of them can end by timing out first.
	ts2 := newTestServer(t, Config{RelayMaxPending: 10000})
	for _, how := range []string{"host", "remove"} {
		ts := ts2
		id := ts.register(t, "hostclient")
		ts.dial(t, id, "client")
		dev, frames := ts.device(t, id, func(relay.Request) string { return "" })
		done := make(chan struct{})
		go func() {
			parallel(perPath, func(int) { tally("/"+how, get(ts, id, "/"+how, ctx)) })
			close(done)
		}()
		for range 20 {
			<-frames
		}
		if how == "host" {
			dev.CloseNow()
		} else {
			q := url.Values{"id": {id}, "key": {testKey}, "host_key": {testHostKey}}
			ts.do(t, "GET", "/remove?"+q.Encode(), nil, nil)
		}
		<-done
	}

	// A caller that went away is noticed by the server when its connection
	// closes, a moment after the client gave up.
	eventually(t, "no pending relay requests", func() bool {
		return ts.rt.relay.Pending()+tsT.rt.relay.Pending()+ts2.rt.relay.Pending() == 0
	})
	if counts["/answer"][200] != perPath {
		t.Errorf("answers: got %v, want %d×200", counts["/answer"], perPath)
	}
	if counts["/timeout"][504] != perPath {
		t.Errorf("timeouts: got %v, want %d×504", counts["/timeout"], perPath)
	}
	if counts["/gone-caller"][-1] != perPath {
		t.Errorf("gone callers: got %v, want %d cancelled", counts["/gone-caller"], perPath)
	}
	for _, how := range []string{"/host", "/remove"} {
		if counts[how][502] < 20 {
			t.Errorf("%s: got %v, want at least the 20 pending ones 502", how, counts[how])
		}
	}
	t.Logf("outcomes: %v", counts)
}

func TestRelayKeyInBodyIsForwarded(t *testing.T) {
	// Only the query's key is the router's; a form field named key in the
	// body is the device's business and passes untouched.
	ts := newTestServer(t, Config{})
	id := ts.register(t, "hostclient")
	_, frames := ts.device(t, id, func(f relay.Request) string { return reply(f, map[string]any{"content": "x"}) })
	hdr := http.Header{"Content-Type": {"application/x-www-form-urlencoded"}}
	ts.do(t, "POST", relayURL(id, "/form", nil), strings.NewReader("key=device-field"), hdr)
	if f := <-frames; f.Body == nil || *f.Body != "key=device-field" {
		t.Fatalf("got body %v, want the form untouched", f.Body)
	}
}

// TestRelayLateReplyWindow checks the 60 s during which a finished request's
// rid still claims its reply, counted from the request's end, on a fake
// clock: the request waits 100 s (by that clock) before timing out, a reply
// 59 s after the timeout is swallowed, one 61 s after is an ordinary host
// message.
func TestRelayLateReplyWindow(t *testing.T) {
	ts := newTestServer(t, Config{RelayTimeout: 50 * time.Millisecond})
	clock := &fakeClock{now: time.Unix(1_000_000, 0)}
	ts.rt.relay.Now = clock.Now
	id := ts.register(t, "hostclient")
	client := ts.dial(t, id, "client")
	dev, frames := ts.device(t, id, func(relay.Request) string { return "" })

	late := func() relay.Request {
		res := make(chan int, 1)
		go func() {
			code, _, _ := ts.do(t, "GET", relayURL(id, "/late", nil), nil, nil)
			res <- code
		}()
		f := <-frames
		clock.Advance(100 * time.Second) // the request is old when it ends
		if code := <-res; code != 504 {
			t.Fatalf("got %d, want 504", code)
		}
		return f
	}
	ctx := context.Background()

	f := late()
	clock.Advance(59 * time.Second)
	dev.Write(ctx, websocket.MessageText, []byte(reply(f, map[string]any{"content": "59 s late"})))
	dev.Write(ctx, websocket.MessageText, []byte("marker 1"))
	expectNext(t, client, "marker 1")

	f = late()
	clock.Advance(61 * time.Second)
	r := reply(f, map[string]any{"content": "61 s late"})
	dev.Write(ctx, websocket.MessageText, []byte(r))
	expectNext(t, client, r)
}

// TestRelayReplyHeaders: a device's reply sets only representation headers
// (docs/protocol.md §7); everything that would change how browsers or caches treat the
// router's origin is dropped, and every answer is sandboxed and private.
func TestRelayReplyHeaders(t *testing.T) {
	ts := newTestServer(t, Config{})
	id := ts.register(t, "hostclient")
	replies := map[string]map[string]any{}
	ts.device(t, id, func(f relay.Request) string { return reply(f, replies[f.Path]) })
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

	tests := []struct {
		name    string
		status  int
		headers map[string]any
		want    map[string]string // "" means absent
	}{
		{"attacker's headers", 200, map[string]any{
			"Access-Control-Allow-Origin":      "https://evil.example",
			"Access-Control-Allow-Credentials": "true",
			"Service-Worker-Allowed":           "/",
			"Clear-Site-Data":                  `"*"`,
			"Strict-Transport-Security":        "max-age=63072000; includeSubDomains",
			"Content-Security-Policy":          "script-src *",
			"Cache-Control":                    "public, max-age=31536000",
			"WWW-Authenticate":                 "Basic",
			"X-Connection-Id":                  "spoofed",
			"Set-Cookie":                       "s=1",
			"Location":                         "https://evil.example/",
			"Refresh":                          "0; url=https://evil.example/",
			"X-Accel-Redirect":                 "/internal/secret",
			"X-Accel-Expires":                  "3600",
			"X-Sendfile":                       "/etc/passwd",
			"X-LiteSpeed-Cache-Control":        "public",
		}, map[string]string{
			"Access-Control-Allow-Origin":      "*",
			"Access-Control-Allow-Credentials": "",
			"Service-Worker-Allowed":           "",
			"Clear-Site-Data":                  "",
			"Strict-Transport-Security":        "",
			"Content-Security-Policy":          relay.Sandbox,
			"Cache-Control":                    "private, max-age=31536000",
			"Www-Authenticate":                 "",
			"X-Connection-Id":                  "",
			"Set-Cookie":                       "",
			"Location":                         "",
			"Refresh":                          "",
			"X-Accel-Redirect":                 "",
			"X-Accel-Expires":                  "",
			"X-Sendfile":                       "",
			"X-Litespeed-Cache-Control":        "",
		}},
		{"representation headers", 200, map[string]any{
			"Content-Language":    "de",
			"Content-Disposition": `attachment; filename="log.txt"`,
			"ETag":                `"v1"`,
			"Last-Modified":       "Sun, 29 Nov 2026 10:00:00 GMT",
			"Vary":                "Accept",
			"X-Device":            "esp",
			"Cache-Control":       "no-store",
		}, map[string]string{
			"Content-Language":        "de",
			"Content-Disposition":     `attachment; filename="log.txt"`,
			"Etag":                    `"v1"`,
			"Last-Modified":           "Sun, 29 Nov 2026 10:00:00 GMT",
			"Vary":                    "Accept",
			"X-Device":                "esp",
			"Cache-Control":           "no-store",
			"Content-Security-Policy": relay.Sandbox,
		}},
		{"no-cache made private", 200, map[string]any{"Cache-Control": "no-cache, s-maxage=99, immutable"},
			map[string]string{"Cache-Control": "private, no-cache"}},
		{"no headers", 200, nil, map[string]string{"Cache-Control": "private", "Content-Security-Policy": relay.Sandbox}},
		{"Location on a redirect", 302, map[string]any{"Location": "/other"}, map[string]string{"Location": "/other"}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := fmt.Sprintf("/h%d", i)
			replies[path] = map[string]any{"status": tt.status, "content": "x", "headers": tt.headers}
			resp, err := noRedirect.Get(ts.URL + relayURL(id, path, nil))
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.status {
				t.Fatalf("got status %d, want %d", resp.StatusCode, tt.status)
			}
			for k, want := range tt.want {
				if got := strings.Join(resp.Header.Values(k), "|"); got != want {
					t.Errorf("%s: got %q, want %q", k, got, want)
				}
			}
		})
	}
}
