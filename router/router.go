package router

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/url"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/julienschmidt/httprouter"

	"wsrouter/registry"
)

// Config holds the router's limits and timeouts. The zero value of a field
// means the default documented on it.
type Config struct {
	// MaxMessage is the largest data message a member may send, in bytes;
	// 0 means 1 MiB. A larger one closes its sender with 1009.
	MaxMessage int64
	// SendQueueBytes bounds each member's send queue, in payload bytes plus
	// 64 per message; 0 means 4 MiB. It absorbs bursts from many senders; a
	// receiver that falls further behind is a slow consumer (4008). An
	// empty queue always takes one message, however large; keep it at
	// least twice MaxMessage so that a large message does not close a
	// receiver that merely has something queued. Relay request frames
	// are not counted against it.
	SendQueueBytes int
	// WriteTimeout bounds every write, close frames included; 0 means 10 s.
	WriteTimeout time.Duration
	// PingInterval is how often the server pings each member; 0 means 30 s,
	// negative disables pings.
	PingInterval time.Duration
	// PingTimeout is how long a ping may go unanswered; 0 means 30 s.
	PingTimeout time.Duration
	// AllowedOrigins lists the browser origins (host patterns as in
	// path.Match, e.g. "*.example.com") that may open WebSockets; empty
	// means any.
	AllowedOrigins []string
	// RelayTimeout is how long a relay request waits for its host's reply;
	// 0 means 10 s. Then the caller gets 504.
	RelayTimeout time.Duration
	// RelayMaxBody bounds a relayed request body and a reply body once
	// decoded, in bytes; 0 means 1 MiB.
	RelayMaxBody int64
	// RelayMaxPending bounds the relay requests waiting on one
	// registration; 0 means 100. Past it callers get 429.
	RelayMaxPending int
	// RelayQueueBytes bounds the relay request frames queued to one
	// device and not yet written, in bytes; 0 means 8 MiB (at least two
	// frames of RelayMaxBody). Past it callers get 503: the device does
	// not read fast enough. It is separate from SendQueueBytes, so relay
	// traffic never closes a device as a slow consumer.
	RelayQueueBytes int64
	// RelayMaxMemory bounds the bytes of relayed requests held in memory
	// by the whole process (bodies and their frames); 0 means 256 MiB.
	// Past it callers get 503.
	RelayMaxMemory int64
	// RateMessage bounds each member's frames per second, data and
	// control (ping) frames alike; a member over it is closed with 1008.
	// A zero Rate means no limit.
	RateMessage Limit
	// Per-client-IP rate limits (SPEC §8); a zero Rate turns one off.
	RateRegister, RateConnect, RateRelay Limit
	// RateBadKey is the failed-key bucket: each wrong key or host key on
	// /connect, /remove or /relay takes a token, and an address with none
	// left is refused (429) even with the right key until it refills.
	RateBadKey Limit
	// TrustProxy names a header set by a reverse proxy in front (e.g.
	// X-Forwarded-For) whose last address is the client IP; empty means the
	// socket's address.
	TrustProxy string
	// AdminToken enables /stats for requests bearing it; empty means no
	// /stats.
	AdminToken string
	// Registry configures the router's registry. Its Observers and
	// OnKeyCheck hook are called after the router's own.
	Registry registry.Config
}

// Limit is a token bucket: Rate tokens per second up to Burst. A zero Rate
// means no limit.
type Limit struct {
	Rate  float64
	Burst int
}

func (c *Config) setDefaults() {
	if c.MaxMessage <= 0 {
		c.MaxMessage = 1 << 20
	}
	if c.SendQueueBytes <= 0 {
		c.SendQueueBytes = 4 << 20
	}
	if c.WriteTimeout <= 0 {
		c.WriteTimeout = 10 * time.Second
	}
	if c.PingInterval == 0 {
		c.PingInterval = 30 * time.Second
	}
	if c.PingTimeout <= 0 {
		c.PingTimeout = 30 * time.Second
	}
	if c.RelayTimeout <= 0 {
		c.RelayTimeout = 10 * time.Second
	}
	if c.RelayMaxBody <= 0 {
		c.RelayMaxBody = 1 << 20
	}
	if c.RelayMaxPending <= 0 {
		c.RelayMaxPending = 100
	}
	if c.RelayQueueBytes <= 0 {
		c.RelayQueueBytes = max(8<<20, 3*c.RelayMaxBody)
	}
	if c.RelayMaxMemory <= 0 {
		c.RelayMaxMemory = 256 << 20
	}
}

