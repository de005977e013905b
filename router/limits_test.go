package router

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
	"wsrouter/router/relay"

	"github.com/coder/websocket"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// fakeClock is a settable clock for the rate limiters.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// withClock rebuilds the router's limiters on a fake clock.
func withClock(ts *testServer) *fakeClock {
	clock := &fakeClock{now: time.Unix(1_000_000, 0)}
	ts.rt.limits = newLimits(&ts.rt.cfg, clock.Now)
	return clock
}

func TestRateLimitBurstThenRecovery(t *testing.T) {
	ts := newTestServer(t, Config{RateRegister: Limit{Rate: 1, Burst: 3}})
	clock := withClock(ts)
	reg := func() (int, http.Header) {
		code, _, h := ts.do(t, "GET", "/register?key=a&host_key=b&reg_type=lobby", nil, nil)
		return code, h
	}
	for i := range 3 {
		if code, _ := reg(); code != 200 {
			t.Fatalf("request %d in the burst: got %d, want 200", i, code)
		}
	}
	code, h := reg()
	if code != 429 || h.Get("Retry-After") != "1" {
		t.Fatalf("past the burst: got %d Retry-After %q, want 429 with Retry-After 1", code, h.Get("Retry-After"))
	}
	clock.Advance(time.Second)
	if code, _ := reg(); code != 200 {
		t.Fatalf("after a second: got %d, want 200", code)
	}
	if code, _ := reg(); code != 429 {
		t.Fatalf("again: got %d, want 429", code)
	}
	if got := metricValue(t, ts, "wsrouter_rate_limited_total", "endpoint", "register"); got != 2 {
		t.Fatalf("rate limited metric: got %v, want 2", got)
	}
}

func TestRateLimitPerEndpoint(t *testing.T) {
	ts := newTestServer(t, Config{
		RateConnect: Limit{Rate: 1, Burst: 1},
		RateRelay:   Limit{Rate: 1, Burst: 1},
		Registry:    regCfgKeep(),
	})
	withClock(ts)
	id := ts.register(t, "hostclient")
	ts.device(t, id, func(f relay.Request) string { return reply(f, map[string]any{"content": "x"}) })
	if _, resp, _ := ts.tryDial(t, id, testKey, "client", nil); resp == nil || resp.StatusCode != 429 {
		t.Fatalf("second connect: got %v, want 429 (the device's connect took the token)", resp)
	}
	if code, _, _ := ts.do(t, "GET", relayURL(id, "/", nil), nil, nil); code != 200 {
		t.Fatalf("first relay: got %d, want 200", code)
	}
	code, _, h := ts.do(t, "GET", relayURL(id, "/", nil), nil, nil)
	if code != 429 || h.Get("Retry-After") == "" {
		t.Fatalf("second relay: got %d, want 429 with Retry-After", code)
	}
}

func TestFailedKeyLockout(t *testing.T) {
	ts := newTestServer(t, Config{RateBadKey: Limit{Rate: 0.2, Burst: 2}, Registry: regCfgKeep()})
	clock := withClock(ts)
	id := ts.register(t, "hostclient")
	ts.device(t, id, func(f relay.Request) string { return reply(f, map[string]any{"content": "x"}) })

	connect := func(key string) int {
		_, resp, _ := ts.tryDial(t, id, key, "client", nil)
		if resp == nil {
			return 101
		}
		return resp.StatusCode
	}
	relayGet := func(key string) (int, http.Header) {
		code, _, h := ts.do(t, "GET", relayURL(id, "/", url.Values{"key": {key}}), nil, nil)
		return code, h
	}
	remove := func(key, hostKey string) int {
		q := url.Values{"id": {id}, "key": {key}, "host_key": {hostKey}}
		code, _, _ := ts.do(t, "GET", "/remove?"+q.Encode(), nil, nil)
		return code
	}

	// /remove checks two keys, so it needs room for two failures: it goes
	// first, while the bucket is full.
	if code := remove(testKey, "wrong"); code != 403 {
		t.Fatalf("wrong host key: got %d, want 403", code)
	}
	if code := connect("wrong"); code != 403 {
		t.Fatalf("wrong key: got %d, want 403", code)
	}
	// Two failures used the burst: now even the right key is refused,
	// everywhere.
	if code := connect(testKey); code != 429 {
		t.Fatalf("right key while locked out: got %d, want 429", code)
	}
	code, h := relayGet(testKey)
	if code != 429 || h.Get("Retry-After") != "5" {
		t.Fatalf("relay while locked out: got %d Retry-After %q, want 429 with 5", code, h.Get("Retry-After"))
	}
	clock.Advance(5 * time.Second)
	if code, _ := relayGet(testKey); code != 200 {
		t.Fatalf("after Retry-After: got %d, want 200", code)
	}
	if code, _ := relayGet("wrong"); code != 403 {
		t.Fatalf("wrong key again: got %d, want 403", code)
	}
	if code := connect(testKey); code != 429 {
		t.Fatalf("locked out again: got %d, want 429", code)
	}
	if got := metricValue(t, ts, "wsrouter_rate_limited_total", "endpoint", "connect"); got != 2 {
		t.Fatalf("connect lockouts counted: got %v, want 2", got)
	}
}

