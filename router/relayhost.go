package router

import (
	"errors"
	"net/http"
	"strings"
	"time"

	"wsrouter/registry"
	"wsrouter/router/relay"
)

// This file connects the relay (router/relay, HTTP to a device) to the edge:
// the route a relay request takes through the router's checks, and the
// device's connection as the relay's host transport.

// newRelay returns the router's relay proxy.
func (rt *Router) newRelay() *relay.Proxy {
	return &relay.Proxy{
		Route:        rt.routeRelay,
		ErrorHandler: rt.relayError,
		Observe:      rt.relayDone,
		Timeout:      rt.cfg.RelayTimeout,
		MaxBody:      rt.cfg.RelayMaxBody,
		MaxPending:   rt.cfg.RelayMaxPending,
		MaxMemory:    rt.cfg.RelayMaxMemory,
	}
}

// routeRelay runs the router's checks of /relay/{id}/{path…}: shutdown, the
// per-address rate, the path, the key (before anything about the
// registration is told), the type, and a host (round-robin).
func (rt *Router) routeRelay(w http.ResponseWriter, r *http.Request) (*relay.Target, error) {
	if rt.closing.Load() {
		return nil, errShuttingDown
	}
	if err := rt.allow(rt.limits.relay, "relay", r); err != nil {
		return nil, err
	}
	id, path, ok := splitRelayPath(r.URL.Path)
	if !ok || !validID(id) {
		return nil, paramError("malformed relay path: want /relay/{id}/{path}")
	}
	// Only the query's key and token are the router's, and they are not
	// forwarded; a form field of those names in the body is the device's
	// business.
	query := r.URL.Query()
	mine := map[string][]string{"key": query["key"], "token": query["token"]}
	query.Del("key")
	query.Del("token")
	cred, err := readCredentials(&params{r: r, vals: mine}, needKey|orToken)
	if err != nil {
		return nil, err
	}
	reg, err := rt.lookup(r.Context(), id)
	if err != nil {
		return nil, err
	}
	if cred.token != "" {
		// A client token: the caller speaks to the device as a client.
		if _, _, err := rt.auth.token(r, "relay", reg, cred.token, registry.RoleClient); err != nil {
			return nil, err
		}
	} else if err := rt.auth.member(r, "relay", reg, cred); err != nil {
		return nil, err
	}
	if reg.Type != registry.HostClient {
		return nil, relay.ErrNotHostClient
	}
	t := &relay.Target{Reg: reg, Path: path, Query: query, Client: rt.limits.clientIP(r)}
	if t.Host, _ = reg.PickHost().(relay.Host); t.Host == nil {
		if rt.cfg.Cluster == nil {
			return nil, relay.ErrNoHost
		}
		// Perhaps on another node.
		t.Remote = rt.remoteRelay(reg)
	}
	return t, nil
}

// splitRelayPath splits "/relay/{id}/{path…}" into the id and the path after
// it, which always starts with "/".
func splitRelayPath(p string) (id, rest string, ok bool) {
	s, found := strings.CutPrefix(p, "/relay/")
	if !found {
		return "", "", false
	}
	id, rest, _ = strings.Cut(s, "/")
	return id, "/" + rest, id != ""
}

// relayStatus maps a relay request's error to its status and body: the
// relay's own, else the router's.
func relayStatus(err error) (int, string) {
	if code, msg, ok := relay.Status(err); ok {
		return code, msg
	}
	return status(err)
}

// relayError answers a failed relay request (the relay has set its
// sandbox headers).
func (rt *Router) relayError(w http.ResponseWriter, r *http.Request, err error) {
	code, msg := relayStatus(err)
	if errors.Is(err, relay.ErrTooManyPending) {
		// Pending requests end within the relay timeout at the latest.
		w.Header().Set("Retry-After", "1")
	}
	writeStatus(w, err, code, msg)
}

// relayDone counts and logs a relay request's end.
func (rt *Router) relayDone(id string, status int, d time.Duration, err error) {
	if err != nil {
		status, _ = relayStatus(err)
		rt.log.Debug("relay failed", "reg", id, "status", status, "err", err)
	}
	rt.metrics.relayed(status, d)
}

// relayRemoved fails the pending relay requests of a removed registration:
// 503 while the server shuts down (docs/protocol.md §8), 502 otherwise (its
// host was closed).
func (rt *Router) relayRemoved(reg *registry.Registration, cause registry.Cause) {
	err := relay.ErrHostGone
	if cause == registry.CauseShutdown {
		err = errShuttingDown
	}
	rt.relay.Removed(reg, err)
}

// SendFrame implements relay.Host.
func (c *conn) SendFrame(f *relay.Frame) bool {
	ok, start := c.queue.pushRelay(f)
	if start {
		go c.writeLoop()
	}
	return ok
}

// DropFrame implements relay.Host.
func (c *conn) DropFrame(f *relay.Frame) { c.queue.dropRelay(f) }

// Gone implements relay.Host.
func (c *conn) Gone() bool { return c.isGone() }
