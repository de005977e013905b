package router

import (
	"context"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/julienschmidt/httprouter"

	jsclient "wsrouter/client/js"
	"wsrouter/registry"
	"wsrouter/router/dashboard"
	"wsrouter/router/relay"
	"wsrouter/router/webhook"
)

// Router is wsrouter's HTTP and WebSocket edge. It implements http.Handler.
type Router struct {
	cfg      Config
	registry *registry.Registry
	log      *slog.Logger
	logs     *limitedLog // events a client can cause at will
	auth     authenticator
	hooks    *webhook.Client // webhook calls for every registration
	// hookAllow is -webhook-allow parsed; nil: webhooks are off.
	hookAllow *webhook.Allow
	mux       *httprouter.Router
	metrics   *metrics
	relay     *relay.Proxy
	limits    *limits
	tokens    *tokens
	watchers  watchers // the info streams
	// On a cluster node, the subscription to the other nodes' events,
	// held while there are watchers (followEvents).
	followMu  sync.Mutex
	following int    // guarded by followMu
	unfollow  func() // guarded by followMu

	baseCtx    context.Context // parent of every connection's context
	cancelBase context.CancelFunc

	mu           sync.Mutex
	shuttingDown bool           // guarded by mu
	conns        sync.WaitGroup // Add under mu while !shuttingDown
	closing      atomic.Bool    // mirrors shuttingDown for lock-free reads
	// draining turns /healthz and /register to 503 ahead of shutdown, so a
	// load balancer stops sending new work while members keep talking.
	draining atomic.Bool

	// onClose, if set (by tests, before serving), observes every
	// server-side close as noteClose counts it.
	onClose func(code int)
}

// New returns a router with an empty registry. A nil logger discards logs.
func New(cfg Config, log *slog.Logger) *Router {
	cfg.setDefaults()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := newMetrics()
	rt := &Router{cfg: cfg, log: log, logs: newLimitedLog(log), metrics: m}
	rt.auth = authenticator{rt}
	var err error
	if rt.tokens, err = newTokens(cfg.Tokens); err != nil {
		panic("router: " + err.Error()) // a Key that is not Ed25519: the caller's mistake
	}
	// main refuses a malformed -webhook-allow at start; here one would
	// simply turn webhooks off.
	rt.hookAllow, _ = webhook.ParseAllow(cfg.Webhooks.Allow)
	rt.hooks = webhook.New(webhook.Config{
		Allow: rt.hookAllow, Timeout: cfg.Webhooks.Timeout, Retries: cfg.Webhooks.Retries,
		MaxCalls: cfg.Webhooks.MaxCalls, Backoff: cfg.Webhooks.Backoff, Observe: m.webhookCall,
	})
	rt.relay = rt.newRelay()
	rt.limits = newLimits(&cfg, time.Now)
	regCfg := cfg.Registry
	// The router observes the registry's lifecycle first (metrics, logs,
	// the relay), then whoever configured observers of their own.
	regCfg.Observers = append([]registry.Observer{rt.observe}, regCfg.Observers...)
	onStoreError := regCfg.OnStoreError
	regCfg.OnStoreError = func(op, id string, err error) {
		rt.storeFailed(op, err)
		if onStoreError != nil {
			onStoreError(op, id, err)
		}
	}
	onKeyCheck := regCfg.OnKeyCheck
	regCfg.OnKeyCheck = func(how registry.KeyCheck, d time.Duration) {
		m.keyChecked(how, d)
		if onKeyCheck != nil {
			onKeyCheck(how, d)
		}
	}
	rt.registry = registry.New(regCfg)
	m.registerLive(rt.registry)
	if cfg.Cluster != nil {
		rt.clusterUp(cfg.Cluster)
	}
	rt.baseCtx, rt.cancelBase = context.WithCancel(context.Background())
	go rt.sweep()

	mux := httprouter.New()
	mux.HandleMethodNotAllowed = true
	mux.RedirectTrailingSlash = false
	mux.RedirectFixedPath = false
	mux.NotFound = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "not found", http.StatusNotFound)
	})
	// Browsers preflight a cross-origin request that carries X-Key or uses
	// DELETE; answer it so pages on other origins can use every endpoint.
	mux.GlobalOPTIONS = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Access-Control-Request-Method") != "" {
			h := w.Header()
			h.Set("Access-Control-Allow-Methods", h.Get("Allow"))
			h.Set("Access-Control-Allow-Headers", "X-Key, X-Host-Key, X-Token, Content-Type, Authorization")
			h.Set("Access-Control-Max-Age", "86400")
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.MethodNotAllowed = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// httprouter has already set Allow.
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	})
	for _, m := range []string{http.MethodGet, http.MethodPost} {
		mux.HandlerFunc(m, "/register", rt.serveRegister)
	}
	mux.HandlerFunc(http.MethodGet, "/connect", rt.serveConnect)
	for _, m := range []string{http.MethodGet, http.MethodPost, http.MethodDelete} {
		mux.HandlerFunc(m, "/remove", rt.serveRemove)
	}
	mux.HandlerFunc(http.MethodPost, "/token", rt.serveToken)
	mux.HandlerFunc(http.MethodPost, "/send", rt.serveSend)
	mux.HandlerFunc(http.MethodPost, "/publish", rt.servePublish)
	mux.HandlerFunc(http.MethodDelete, "/member", rt.serveCloseMember)
	mux.HandlerFunc(http.MethodGet, "/members", rt.serveMembers)
	mux.HandlerFunc(http.MethodGet, "/info", rt.serveInfo)
	mux.HandlerFunc(http.MethodGet, "/client.js", serveFile(jsclient.Source, "text/javascript; charset=utf-8"))
	mux.HandlerFunc(http.MethodGet, "/client.d.ts", serveFile(jsclient.Types, "application/typescript; charset=utf-8"))
	for _, p := range dashboard.Paths() {
		mux.Handler(http.MethodGet, p, dashboard.Handler())
	}
	mux.HandlerFunc(http.MethodGet, "/healthz", rt.serveHealth)
	mux.HandlerFunc(http.MethodHead, "/healthz", rt.serveHealth)
	mux.Handler(http.MethodGet, "/metrics", m.handler())
	if cfg.AdminToken != "" {
		mux.HandlerFunc(http.MethodGet, "/stats", rt.serveStats)
		if cfg.Backup != nil {
			mux.HandlerFunc(http.MethodGet, "/backup", rt.serveBackup)
		}
	}
	rt.mux = mux
	return rt
}