func TestTrustProxy(t *testing.T) {
	ts := newTestServer(t, Config{RateRegister: Limit{Rate: 1, Burst: 1}, TrustProxy: "X-Forwarded-For"})
	withClock(ts)
	reg := func(xff string) int {
		code, _, _ := ts.do(t, "GET", "/register?key=a&host_key=b&reg_type=lobby", nil, http.Header{"X-Forwarded-For": {xff}})
		return code
	}
	if code := reg("1.1.1.1, 10.0.0.1"); code != 200 {
		t.Fatalf("got %d, want 200", code)
	}
	// The client forges the first address; the proxy's last one counts.
	if code := reg("2.2.2.2, 10.0.0.1"); code != 429 {
		t.Fatalf("same last address: got %d, want 429", code)
	}
	if code := reg("1.1.1.1, 10.0.0.2"); code != 200 {
		t.Fatalf("another client: got %d, want 200", code)
	}
	// IPv6 addresses count by their /64.
	if code := reg("2001:db8:1:2::1"); code != 200 {
		t.Fatalf("IPv6 client: got %d, want 200", code)
	}
	if code := reg("2001:db8:1:2:ffff::9"); code != 429 {
		t.Fatalf("same /64: got %d, want 429", code)
	}
	if code := reg("2001:db8:1:3::1"); code != 200 {
		t.Fatalf("another /64: got %d, want 200", code)
	}
}

func TestLimiterMemoryBounded(t *testing.T) {
	clock := &fakeClock{now: time.Unix(0, 0)}
	l := newIPLimiter(Limit{Rate: 1, Burst: 10}, clock.Now)
	for i := range 1000 {
		l.take(fmt.Sprintf("10.0.%d.%d", i/256, i%256))
	}
	if l.len() != 1000 {
		t.Fatalf("got %d entries, want 1000", l.len())
	}
	clock.Advance(9 * time.Second)
	l.take("fresh")
	l.sweep()
	if l.len() != 1001 {
		t.Fatalf("before the idle time: got %d entries, want all 1001", l.len())
	}
	clock.Advance(time.Second) // 10 tokens at 1/s: the old buckets are full again
	l.sweep()
	if l.len() != 1 {
		t.Fatalf("after the idle time: got %d entries, want only the fresh one", l.len())
	}
	for i := range maxLimiterEntries + 100 {
		l.take(fmt.Sprint("a", i))
	}
	if n := l.len(); n > maxLimiterEntries {
		t.Fatalf("got %d entries, want at most %d", n, maxLimiterEntries)
	}
}

