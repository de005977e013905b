package router

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"wsrouter/registry"
	"wsrouter/router/relay"
)

// defaultLimits are the rate limits of the flags' defaults (docs/protocol.md §8).
func defaultLimits(cfg Config) Config {
	cfg.RateRegister = Limit{2, 20}
	cfg.RateConnect = Limit{10, 50}
	cfg.RateRelay = Limit{20, 100}
	cfg.RateBadKey = Limit{0.2, 10}
	return cfg
}

// TestRightKeysNeverLockOut runs on the real clock, where the first
// release's lockout failed: it reserved a failed-key token before each check
// and "refunded" it after bcrypt, which x/time/rate ignores once the
// reservation's time has passed, so every right key spent a token and the
// 11th connect from one address got 429. 50 right-key connects from one
// address at once, then more one after another, are all admitted with the
// default limits; the connects use up the connect burst, not the failed-key
// one.
func TestRightKeysNeverLockOut(t *testing.T) {
	ts := newTestServer(t, defaultLimits(Config{Registry: regCfgKeep()}))
	id := ts.register(t, "lobby")

	const n = 50
	codes := make(chan int, n)
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			_, resp, err := ts.tryDial(t, id, testKey, "", nil)
			switch {
			case err == nil:
				codes <- 101
			case resp != nil:
				codes <- resp.StatusCode
			default:
				t.Errorf("dial: %v", err)
			}
		})
	}
	wg.Wait()
	close(codes)
	got := map[int]int{}
	for c := range codes {
		got[c]++
	}
	if got[101] != n {
		t.Fatalf("%d concurrent right-key connects from one address: got %v, want all 101", n, got)
	}

	// The failed-key bucket is untouched: still full.
	if tokens := ts.rt.limits.badKey.tokens("127.0.0.1"); tokens < 10 {
		t.Fatalf("failed-key tokens after %d right keys: got %.2f, want the full burst of 10", n, tokens)
	}
	// And a wrong key still costs one (on /relay, as the connect burst is
	// spent).
	code, _, _ := ts.do(t, "GET", relayURL(id, "/", url.Values{"key": {"wrong"}}), nil, nil)
	if code != http.StatusForbidden {
		t.Fatalf("wrong key: got %d, want 403", code)
	}
	if tokens := ts.rt.limits.badKey.tokens("127.0.0.1"); tokens >= 10 {
		t.Fatalf("failed-key tokens after a wrong key: got %.2f, want one fewer than 10", tokens)
	}
}

// TestRightRelayKeysNeverLockOut: a caller polling a device with the right
// key (each request a key check) is never locked out, on the real clock.
func TestRightRelayKeysNeverLockOut(t *testing.T) {
	ts := newTestServer(t, defaultLimits(Config{Registry: regCfgKeep()}))
	id := ts.register(t, "hostclient")
	ts.device(t, id, func(f relay.Request) string { return reply(f, map[string]any{"content": "x"}) })
	for i := range 40 {
		if code, body, _ := ts.do(t, "GET", relayURL(id, "/", nil), nil, nil); code != 200 {
			t.Fatalf("relay %d with the right key: got %d %q, want 200", i+1, code, body)
		}
	}
}

// TestAdminTokenGuessesLimited: wrong admin tokens on /stats take
// failed-key tokens and then lock the address out, even with the right
// token; a missing token takes none; the scheme is case-insensitive.
func TestAdminTokenGuessesLimited(t *testing.T) {
	ts := newTestServer(t, Config{AdminToken: "admin-secret", RateBadKey: Limit{Rate: 0.2, Burst: 3}})
	clock := withClock(ts)
	stats := func(auth string) int {
		h := http.Header{}
		if auth != "" {
			h.Set("Authorization", auth)
		}
		code, _, _ := ts.do(t, "GET", "/stats", nil, h)
		return code
	}
	for _, auth := range []string{"bearer admin-secret", "BEARER admin-secret", "Bearer admin-secret"} {
		if code := stats(auth); code != 200 {
			t.Fatalf("%q: got %d, want 200", auth, code)
		}
	}
	for range 5 {
		if code := stats(""); code != 401 {
			t.Fatalf("no token: got %d, want 401", code)
		}
	}
	for i := range 3 {
		if code := stats(fmt.Sprintf("Bearer guess-%d", i)); code != 401 {
			t.Fatalf("wrong token %d: got %d, want 401", i+1, code)
		}
	}
	if code := stats("Bearer admin-secret"); code != 429 {
		t.Fatalf("right token after 3 wrong ones: got %d, want 429", code)
	}
	clock.Advance(5e9)
	if code := stats("Bearer admin-secret"); code != 200 {
		t.Fatalf("right token after the bucket refilled: got %d, want 200", code)
	}
}

