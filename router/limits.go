package router

import (
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// maxLimiterEntries caps the addresses one limiter remembers. Past it, idle
// entries are swept first; if all are busy, an arbitrary one is forgotten,
// which at worst hands that address a fresh bucket. Memory stays bounded
// whatever the number of addresses.
const maxLimiterEntries = 1 << 16

// ipLimiter is a token bucket per client address, with
// golang.org/x/time/rate doing the arithmetic. now is injected so tests can
// drive the clock.
type ipLimiter struct {
	limit rate.Limit
	burst int
	idle  time.Duration // an entry unused this long has a full bucket again
	now   func() time.Time

	mu      sync.Mutex
	entries map[string]*limiterEntry // guarded by mu
}

type limiterEntry struct {
	lim      *rate.Limiter
	last     time.Time // guarded by ipLimiter.mu
	inflight int       // guarded by ipLimiter.mu; key checks running (failed-key bucket)
}

// newIPLimiter returns a limiter for l, or nil (no limit) when l.Rate is 0.
func newIPLimiter(l Limit, now func() time.Time) *ipLimiter {
	if l.Rate <= 0 {
		return nil
	}
	burst := max(l.Burst, 1)
	// A bucket refills completely in burst/rate; an entry idle for longer
	// is indistinguishable from a new one and can go.
	idle := time.Duration(float64(burst) / l.Rate * float64(time.Second))
	return &ipLimiter{
		limit:   rate.Limit(l.Rate),
		burst:   burst,
		idle:    max(idle, time.Second),
		now:     now,
		entries: make(map[string]*limiterEntry),
	}
}

func (l *ipLimiter) entry(ip string, now time.Time) *rate.Limiter {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.entryLocked(ip, now).lim
}

func (l *ipLimiter) entryLocked(ip string, now time.Time) *limiterEntry {
	e, ok := l.entries[ip]
	if !ok {
		if len(l.entries) >= maxLimiterEntries {
			l.sweepLocked(now)
		}
		if len(l.entries) >= maxLimiterEntries {
			// Never one with checks running: its room would be lost.
			for k, old := range l.entries {
				if old.inflight == 0 {
					delete(l.entries, k)
					break
				}
			}
		}
		e = &limiterEntry{lim: rate.NewLimiter(l.limit, l.burst)}
		l.entries[ip] = e
	}
	e.last = now
	return e
}

func (l *ipLimiter) sweepLocked(now time.Time) {
	for k, e := range l.entries {
		// A bucket in debt (the failed-key one goes below zero) is not
		// full again after idle: only a full one is like a new one.
		if e.inflight == 0 && now.Sub(e.last) >= l.idle && e.lim.TokensAt(now) >= float64(l.burst) {
			delete(l.entries, k)
		}
	}
}

// sweep forgets idle entries.
func (l *ipLimiter) sweep() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sweepLocked(l.now())
}

func (l *ipLimiter) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.entries)
}

// take spends one token for ip. It returns 0 when allowed, or how long until
// a token is available.
func (l *ipLimiter) take(ip string) time.Duration {
	if l == nil {
		return 0
	}
	now := l.now()
	lim := l.entry(ip, now)
	r := lim.ReserveN(now, 1)
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return d
	}
	return 0
}

// The failed-key bucket is used differently from the others: a token is
// taken only for a wrong key, never for a right one, and an address is
// locked out while it has none. So that parallel guesses cannot all pass on
// the last token, the key checks an address has running count against its
// tokens: a check may start only while tokens - inflight >= 1. Concurrent
// checks of the same key share one bcrypt and one slot (registry.Gate is
// asked only by the check that starts the bcrypt).

// lockedOut returns how long until ip has a token again, or 0 when it has
// one.
func (l *ipLimiter) lockedOut(ip string) time.Duration {
	if l == nil {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	return l.waitLocked(l.entryLocked(ip, now), now, 0)
}

// waitLocked is how long until e has a token beyond those held by inflight
// checks; 0 if it has one now.
func (l *ipLimiter) waitLocked(e *limiterEntry, now time.Time, inflight int) time.Duration {
	short := 1 - (e.lim.TokensAt(now) - float64(inflight))
	if short <= 0 {
		return 0
	}
	return time.Duration(short / float64(l.limit) * float64(time.Second))
}

// tokens returns the tokens ip has now (for tests).
func (l *ipLimiter) tokens(ip string) float64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	return l.entryLocked(ip, now).lim.TokensAt(now)
}

