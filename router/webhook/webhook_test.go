package webhook

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

var secret = []byte("0123456789abcdef-secret")

func loopback(t *testing.T) *Allow {
	t.Helper()
	a, err := ParseAllow("127.0.0.1, ::1, localhost")
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// verify checks a request's signature the way a backend would, written
// apart from Sign.
func verify(r *http.Request, body []byte) bool {
	id, ts, sig := r.Header.Get("webhook-id"), r.Header.Get("webhook-timestamp"), r.Header.Get("webhook-signature")
	m := hmac.New(sha256.New, secret)
	fmt.Fprintf(m, "%s.%s.%s", id, ts, body)
	want := "v1," + base64.StdEncoding.EncodeToString(m.Sum(nil))
	return id != "" && ts != "" && hmac.Equal([]byte(sig), []byte(want))
}

func TestSignature(t *testing.T) {
	got := make(chan bool, 2)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		got <- verify(r, body)
		// The same headers over an altered body must not verify.
		got <- verify(r, append(body, ' '))
		w.WriteHeader(204)
	}))
	defer srv.Close()
	c := New(Config{Allow: loopback(t)})
	v := c.Connect(context.Background(), Settings{URL: srv.URL, Secret: secret, Events: Connect}, Event{Registration: "r", Conn: "c"})
	if !v.Admit {
		t.Fatalf("connect: got %+v, want admitted", v)
	}
	if !<-got || <-got {
		t.Fatal("signature: want it to verify, and not over an altered body")
	}
}

func TestConnectVerdicts(t *testing.T) {
	block := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/ok":
			w.WriteHeader(204)
		case "/named":
			w.Write([]byte(`{"name":"dev-7"}`))
		case "/401":
			w.WriteHeader(401)
		case "/403":
			w.WriteHeader(403)
		case "/500":
			w.WriteHeader(500)
		case "/redirect":
			http.Redirect(w, r, "/ok", http.StatusFound)
		case "/slow":
			<-block
		}
	}))
	defer srv.Close()
	defer close(block) // before Close, which waits for the handler
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := "http://" + ln.Addr().String()
	ln.Close()
	c := New(Config{Allow: loopback(t), Timeout: 300 * time.Millisecond})
	for _, tt := range []struct {
		url            string
		admit, refused bool
		name           string
	}{
		{srv.URL + "/ok", true, false, ""},
		{srv.URL + "/named", true, false, "dev-7"},
		{srv.URL + "/401", false, true, ""},
		{srv.URL + "/403", false, true, ""},
		{srv.URL + "/500", false, false, ""},
		{srv.URL + "/redirect", false, false, ""},
		{srv.URL + "/slow", false, false, ""},
		{closed, false, false, ""},
	} {
		v := c.Connect(context.Background(), Settings{URL: tt.url, Secret: secret, Events: Connect}, Event{})
		if v.Admit != tt.admit || v.Refused != tt.refused || v.Name != tt.name {
			t.Errorf("%s: got %+v, want admit %v refused %v name %q", tt.url, v, tt.admit, tt.refused, tt.name)
		}
	}
}

