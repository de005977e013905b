package router

import (
	"math"
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

// wait reports how long ip must wait for a token without spending one: the
// failed-key lockout checks before every key check and spends only on a
// failure.
func (l *ipLimiter) wait(ip string) time.Duration {
	if l == nil {
		return 0
	}
	now := l.now()
	l.mu.Lock()
	e, ok := l.entries[ip]
	l.mu.Unlock()
	if !ok {
		return 0
	}
	tokens := e.lim.TokensAt(now)
	if tokens >= 1 {
		return 0
	}
	return time.Duration(math.Ceil((1 - tokens) / float64(l.limit) * float64(time.Second)))
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
// the header came from the client and may be forged.
func (ls *limits) clientIP(r *http.Request) string {
	if ls.trustProxy != "" {
		if v := r.Header.Values(ls.trustProxy); len(v) > 0 {
			last := v[len(v)-1]
			if i := strings.LastIndexByte(last, ','); i >= 0 {
				last = last[i+1:]
			}
			if ip := net.ParseIP(strings.TrimSpace(last)); ip != nil {
				return ip.String()
			}
		}
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
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
// address.
func (rt *Router) keyLockout(r *http.Request, endpoint string) error {
	if d := rt.limits.badKey.wait(rt.limits.clientIP(r)); d > 0 {
		rt.metrics.rateLimited(endpoint)
		return &errRateLimited{retry: d}
	}
	return nil
}

// keyFailed takes a failed-key token from r's client.
func (rt *Router) keyFailed(r *http.Request) {
	rt.limits.badKey.spend(rt.limits.clientIP(r))
}
