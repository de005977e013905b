package router

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"wsrouter/registry"
	"wsrouter/router/token"
)

// This file is the one place that reads and checks credentials, for every
// endpoint. A request presents a registration's key (query or form `key`, or
// X-Key), its host key (`host_key`, or X-Host-Key) or the admin token
// (Authorization: Bearer); the authenticator answers whether the caller is
// a member of a registration, its owner, or the operator. A token
// (tokens.go) stands in for the key where docs/protocol.md §12 allows one.

// errUnauthorized is a missing or wrong admin bearer: 401.
var errUnauthorized = errors.New("unauthorized")

// credentials are what a request presents. Values are never logged or put
// in an error.
type credentials struct {
	key, hostKey string
	// token, when set, stands in for key (docs/protocol.md §12).
	token string
}

// need says which credentials an endpoint requires.
type need uint8

const (
	needKey need = 1 << iota
	needHostKey
	// orToken lets a token stand in for the key.
	orToken
)

// readCredentials reads the credentials of a request's parameters: each
// from its parameter or, failing that, its header. Those in want are
// required (400 when missing); a key must be 1 to 72 bytes. With orToken, a
// token replaces the key; both at once is a 400, since the caller cannot
// mean both.
func readCredentials(p *params, want need) (credentials, error) {
	var c credentials
	var err error
	if want&orToken != 0 {
		if c.token, err = p.token(); err != nil {
			return c, err
		}
	}
	if c.token != "" {
		if k, err := p.credential("key", "X-Key"); err != nil {
			return c, err
		} else if k != "" {
			return c, paramError("give key or token, not both")
		}
	} else if want&needKey != 0 {
		if c.key, err = p.key("key", "X-Key"); err != nil {
			return c, err
		}
	}
	if want&needHostKey != 0 {
		if c.hostKey, err = p.key("host_key", "X-Host-Key"); err != nil {
			return c, err
		}
	}
	return c, nil
}

// readBearer returns r's bearer token (the scheme in any case, RFC 9110
// §11.1), or "" when it has none.
func readBearer(r *http.Request) string {
	scheme, token, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	if !strings.EqualFold(scheme, "Bearer") {
		return ""
	}
	return strings.TrimSpace(token)
}

// authenticator checks credentials under the failed-key lockout.
type authenticator struct{ rt *Router }

// member reports (nil) whether cred makes the caller a member of reg: the
// registration's key.
func (a authenticator) member(r *http.Request, endpoint string, reg *registry.Registration, cred credentials) error {
	g := a.rt.keyGuard(r, endpoint)
	if err := g.lockout(); err != nil {
		return err
	}
	err := reg.CheckKey(r.Context(), cred.key, g.gate)
	if errors.Is(err, registry.ErrForbidden) {
		g.failed(reg.ID, 0)
	}
	return err
}

// owner reports (nil) whether cred makes the caller the owner of reg: the
// key and the host key, both checked with bcrypt every time so that neither
// the time taken nor a later request tells which one was wrong.
func (a authenticator) owner(r *http.Request, endpoint string, reg *registry.Registration, cred credentials) error {
	g := a.rt.keyGuard(r, endpoint)
	if err := g.lockout(); err != nil {
		return err
	}
	wrong, err := reg.CheckKeys(r.Context(), cred.key, cred.hostKey, g.gate)
	if wrong > 0 {
		g.failed(reg.ID, 0) // each key's gate charged its own failure
	}
	return err
}

// backend reports (nil) whether the caller may use the backend API on reg:
// the admin bearer if it presents one (wrong: 403, as a wrong key), else
// the registration's host key.
func (a authenticator) backend(r *http.Request, endpoint string, reg *registry.Registration, cred credentials, bearer string) error {
	if bearer != "" {
		if err := a.admin(r, endpoint, bearer); errors.Is(err, errUnauthorized) {
			return fmt.Errorf("admin token: %w", registry.ErrForbidden)
		} else {
			return err
		}
	}
	g := a.rt.keyGuard(r, endpoint)
	if err := g.lockout(); err != nil {
		return err
	}
	err := reg.CheckHostKey(r.Context(), cred.hostKey, g.gate)
	if errors.Is(err, registry.ErrForbidden) {
		g.failed(reg.ID, 0)
	}
	return err
}

