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
	lim  *rate.Limiter
	last time.Time // guarded by ipLimiter.mu
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
	e, ok := l.entries[ip]
	if !ok {
		if len(l.entries) >= maxLimiterEntries {
			l.sweepLocked(now)
		}
		if len(l.entries) >= maxLimiterEntries {
			for k := range l.entries {
				delete(l.entries, k)
				break
			}
		}
		e = &limiterEntry{lim: rate.NewLimiter(l.limit, l.burst)}
		l.entries[ip] = e
	}
	e.last = now
	return e.lim
}

func (l *ipLimiter) sweepLocked(now time.Time) {
	for k, e := range l.entries {
		if now.Sub(e.last) >= l.idle {
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

// reserve takes a token for ip up front and returns a refund, or how long
// until a token is available. The failed-key lockout reserves before every
// key check and refunds when the check did not fail: checking without
// taking would let any number of parallel guesses through on the last
// token.
func (l *ipLimiter) reserve(ip string) (refund func(), wait time.Duration) {
	if l == nil {
		return func() {}, 0
	}
	now := l.now()
	r := l.entry(ip, now).ReserveN(now, 1)
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return nil, d
	}
	return func() { r.CancelAt(l.now()) }, 0
}

// spend takes a token for ip if there is one (a failed key check).
func (l *ipLimiter) spend(ip string) {
	if l == nil {
		return
	}
	now := l.now()
	l.entry(ip, now).AllowN(now, 1)
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
	if ls.trustProxy != "" {
		if v := r.Header.Values(ls.trustProxy); len(v) > 0 {
			last := v[len(v)-1]
			if i := strings.LastIndexByte(last, ','); i >= 0 {
				last = last[i+1:]
			}
			if ip := net.ParseIP(strings.TrimSpace(last)); ip != nil {
				return limitKey(ip)
			}
		}
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

// keyLockout refuses an address that has used up its failed-key tokens,
// right key or not, so that keys cannot be guessed at bcrypt speed from one
// address. Otherwise it holds one token for the key check to come; the
// caller refunds it unless the check failed.
func (rt *Router) keyLockout(r *http.Request, endpoint string) (refund func(), err error) {
	refund, d := rt.limits.badKey.reserve(rt.limits.clientIP(r))
	if d > 0 {
		rt.metrics.rateLimited(endpoint)
		return nil, &errRateLimited{retry: d}
	}
	return refund, nil
}

// keyFailed takes a further failed-key token from r's client (a second wrong
// key in one request).
func (rt *Router) keyFailed(r *http.Request) {
	rt.limits.badKey.spend(rt.limits.clientIP(r))
}