// TestRemoveTimingTellsNothing: /remove takes the same time whichever key is
// wrong (the first release took half as long with the key right and the host
// key wrong, and became fast for a wrong key with the right host key once
// that host key had been remembered). Medians of interleaved rounds, real
// bcrypt cost, within 20 %.
func TestRemoveTimingTellsNothing(t *testing.T) {
	// Cost 7 (about 10 ms a hash here, more under -race): long enough that a loaded
	// machine's scheduling noise is small beside it (at cost 6 it failed
	// once, at 0.80×, with five -race test binaries beside it).
	ts := newTestServer(t, Config{Registry: registry.Config{BcryptCost: 7, GCGrace: time.Hour}})
	id := ts.register(t, "hostclient")
	ts.dial(t, id, "client") // the member key is now remembered

	remove := func(key, hostKey string) time.Duration {
		q := url.Values{"id": {id}, "key": {key}, "host_key": {hostKey}}
		start := time.Now()
		if code, _, _ := ts.do(t, "GET", "/remove?"+q.Encode(), nil, nil); code != http.StatusForbidden {
			t.Fatalf("remove with a wrong key: got %d, want 403", code)
		}
		return time.Since(start)
	}
	cases := []struct{ name, key, hostKey string }{
		{"both wrong", "wrong", "wrong"},
		{"host key wrong", testKey, "wrong"},
		{"key wrong", "wrong", testHostKey},
	}
	// Each round times the three cases back to back, and compares each
	// with the round's first: load on a shared machine drifts between
	// rounds far more than within one, so the ratios are what is stable.
	const rounds = 13
	ratios := make([][]float64, len(cases))
	for range rounds {
		var took [3]time.Duration
		for i, c := range cases {
			took[i] = remove(c.key, c.hostKey)
		}
		for i := range cases {
			ratios[i] = append(ratios[i], float64(took[i])/float64(took[0]))
		}
	}
	for i, c := range cases[1:] {
		r := ratios[i+1]
		slices.Sort(r)
		med := r[rounds/2]
		t.Logf("/remove with %s takes %.2f× the time of %s (median of %d rounds)", c.name, med, cases[0].name, rounds)
		if med < 1/1.2 || med > 1.2 {
			t.Errorf("/remove with %s: %.2f× the time of %s, want within 20 %%", c.name, med, cases[0].name)
		}
	}
}

// syncBuffer is a bytes.Buffer safe for the logger's concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestFailedKeysLogged: wrong keys and lockouts are logged at warn with the
// client's address and never the key, and a flood of them writes a bounded
// number of lines.
func TestFailedKeysLogged(t *testing.T) {
	var logs syncBuffer
	rt := New(Config{RateBadKey: Limit{Rate: 0.2, Burst: 3}, Registry: registry.Config{BcryptCost: 4, GCGrace: time.Hour}},
		slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn})))
	srv := httptest.NewServer(rt)
	t.Cleanup(func() { rt.Shutdown(context.Background()); srv.Close() })
	ts := &testServer{Server: srv, rt: rt}
	id := ts.register(t, "hostclient")
	const guesses = 500
	for i := range guesses {
		ts.do(t, "GET", relayURL(id, "/", url.Values{"key": {fmt.Sprintf("guess-%04d", i)}}), nil, nil)
	}
	out := logs.String()
	lines := strings.Count(out, "\n")
	if !strings.Contains(out, `msg="key check failed" endpoint=relay client=127.0.0.1 reg=`+id) {
		t.Errorf("no key check failed line for the first wrong key in:\n%s", out)
	}
	if !strings.Contains(out, `msg="client locked out after failed key checks" endpoint=relay client=127.0.0.1`) {
		t.Errorf("no lockout line in:\n%s", out)
	}
	if strings.Contains(out, "guess-") {
		t.Errorf("a key reached the log:\n%s", out)
	}
	if lines > 25 {
		t.Errorf("%d wrong keys wrote %d log lines, want a bounded few (rate-limited)", guesses, lines)
	}
}