// token checks tok for reg on behalf of endpoint: its signature, times and
// scope, and, unless want is 0, that it opens the role want. A refusal is
// the 403 of a wrong key: it takes a failed-key token (docs/protocol.md §8)
// and is counted by reason; the token itself is never logged.
func (a authenticator) token(r *http.Request, endpoint string, reg *registry.Registration, tok string, want registry.Role) (token.Claims, registry.Role, error) {
	g := a.rt.keyGuard(r, endpoint)
	if err := g.lockout(); err != nil {
		return token.Claims{}, 0, err
	}
	c, err := a.rt.tokens.verify.Verify(tok)
	if err == nil {
		err = c.Grants(reg.ID, reg.Generation)
	}
	var role registry.Role
	if err == nil {
		if role, err = roleOf(reg.Type, "role", c.Role); err != nil {
			err = token.ScopeError("role %q is not one of the registration's", c.Role)
		} else if want != 0 && role != want {
			err = token.ScopeError("a %s token, not %s", role, want)
		}
	}
	if err != nil {
		var te *token.Error
		reason := token.Malformed
		if errors.As(err, &te) {
			reason = te.Reason
		}
		a.rt.metrics.tokens.WithLabelValues(string(reason)).Inc()
		a.rt.limits.badKey.spend(g.ip) // no gate: a token check runs no bcrypt
		a.rt.logs.warn("badtoken", "token refused", "endpoint", endpoint, "client", g.ip, "reg", reg.ID, "reason", reason)
		return c, 0, fmt.Errorf("%w: %w", registry.ErrForbidden, err)
	}
	a.rt.metrics.tokens.WithLabelValues("ok").Inc()
	return c, role, nil
}

// admin reports (nil) whether bearer is the admin token. A wrong token is a
// failed key check: it takes a failed-key token, and an address with none
// left gets 429 whatever it presents. A missing one takes nothing.
func (a authenticator) admin(r *http.Request, endpoint, bearer string) error {
	if bearer == "" || a.rt.cfg.AdminToken == "" {
		return errUnauthorized
	}
	g := a.rt.keyGuard(r, endpoint)
	if err := g.lockout(); err != nil {
		return err
	}
	// Through the gate like a key check, so that parallel guesses cannot
	// all pass on the last token.
	end, err := g.gate()
	if err != nil {
		return err
	}
	wrong := subtle.ConstantTimeCompare([]byte(bearer), []byte(a.rt.cfg.AdminToken)) != 1
	end(wrong)
	if wrong {
		g.failed("", 0)
		return errUnauthorized
	}
	return nil
}

// keyGuard applies the failed-key bucket to the key checks of one request:
// lockout refuses an address that has used up its tokens, right key or not,
// so that keys cannot be guessed at bcrypt speed from one address; gate
// admits a check that runs bcrypt; failed charges a wrong key that gate did
// not already charge.
type keyGuard struct {
	rt       *Router
	r        *http.Request
	endpoint string
	ip       string
}

func (rt *Router) keyGuard(r *http.Request, endpoint string) *keyGuard {
	return &keyGuard{rt: rt, r: r, endpoint: endpoint, ip: rt.limits.clientIP(r)}
}

// lockout returns the 429 for an address with no failed-key token left.
func (g *keyGuard) lockout() error {
	if d := g.rt.limits.badKey.lockedOut(g.ip); d > 0 {
		return g.limited(d)
	}
	return nil
}

func (g *keyGuard) limited(d time.Duration) error {
	g.rt.metrics.rateLimited(g.endpoint)
	g.rt.logs.warn("lockout", "client locked out after failed key checks", "endpoint", g.endpoint, "client", g.ip, "retry_after", d.Round(time.Second))
	return &errRateLimited{retry: d}
}

// gate is the registry.Gate of this request's checks.
func (g *keyGuard) gate() (func(failed bool), error) {
	end, d := g.rt.limits.badKey.begin(g.ip)
	if d > 0 {
		return nil, g.limited(d)
	}
	return end, nil
}

// failed records a failed check: logged, and charged extra tokens beyond
// the one the gate's end took (a second wrong key in one request, or a check
// with no gate). A check that shared another's bcrypt and failed costs
// nothing more: an identical guess tells nothing new.
func (g *keyGuard) failed(reg string, extra int) {
	for range extra {
		g.rt.limits.badKey.spend(g.ip)
	}
	args := []any{"endpoint", g.endpoint, "client", g.ip}
	if reg != "" {
		args = append(args, "reg", reg)
	}
	g.rt.logs.warn("badkey", "key check failed", args...)
}