// Router is wsrouter's HTTP and WebSocket edge. It implements http.Handler.
type Router struct {
	cfg     Config
	reg     *registry.Registry
	log     *slog.Logger
	logs    *limitedLog // events a client can cause at will
	mux     *httprouter.Router
	metrics *metrics
	relay   *relay
	limits  *limits

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
	rt.relay = &relay{rt: rt, now: time.Now}
	rt.limits = newLimits(&cfg, time.Now)
	regCfg := cfg.Registry
	// The router observes the registry's lifecycle first (metrics, logs,
	// the relay), then whoever configured observers of their own.
	regCfg.Observers = append([]registry.Observer{rt.observe}, regCfg.Observers...)
	onKeyCheck := regCfg.OnKeyCheck
	regCfg.OnKeyCheck = func(how registry.KeyCheck, d time.Duration) {
		m.keyChecked(how, d)
		if onKeyCheck != nil {
			onKeyCheck(how, d)
		}
	}
	rt.reg = registry.New(regCfg)
	m.registerLive(rt.reg)
	rt.baseCtx, rt.cancelBase = context.WithCancel(context.Background())
	go rt.sweepLimits()

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
			h.Set("Access-Control-Allow-Headers", "X-Key, X-Host-Key, Content-Type, Authorization")
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
	mux.HandlerFunc(http.MethodGet, "/healthz", rt.serveHealth)
	mux.HandlerFunc(http.MethodHead, "/healthz", rt.serveHealth)
	mux.Handler(http.MethodGet, "/metrics", m.handler())
	if cfg.AdminToken != "" {
		mux.HandlerFunc(http.MethodGet, "/stats", rt.serveStats)
	}
	rt.mux = mux
	return rt
}

// ServeHTTP implements http.Handler.
func (rt *Router) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// Credentials are keys, not cookies, so any page may call us (SPEC §2).
	w.Header().Set("Access-Control-Allow-Origin", "*")
	if strings.HasPrefix(r.URL.Path, "/relay/") {
		// Any method, so not through httprouter's per-method table.
		rt.relay.ServeHTTP(w, r)
		return
	}
	rt.mux.ServeHTTP(w, r)
}

func (rt *Router) serveHealth(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if rt.draining.Load() {
		w.WriteHeader(http.StatusServiceUnavailable)
		w.Write([]byte("shutting down"))
		return
	}
	w.Write([]byte("ok"))
}

func (rt *Router) serveRegister(w http.ResponseWriter, r *http.Request) {
	if err := rt.register(w, r); err != nil {
		rt.refuse(w, "register", err)
	}
}