// begin admits a key check from ip that is about to run bcrypt, holding one
// token's worth of room until end. end takes the token when the check
// failed. wait > 0 means ip has no room (the caller answers 429).
func (l *ipLimiter) begin(ip string) (end func(failed bool), wait time.Duration) {
	if l == nil {
		return func(bool) {}, 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	e := l.entryLocked(ip, now)
	if d := l.waitLocked(e, now, e.inflight); d > 0 {
		return nil, d
	}
	e.inflight++
	return func(failed bool) {
		l.mu.Lock()
		defer l.mu.Unlock()
		e.inflight--
		if failed {
			// ReserveN goes into debt where AllowN would take nothing:
			// a failure always costs its token.
			e.lim.ReserveN(l.now(), 1)
		}
	}, 0
}

// spend takes a token for ip: a failed key check that did not pass through
// begin (a second wrong key, or a check that shared another's bcrypt).
func (l *ipLimiter) spend(ip string) {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	l.entryLocked(ip, now).lim.ReserveN(now, 1)
}

// limits holds the router's per-IP limiters.
type limits struct {
	register, connect, relay, badKey *ipLimiter
	trustProxy                       string
}

func newLimits(cfg *Config, now func() time.Time) *limits {
	return &limits{
		register:   newIPLimiter(cfg.RateRegister, now),
		connect:    newIPLimiter(cfg.RateConnect, now),
		relay:      newIPLimiter(cfg.RateRelay, now),
		badKey:     newIPLimiter(cfg.RateBadKey, now),
		trustProxy: cfg.TrustProxy,
	}
}

func (ls *limits) sweep() {
	for _, l := range []*ipLimiter{ls.register, ls.connect, ls.relay, ls.badKey} {
		if l != nil {
			l.sweep()
		}
	}
}

// clientIP is the socket's address, or with -trust-proxy the last address
// of that header: the one the proxy in front appended. Earlier addresses in
// the header came from the client and may be forged. An IPv6 address counts
// by its /64, the block one subscriber usually holds: otherwise anyone with
// a /64 would have 2^64 fresh buckets.
func (ls *limits) clientIP(r *http.Request) string {
	if ip := ls.proxyIP(r); ip != nil {
		return limitKey(ip)
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	if ip := net.ParseIP(host); ip != nil {
		return limitKey(ip)
	}
	return host
}

// proxyIP is, with -trust-proxy, the last address of that header (the one
// the proxy in front appended); nil without it or when it has none.
func (ls *limits) proxyIP(r *http.Request) net.IP {
	if ls.trustProxy == "" {
		return nil
	}
	v := r.Header.Values(ls.trustProxy)
	if len(v) == 0 {
		return nil
	}
	last := v[len(v)-1]
	if i := strings.LastIndexByte(last, ','); i >= 0 {
		last = last[i+1:]
	}
	return net.ParseIP(strings.TrimSpace(last))
}

// clientAddr is the client's address as /members shows it: the socket's
// host:port, or with -trust-proxy the header's last address.
func (ls *limits) clientAddr(r *http.Request) string {
	if ip := ls.proxyIP(r); ip != nil {
		return ip.String()
	}
	return r.RemoteAddr
}

func limitKey(ip net.IP) string {
	if ip.To4() != nil {
		return ip.String()
	}
	return ip.Mask(net.CIDRMask(64, 128)).String() + "/64"
}

// allow applies the endpoint's limiter to r's client and, when it is out of
// tokens, returns the 429 error with its Retry-After.
func (rt *Router) allow(l *ipLimiter, endpoint string, r *http.Request) error {
	if d := l.take(rt.limits.clientIP(r)); d > 0 {
		rt.metrics.rateLimited(endpoint)
		return &errRateLimited{retry: d}
	}
	return nil
}