func TestAllow(t *testing.T) {
	if err := (*Allow)(nil).CheckURL("http://127.0.0.1/"); err == nil || !strings.Contains(err.Error(), "-webhook-allow") {
		t.Fatalf("no -webhook-allow: got %v", err)
	}
	a, err := ParseAllow("hooks.example.com, *.corp.example, 10.0.0.0/8, 192.0.2.7")
	if err != nil {
		t.Fatal(err)
	}
	for url, ok := range map[string]bool{
		"https://hooks.example.com/x":   true,
		"https://HOOKS.example.com/x":   true,
		"http://a.corp.example:8080/":   true,
		"http://10.1.2.3/":              true,
		"http://192.0.2.7/":             true,
		"http://192.0.2.8/":             false,
		"https://evil.example/":         false,
		"ftp://hooks.example.com/":      false,
		"https://u:p@hooks.example.com": false,
		"not a url":                     false,
	} {
		if err := a.CheckURL(url); (err == nil) != ok {
			t.Errorf("%s: got %v, want allowed %v", url, err, ok)
		}
	}
	// At call time every resolved address must be public or listed:
	// "localhost" matches the host pattern, but it resolves to loopback,
	// which is not listed.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(204) }))
	defer srv.Close()
	hostOnly, _ := ParseAllow("localhost")
	var results []string
	var mu sync.Mutex
	c := New(Config{Allow: hostOnly, Observe: func(_, result string, _ time.Duration) { mu.Lock(); results = append(results, result); mu.Unlock() }})
	u := strings.Replace(srv.URL, "127.0.0.1", "localhost", 1)
	if err := hostOnly.CheckURL(u); err != nil {
		t.Fatalf("CheckURL(%s): %v", u, err)
	}
	if v := c.Connect(context.Background(), Settings{URL: u, Secret: secret, Events: Connect}, Event{}); v.Admit || v.Refused {
		t.Fatalf("a host resolving to a forbidden address: got %+v, want the call failed", v)
	}
	if len(results) != 1 || results[0] != "failed" {
		t.Fatalf("observed %v, want one failed call", results)
	}
}

// TestQueueOrderAndRetries: 2,000 events of one connection arrive in order
// while the receiver fails every tenth call once; the retry carries the same
// webhook-id.
func TestQueueOrderAndRetries(t *testing.T) {
	const n = 2000
	var mu sync.Mutex
	var seen []string
	calls := 0
	failedIDs := map[string]bool{}
	retriedSame := 0
	done := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var ev Event
		json.Unmarshal(body, &ev)
		id := r.Header.Get("webhook-id")
		mu.Lock()
		defer mu.Unlock()
		calls++
		if calls%10 == 0 && !failedIDs[id] {
			failedIDs[id] = true
			w.WriteHeader(503)
			return
		}
		if failedIDs[id] {
			retriedSame++
		}
		seen = append(seen, *ev.Data)
		if len(seen) == n {
			close(done)
		}
		w.WriteHeader(204)
	}))
	defer srv.Close()
	c := New(Config{Allow: loopback(t), Backoff: time.Millisecond})
	q := c.NewQueue(context.Background(), Settings{URL: srv.URL, Secret: secret, Events: Message}, 64)
	for i := range n {
		q.Push(context.Background(), MessageEvent(Event{}, false, []byte(fmt.Sprint(i))))
	}
	q.Close(context.Background(), nil)
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatal("events did not all arrive")
	}
	<-q.Done()
	mu.Lock()
	defer mu.Unlock()
	for i, s := range seen {
		if s != fmt.Sprint(i) {
			t.Fatalf("event %d arrived as %s: out of order", i, s)
		}
	}
	if retriedSame != len(failedIDs) || retriedSame == 0 {
		t.Fatalf("%d failed calls, %d retried with the same webhook-id", len(failedIDs), retriedSame)
	}
}

// TestQueueBackpressure: with a receiver that stalls, Push blocks once the
// queue is full (the sender is slowed); when it resumes every event arrives.
func TestQueueBackpressure(t *testing.T) {
	release := make(chan struct{})
	var mu sync.Mutex
	got := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release
		mu.Lock()
		got++
		mu.Unlock()
		w.WriteHeader(204)
	}))
	defer srv.Close()
	c := New(Config{Allow: loopback(t), Timeout: time.Minute})
	q := c.NewQueue(context.Background(), Settings{URL: srv.URL, Secret: secret, Events: Message}, 4)
	pushed := 0
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		ok := q.Push(ctx, MessageEvent(Event{}, true, []byte{1}))
		cancel()
		if !ok {
			break
		}
		pushed++
		if pushed > 100 {
			t.Fatal("Push never blocked on a stalled receiver")
		}
	}
	// 4 queued and 1 in flight.
	if pushed != 5 {
		t.Fatalf("pushed %d before blocking, want 5 (a queue of 4 and one in flight)", pushed)
	}
	close(release)
	q.Close(context.Background(), nil)
	<-q.Done()
	mu.Lock()
	defer mu.Unlock()
	if got != pushed {
		t.Fatalf("receiver got %d, want all %d", got, pushed)
	}
}
