package router

import (
	"errors"
	"net/http"
	"net/url"
	"path"
	"strings"

	"github.com/coder/websocket"

	"wsrouter/registry"
)

func (rt *Router) serveConnect(w http.ResponseWriter, r *http.Request) {
	c, err := rt.admit(w, r)
	if err != nil {
		code, msg := status(err)
		// Lockouts and wrong keys have their own lines.
		if code != http.StatusTooManyRequests && code != http.StatusForbidden || errors.Is(err, errOrigin) {
			rt.logs.info("refused", "connect refused", "status", code, "why", msg, "client", rt.limits.clientIP(r))
		}
		rt.refuse(w, "connect", err)
		return
	}

	// The member joined before the upgrade response is written, so it
	// receives every message sent after that (docs/protocol.md §4); they wait in its
	// queue until the socket is up.
	cw := &captureWriter{ResponseWriter: w}
	cw.Header().Set("X-Connection-Id", c.id)
	ws, err := websocket.Accept(cw, r, &websocket.AcceptOptions{
		// Origins were checked in admit, before joining.
		InsecureSkipVerify: true,
		OnPingReceived:     c.onPing,
		OnPongReceived:     c.onPong,
	})
	if err != nil {
		// Accept has answered the request.
		rt.logs.info("upgrade", "upgrade failed", "reg", c.reg.ID, "client", rt.limits.clientIP(r), "err", err)
		c.reg.Leave(c, registry.Closure{Code: 1006})
		c.endHooks(registry.Closure{Code: 1006})
		close(c.gone)
		if c.role == registry.RoleHost {
			rt.relay.HostLeft(c.reg, c) // a relay may have picked it meanwhile
		}
		rt.conns.Done()
		return
	}
	// The connection is read by a goroutine of its own rather than by this
	// handler's: once the handler returns, net/http lets go of its
	// per-connection state (a 4 KiB write buffer that a hijacked connection
	// never uses, the request, a deep stack). That is most of what an idle
	// member would otherwise cost.
	go func() {
		defer rt.conns.Done()
		closure := c.serve(ws, cw.wc)
		c.reg.Leave(c, closure)
		c.endHooks(closure)
	}()
}

// admit runs every check of /connect that can refuse with a status, joins the
// registration and counts the connection for Shutdown. On success the caller
// owns a conn.Done and a Leave.
func (rt *Router) admit(w http.ResponseWriter, r *http.Request) (*conn, error) {
	if rt.closing.Load() {
		return nil, errShuttingDown
	}
	if err := rt.allow(rt.limits.connect, "connect", r); err != nil {
		return nil, err
	}
	p, err := readParams(w, r)
	if err != nil {
		return nil, err
	}
	id, err := p.id("id", true)
	if err != nil {
		return nil, err
	}
	cred, err := readCredentials(p, needKey|orToken)
	if err != nil {
		return nil, err
	}
	if !isUpgrade(r) {
		return nil, errNotUpgrade
	}
	if !rt.originAllowed(r) {
		return nil, errOrigin
	}
	reg, err := rt.lookup(r.Context(), id)
	if err != nil {
		if rt.cut() {
			// It may have been made elsewhere since this node lost touch.
			return nil, errCut
		}
		return nil, err
	}
	// With a token, sock_type may be left out: the token's role is used.
	var role registry.Role
	if sockType, err := p.get("sock_type"); err != nil {
		return nil, err
	} else if cred.token == "" || sockType != "" || reg.Type != registry.HostClient {
		if role, err = p.role(reg.Type); err != nil {
			return nil, err
		}
	}
	name, err := p.name("name")
	if err != nil {
		return nil, err
	}
	var tokenKey string
	if cred.token != "" {
		claims, granted, err := rt.auth.token(r, "connect", reg, cred.token, role)
		if err != nil {
			return nil, err
		}
		role, tokenKey = granted, claims.Key
		if name == "" && claims.Name != "" {
			if !validName(claims.Name) {
				return nil, paramError("the token's sub is not a member name (1 to 64 of A-Z a-z 0-9 . _ - @ :): give name")
			}
			name = claims.Name
		}
	} else if err := rt.auth.member(r, "connect", reg, cred); err != nil {
		return nil, err
	}

	rt.mu.Lock()
	if rt.shuttingDown {
		rt.mu.Unlock()
		return nil, errShuttingDown
	}
	rt.conns.Add(1)
	rt.mu.Unlock()

	// The backend hears of the member before it joins, and may refuse it
	// or name it.
	connID, addr := newConnID(), rt.limits.clientAddr(r)
	if given, err := rt.connectHook(r.Context(), reg, hookEvent(reg, connID, role, name, addr)); err != nil {
		rt.conns.Done()
		return nil, err
	} else if given != "" {
		name = given
	}
	c := rt.newConn(reg, connID, role, name, addr)
	c.tokenKey = tokenKey
	if err := reg.JoinNamed(c, role, name); err != nil {
		rt.conns.Done()
		if rt.closing.Load() {
			// Shutdown removed the registration meanwhile: that is a
			// 503, not an unknown id.
			return nil, errShuttingDown
		}
		return nil, err
	}
	c.startHooks()
	if tokenKey != "" && !rt.tokens.verify.HasKey(tokenKey) {
		// The issuer's keys were replaced while this member was being
		// admitted, and the sweep that closes their members may have
		// passed before it joined: it closes itself, as the sweep would.
		c.Close(codePolicy, "credentials revoked")
	}
	return c, nil
}

// isUpgrade reports whether r asks for a WebSocket upgrade, so that a plain
// request is refused before joining rather than by Accept after.
func isUpgrade(r *http.Request) bool {
	return headerHasToken(r.Header, "Connection", "upgrade") &&
		headerHasToken(r.Header, "Upgrade", "websocket") &&
		r.Header.Get("Sec-WebSocket-Key") != "" &&
		r.Header.Get("Sec-WebSocket-Version") == "13"
}

func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// originAllowed reports whether a browser's Origin may open a WebSocket:
// always without an Origin header (not a browser) or without patterns,
// otherwise when the origin's host matches a pattern.
func (rt *Router) originAllowed(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" || len(rt.cfg.AllowedOrigins) == 0 {
		return true
	}
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" {
		return false
	}
	host := strings.ToLower(u.Host)
	for _, pat := range rt.cfg.AllowedOrigins {
		if ok, _ := path.Match(strings.ToLower(pat), host); ok {
			return true
		}
	}
	return false
}