func TestStats(t *testing.T) {
	t.Run("off without a token", func(t *testing.T) {
		ts := newTestServer(t, Config{})
		if code, _, _ := ts.do(t, "GET", "/stats", nil, http.Header{"Authorization": {"Bearer x"}}); code != 404 {
			t.Fatalf("got %d, want 404", code)
		}
	})
	ts := newTestServer(t, Config{AdminToken: "admin-secret", Registry: regCfgKeep()})
	for _, auth := range []string{"", "Bearer wrong", "admin-secret", "Basic admin-secret"} {
		code, _, h := ts.do(t, "GET", "/stats", nil, http.Header{"Authorization": {auth}})
		if code != 401 || h.Get("WWW-Authenticate") == "" {
			t.Fatalf("Authorization %q: got %d, want 401 with WWW-Authenticate", auth, code)
		}
	}
	lobby := ts.register(t, "lobby")
	hc := ts.register(t, "hostclient")
	a, b := ts.dial(t, lobby, ""), ts.dial(t, lobby, "")
	ts.dial(t, hc, "host")
	write(t, a, "one")
	expectNext(t, b, "one")
	write(t, b, "two")
	expectNext(t, a, "two")

	code, body, _ := ts.do(t, "GET", "/stats", nil, http.Header{"Authorization": {"Bearer admin-secret"}})
	if code != 200 {
		t.Fatalf("got %d, want 200", code)
	}
	for _, secret := range []string{testKey, testHostKey, "$2a$", "admin-secret"} {
		if strings.Contains(body, secret) {
			t.Fatalf("stats %s contains %q", body, secret)
		}
	}
	var got statsReply
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatal(err)
	}
	if got.Totals.Registrations != 2 || got.Totals.Members["member"] != 2 || got.Totals.Members["host"] != 1 ||
		got.Totals.MessagesIn != 2 || got.Totals.MessagesOut != 2 {
		t.Fatalf("got totals %+v, want 2 registrations, 2 members, 1 host, 2 in, 2 out", got.Totals)
	}
	byID := map[string]regStats{}
	for _, r := range got.Registrations {
		byID[r.ID] = r
	}
	l := byID[lobby]
	if l.Type != "lobby" || l.Members["member"] != 2 || l.MessagesIn != 2 || l.Created.IsZero() || l.LastActive.Before(l.Created) {
		t.Fatalf("got lobby %+v", l)
	}
	if h := byID[hc]; h.Type != "hostclient" || h.Members["host"] != 1 || h.Members["client"] != 0 {
		t.Fatalf("got hostclient %+v", h)
	}
}