func (rt *Router) register(w http.ResponseWriter, r *http.Request) error {
	if rt.draining.Load() {
		return errShuttingDown
	}
	if err := rt.allow(rt.limits.register, "register", r); err != nil {
		return err
	}
	p, err := readParams(w, r)
	if err != nil {
		return err
	}
	key, err := p.key("key", "X-Key")
	if err != nil {
		return err
	}
	hostKey, err := p.key("host_key", "X-Host-Key")
	if err != nil {
		return err
	}
	typ, err := p.regType()
	if err != nil {
		return err
	}
	idReq, err := p.id("id_req", false)
	if err != nil {
		return err
	}
	reg, err := rt.reg.Create(r.Context(), registry.Spec{ID: idReq, Type: typ, Key: key, HostKey: hostKey})
	if err != nil {
		return err
	}

	if acceptsJSON(r) {
		w.Header().Set("Content-Type", "application/json")
		return json.NewEncoder(w).Encode(struct {
			ID      string `json:"id"`
			RegType string `json:"reg_type"`
		}{reg.ID, typ.String()})
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, err = w.Write([]byte(reg.ID))
	return err
}

func acceptsJSON(r *http.Request) bool {
	for _, v := range r.Header.Values("Accept") {
		for part := range strings.SplitSeq(v, ",") {
			mt, _, _ := strings.Cut(part, ";")
			if strings.EqualFold(strings.TrimSpace(mt), "application/json") {
				return true
			}
		}
	}
	return false
}

func (rt *Router) serveRemove(w http.ResponseWriter, r *http.Request) {
	if err := rt.remove(w, r); err != nil {
		rt.refuse(w, "remove", err)
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (rt *Router) remove(w http.ResponseWriter, r *http.Request) error {
	p, err := readParams(w, r)
	if err != nil {
		return err
	}
	id, err := p.id("id", true)
	if err != nil {
		return err
	}
	key, err := p.key("key", "X-Key")
	if err != nil {
		return err
	}
	hostKey, err := p.key("host_key", "X-Host-Key")
	if err != nil {
		return err
	}
	reg, err := rt.reg.Get(id)
	if err != nil {
		return err
	}
	g := rt.keyGuard(r, "remove")
	if err := g.lockout(); err != nil {
		return err
	}
	// Both keys are checked with bcrypt every time, so neither the time
	// taken nor a later request tells which one was wrong.
	wrong, err := reg.CheckKeys(r.Context(), key, hostKey, g.gate)
	if wrong > 0 {
		g.failed(reg.ID, wrong-1)
	}
	if err != nil {
		return err
	}
	return reg.Remove(r.Context())
}

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
	// receives every message sent after that (SPEC §4); they wait in its
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
		close(c.gone)
		if c.role == registry.RoleHost {
			rt.relay.hostLeft(c) // a relay may have picked it meanwhile
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
		c.reg.Leave(c, c.serve(ws, cw.wc))
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
	key, err := p.key("key", "X-Key")
	if err != nil {
		return nil, err
	}
	if !isUpgrade(r) {
		return nil, errNotUpgrade
	}
	if !rt.originAllowed(r) {
		return nil, errOrigin
	}
	reg, err := rt.reg.Get(id)
	if err != nil {
		return nil, err
	}
	role, err := p.role(reg.Type)
	if err != nil {
		return nil, err
	}
	if err := rt.checkKey(r, "connect", reg, key); err != nil {
		return nil, err
	}

	rt.mu.Lock()
	if rt.shuttingDown {
		rt.mu.Unlock()
		return nil, errShuttingDown
	}
	rt.conns.Add(1)
	rt.mu.Unlock()

	c := rt.newConn(reg, role)
	if err := reg.Join(c, role); err != nil {
		rt.conns.Done()
		if rt.closing.Load() {
			// Shutdown removed the registration meanwhile: that is a
			// 503, not an unknown id.
			return nil, errShuttingDown
		}
		return nil, err
	}
	return c, nil
}

// checkKey checks a member key under the failed-key lockout.
func (rt *Router) checkKey(r *http.Request, endpoint string, reg *registry.Registration, key string) error {
	g := rt.keyGuard(r, endpoint)
	if err := g.lockout(); err != nil {
		return err
	}
	err := reg.CheckKey(r.Context(), key, g.gate)
	if errors.Is(err, registry.ErrForbidden) {
		g.failed(reg.ID, 0)
	}
	return err
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

	rt.reg.Close(codeGoingAway, "server shutting down")

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

// sweepLimits forgets idle rate-limit entries once a minute until the router
// shuts down, so a limiter's memory follows its live clients.
func (rt *Router) sweepLimits() {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			rt.limits.sweep()
		case <-rt.baseCtx.Done():
			return
		}
	}
}

// refuse answers a refused request with its status and counts it by endpoint
// and status (SPEC §8: every refusal is counted).
func (rt *Router) refuse(w http.ResponseWriter, endpoint string, err error) {
	code, _ := status(err)
	rt.metrics.refused(endpoint, code)
	writeError(w, err)
}

// observe is the router's registry observer: metrics, logs, the relay.
func (rt *Router) observe(ev registry.Event) {
	switch ev.Kind {
	case registry.EventCreate:
		rt.metrics.registered(ev.Reg.Type)
		rt.log.Info("registered", "reg", ev.Reg.ID, "type", ev.Reg.Type.String())
	case registry.EventRemove:
		rt.metrics.removedBy(ev.Cause)
		if ev.Cause != registry.CauseShutdown {
			rt.log.Info("removed", "reg", ev.Reg.ID, "cause", ev.Cause.String())
		}
		rt.relay.removed(ev.Reg, ev.Cause)
	}
}

// Config returns the router's configuration with every default filled in.
func (rt *Router) Config() Config { return rt.cfg }

// Registry returns the router's registry.
func (rt *Router) Registry() *registry.Registry { return rt.reg }

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

// SetDraining turns /healthz and /register to 503 ahead of Shutdown
// (-drain-delay): members, connects and relays carry on until Shutdown.
func (rt *Router) SetDraining() { rt.draining.Store(true) }