// serveFile answers with an embedded file: the JavaScript client, which pages
// of any origin may import (every answer carries the router's CORS header).
func serveFile(b []byte, typ string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", typ)
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("Cache-Control", "no-cache")
		w.Write(b)
	}
}

// ServeHTTP implements http.Handler.
func (rt *Router) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// Credentials are keys, not cookies, so any page may call us (docs/protocol.md §2).
	w.Header().Set("Access-Control-Allow-Origin", "*")
	if strings.HasPrefix(r.URL.Path, "/relay/") {
		// Any method, so not through httprouter's per-method table.
		rt.relay.ServeHTTP(w, r)
		return
	}
	rt.mux.ServeHTTP(w, r)
}

// Shutdown stops accepting members, closes every live one with 1001 and waits
// for their connections to end or ctx to expire, whichever is first. It
// exists because http.Server.Shutdown does not wait for hijacked
// connections.
func (rt *Router) Shutdown(ctx context.Context) error {
	rt.mu.Lock()
	rt.shuttingDown = true
	rt.closing.Store(true)
	rt.draining.Store(true)
	rt.mu.Unlock()

	rt.registry.Close(codeGoingAway, "server shutting down")
	rt.closeWatchers()

	done := make(chan struct{})
	go func() {
		rt.conns.Wait()
		close(done)
	}()
	select {
	case <-done:
		rt.cancelBase()
		return nil
	case <-ctx.Done():
		// Abort whatever is still running: reads fail, sockets close.
		rt.cancelBase()
		return ctx.Err()
	}
}

// sweep forgets idle rate-limit entries once a minute, and expired relay
// request ids every ten seconds, until the router shuts down, so that
// memory follows the live clients.
func (rt *Router) sweep() {
	limits := time.NewTicker(time.Minute)
	defer limits.Stop()
	relays := time.NewTicker(10 * time.Second)
	defer relays.Stop()
	for {
		select {
		case <-limits.C:
			rt.limits.sweep()
		case <-relays.C:
			rt.relay.Sweep()
		case <-rt.baseCtx.Done():
			return
		}
	}
}

// storeFailed logs (rate-limited) and counts a failure of the
// registrations' store: the disk behind -data, say.
func (rt *Router) storeFailed(op string, err error) {
	rt.metrics.storeFailed(op)
	rt.logs.error("store", "store failed", "op", op, "err", err)
}

// observe is the router's registry observer: metrics, logs, the relay.
func (rt *Router) observe(ev registry.Event) {
	rt.observeInfo(ev)
	switch ev.Kind {
	case registry.EventCreate:
		if ev.Restored {
			return // counted and logged in one line by whoever restores
		}
		rt.metrics.registered(ev.Reg.Type)
		rt.log.Info("registered", "reg", ev.Reg.ID, "type", ev.Reg.Type.String())
	case registry.EventRemove:
		rt.metrics.removedBy(ev.Cause)
		if ev.Cause != registry.CauseShutdown {
			rt.log.Info("removed", "reg", ev.Reg.ID, "cause", ev.Cause.String())
		}
		rt.relayRemoved(ev.Reg, ev.Cause)
	}
}

// Config returns the router's configuration with every default filled in.
func (rt *Router) Config() Config { return rt.cfg }

// Registry returns the router's registry.
func (rt *Router) Registry() *registry.Registry { return rt.registry }

// SetDraining turns /healthz and /register to 503 ahead of Shutdown
// (-drain-delay): members, connects and relays carry on until Shutdown.
func (rt *Router) SetDraining() { rt.draining.Store(true) }