func TestMetricsAfterKnownTraffic(t *testing.T) {
	ts := newTestServer(t, Config{})
	lobby := ts.register(t, "lobby")
	hc := ts.register(t, "hostclient")
	a, b := ts.dial(t, lobby, ""), ts.dial(t, lobby, "")
	c := ts.dial(t, lobby, "")
	ts.device(t, hc, func(f relay.Request) string { return reply(f, map[string]any{"content": "x"}) })
	for _, m := range []string{"1", "22", "333"} {
		write(t, a, m)
		expectNext(t, b, m)
		expectNext(t, c, m)
	}
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	b.Write(ctx, websocket.MessageBinary, []byte{1, 2, 3, 4})
	read(t, a)
	read(t, c)
	ts.do(t, "GET", relayURL(hc, "/", nil), nil, nil)
	ts.do(t, "GET", relayURL(hc, "/", url.Values{"key": {"wrong"}}), nil, nil)
	q := url.Values{"id": {lobby}, "key": {testKey}, "host_key": {testHostKey}}
	ts.do(t, "GET", "/remove?"+q.Encode(), nil, nil)
	for range 3 {
		waitFor(t, ts.closes, "4000 closes", func(c int) bool { return c == codeRemoved })
	}

	tests := []struct {
		name, label, value string
		want               float64
	}{
		{"wsrouter_registrations_created_total", "type", "lobby", 1},
		{"wsrouter_registrations_created_total", "type", "hostclient", 1},
		{"wsrouter_registrations", "type", "hostclient", 1},
		{"wsrouter_registrations", "type", "lobby", 0},
		{"wsrouter_members", "role", "host", 1},
		{"wsrouter_registrations_removed_total", "cause", "admin", 1},
		{"wsrouter_closes_total", "code", "4000", 3},
		{"wsrouter_relay_requests_total", "status", "200", 1},
		{"wsrouter_relay_requests_total", "status", "403", 1},
	}
	ts.do(t, "GET", "/register?key=a&host_key=b&reg_type=nope", nil, nil)
	if got := metricValue(t, ts, "wsrouter_refusals_total", "status", "400"); got != 1 {
		t.Errorf("refusals{status=400}: got %v, want 1", got)
	}
	for _, tt := range tests {
		if got := metricValue(t, ts, tt.name, tt.label, tt.value); got != tt.want {
			t.Errorf("%s{%s=%q}: got %v, want %v", tt.name, tt.label, tt.value, got, tt.want)
		}
	}
	fams := scrape(t, ts)
	msgs := map[string]float64{}
	for _, m := range fams["wsrouter_messages_total"].GetMetric() {
		msgs[labels(m)] = m.GetCounter().GetValue()
	}
	// 3 text in, each out to 2; 1 binary in, out to 2. The device's relay
	// reply is claimed, not counted as forwarded.
	wantMsgs := map[string]float64{"in/text": 3 + 1, "out/text": 6, "in/binary": 1, "out/binary": 2}
	for k, v := range wantMsgs {
		if msgs[k] != v {
			t.Errorf("messages %s: got %v, want %v", k, msgs[k], v)
		}
	}
	bytesOut := map[string]float64{}
	for _, m := range fams["wsrouter_message_bytes_total"].GetMetric() {
		bytesOut[labels(m)] = m.GetCounter().GetValue()
	}
	if bytesOut["out/text"] != 2*(1+2+3) || bytesOut["out/binary"] != 8 {
		t.Errorf("bytes: got %v, want out/text 12 and out/binary 8", bytesOut)
	}
	keyChecks := fams["wsrouter_key_check_seconds"]
	var bcrypt, remembered uint64
	for _, m := range keyChecks.GetMetric() {
		switch labels(m) {
		case "bcrypt":
			bcrypt = m.GetHistogram().GetSampleCount()
		case "remembered":
			remembered = m.GetHistogram().GetSampleCount()
		}
	}
	// Lobby: 1 bcrypt + 2 remembered; hostclient: the device's bcrypt, the
	// relay's remembered, the wrong key's bcrypt; /remove: both keys by
	// bcrypt, observed once.
	if bcrypt != 4 || remembered != 3 {
		t.Errorf("key checks: got bcrypt %d remembered %d, want 4 and 3", bcrypt, remembered)
	}
	if n := fams["wsrouter_relay_duration_seconds"].GetMetric()[0].GetHistogram().GetSampleCount(); n != 2 {
		t.Errorf("relay latency samples: got %d, want 2", n)
	}
}

func scrape(t *testing.T, ts *testServer) map[string]*dto.MetricFamily {
	t.Helper()
	code, body, _ := ts.do(t, "GET", "/metrics", nil, nil)
	if code != 200 {
		t.Fatalf("/metrics: got %d", code)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	return fams
}

// labels joins a metric's label values with "/".
func labels(m *dto.Metric) string {
	var vs []string
	for _, l := range m.GetLabel() {
		vs = append(vs, l.GetValue())
	}
	return strings.Join(vs, "/")
}

func metricValue(t *testing.T, ts *testServer, name, label, value string) float64 {
	t.Helper()
	fam := scrape(t, ts)[name]
	for _, m := range fam.GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == label && l.GetValue() == value {
				if m.GetCounter() != nil {
					return m.GetCounter().GetValue()
				}
				return m.GetGauge().GetValue()
			}
		}
	}
	return 0
}

// TestFailedKeyLockoutParallel: distinct guesses sent at once must not all
// pass a lockout that only looked at the bucket: the checks running count
// against the tokens left.
func TestFailedKeyLockoutParallel(t *testing.T) {
	ts := newTestServer(t, Config{RateBadKey: Limit{Rate: 0.2, Burst: 2}, Registry: regCfgKeep()})
	withClock(ts)
	id := ts.register(t, "lobby")
	const n = 12
	codes := make(chan int, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			_, resp, _ := ts.tryDial(t, id, fmt.Sprintf("wrong-%d", i), "", nil)
			if resp == nil {
				codes <- 101
				return
			}
			codes <- resp.StatusCode
		})
	}
	wg.Wait()
	close(codes)
	got := map[int]int{}
	for c := range codes {
		got[c]++
	}
	if got[403] != 2 || got[429] != n-2 {
		t.Fatalf("got %v, want exactly the burst (2) checked and %d refused with 429", got, n-2)
	}
}
