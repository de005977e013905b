// Command wsrouter is a self-hosted WebSocket router: programs on different
// private networks reach each other through rooms on one server they all dial
// out to. docs/protocol.md describes the protocol, docs/operations.md every
// flag; README.md is the place to start.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"wsrouter/registry"
	"wsrouter/registry/boltstore"
	"wsrouter/registry/cluster"
	"wsrouter/router"
	"wsrouter/router/relay"
	"wsrouter/router/token"
	"wsrouter/router/webhook"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// The first signal starts the graceful shutdown (drain, then close);
	// a second one ends the process at once, as the default action does.
	context.AfterFunc(ctx, stop)
	code := exitCode(run(ctx, os.Args[1:], os.Stdout, os.Stderr), os.Stderr)
	stop()
	os.Exit(code)
}

// exitCode reports run's error on stderr, unless run has already done so
// (a bad command line), and returns the process's exit status: 0, 1 for an
// error, 2 for a bad command line, as the flag package's own ExitOnError.
func exitCode(err error, stderr io.Writer) int {
	var ue usageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ue):
		return 2
	}
	fmt.Fprintln(stderr, "wsrouter:", err)
	return 1
}

// usageError is a command line the flag package could not parse. run has
// written it to stderr, with a hint, by the time it returns one.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// about is the first line of -h.
const about = "wsrouter is a self-hosted WebSocket router: programs that cannot reach each other dial out to it and meet in rooms."

// options are the command-line flags, each also read from WSROUTER_<FLAG>.
type options struct {
	addr            string
	logFormat       string
	logLevel        string
	shutdownTimeout time.Duration
	drainDelay      time.Duration
	debugAddr       string
	version         bool
	data            string // -data: the registrations' file; "" keeps them in memory
	tokenKey        string // -token-key: PEM file of the router's Ed25519 key
	tokenIssuerKeys string // -token-issuer-keys: PEM and/or JWKS file of an issuer's keys
	nats            string // -nats: NATS servers; "" is a single node
	natsCreds       string // -nats-creds: their credentials file
	cluster         string // -cluster: the cluster's name

	router  router.Config // router.Registry holds the registry's flags
	origins string

	tls tlsOptions
}

// parseFlags reads the command line, then the environment. -h prints the
// usage to stdout and returns flag.ErrHelp; a command line the flag package
// cannot parse is a usageError, with nothing printed.
func parseFlags(args []string, stdout io.Writer) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("wsrouter", flag.ContinueOnError)
	fs.Usage = func() {
		w := fs.Output()
		fmt.Fprintln(w, about)
		fmt.Fprintln(w, "Every flag can also be set by the environment variable WSROUTER_<FLAG> (upper case, - as _: WSROUTER_ADDR, WSROUTER_GC_GRACE); the command line wins.")
		fmt.Fprintln(w, "\nUsage: wsrouter [flags]")
		fs.PrintDefaults()
	}
	fs.StringVar(&o.addr, "addr", ":8741", "listen address")
	fs.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.StringVar(&o.debugAddr, "debug-addr", "", "listen address for Go's pprof profiles at /debug/pprof/ (empty: off; keep it on loopback)")
	fs.DurationVar(&o.shutdownTimeout, "shutdown-timeout", 10*time.Second, "how long a graceful shutdown may take once members are being closed")
	fs.DurationVar(&o.drainDelay, "drain-delay", 0, "on SIGINT/SIGTERM, keep serving this long with /healthz and /register answering 503 before closing members, so a load balancer can take this instance out first (0: close at once)")
	fs.BoolVar(&o.version, "version", false, "print the version and exit (not read from the environment)")
	fs.StringVar(&o.data, "data", "wsrouter.db", `file that keeps registrations across restarts (one process per file; "": memory only; not with -nats)`)
	fs.StringVar(&o.nats, "nats", "", "comma list of NATS servers (with JetStream) that make this node one of a cluster sharing its registrations (empty: a single node)")
	fs.StringVar(&o.natsCreds, "nats-creds", "", "NATS credentials file, if the servers want one")
	fs.StringVar(&o.cluster, "cluster", "wsrouter", "the cluster's name: its key-value bucket and subjects in NATS; nodes with the same -nats and -cluster are one router")

	rc, gc := &o.router, &o.router.Registry
	fs.Int64Var(&rc.MaxMessage, "max-message", 1<<20, "largest data message in bytes; a larger one closes its sender with 1009")
	fs.IntVar(&rc.SendQueueBytes, "send-queue-bytes", 4<<20, "send queue bound per member, in bytes (payload + 64 per message); overflow closes it with 4008")
	fs.DurationVar(&rc.WriteTimeout, "write-timeout", 10*time.Second, "deadline for every write, close frames included")
	fs.DurationVar(&rc.PingInterval, "ping-interval", 30*time.Second, "how often the server pings each member (negative: never)")
	fs.DurationVar(&rc.PingTimeout, "ping-timeout", 30*time.Second, "how long a ping may go unanswered before the member is dropped")
	fs.DurationVar(&rc.RelayTimeout, "relay-timeout", 10*time.Second, "how long a relay request waits for the device's reply (then 504)")
	fs.Int64Var(&rc.RelayMaxBody, "relay-max-body", 1<<20, "largest relayed request body, and reply body once decoded, in bytes (then 413 / 502)")
	fs.IntVar(&rc.RelayMaxPending, "relay-max-pending", 100, "most relay requests waiting on one registration (then 429)")
	fs.Int64Var(&rc.RelayQueueBytes, "relay-queue-bytes", 0, "relay request bytes queued to one device and not yet written, then 503 (0: 8 MiB or 3 × -relay-max-body, whichever is larger)")
	fs.Int64Var(&rc.RelayMaxMemory, "relay-max-memory", 256<<20, "relay request bytes held in memory by the whole process (then 503)")
	limit := func(l *router.Limit, name string, rate float64, burst int, what string) {
		fs.Float64Var(&l.Rate, "rate-"+name, rate, what+" (0: no limit)")
		fs.IntVar(&l.Burst, "burst-"+name, burst, "burst for -rate-"+name)
	}
	limit(&rc.RateRegister, "register", 2, 20, "registrations per second per client IP")
	limit(&rc.RateConnect, "connect", 10, 50, "connects per second per client IP")
	limit(&rc.RateRelay, "relay", 20, 100, "relay requests per second per client IP")
	limit(&rc.RateBadKey, "badkey", 0.2, 10, "failed key checks allowed per second per client IP")
	limit(&rc.RateMessage, "message", 1000, 2000, "frames (data and ping) per second per member; past it the member is closed with 1008")
	fs.StringVar(&rc.TrustProxy, "trust-proxy", "", "header set by a reverse proxy in front whose last address is the client IP, e.g. X-Forwarded-For (empty: the socket's address)")
	wc := &rc.Webhooks
	fs.StringVar(&wc.Allow, "webhook-allow", "", "comma list of host patterns (hooks.example.com, *.example.com), IPs and CIDRs that registrations' webhooks may call; a webhook's every resolved address must be public or listed (empty: webhooks off)")
	fs.DurationVar(&wc.Timeout, "webhook-timeout", 5*time.Second, "bound on each webhook call")
	fs.IntVar(&wc.Retries, "webhook-retries", 5, "retries of a failed message or close event, with backoff (negative: none)")
	fs.IntVar(&wc.Queue, "webhook-queue", 64, "message events of one connection that may wait before its reader stops reading")
	fs.StringVar(&o.tokenKey, "token-key", "", "PEM file (PKCS#8) of the Ed25519 key that signs the tokens POST /token mints (empty: one generated once and kept in -data; with -data \"\" it dies with the process)")
	fs.DurationVar(&rc.Tokens.MaxTTL, "token-max-ttl", 720*time.Hour, "longest ttl POST /token grants")
	fs.StringVar(&o.tokenIssuerKeys, "token-issuer-keys", "", "file of PEM public keys and/or a JWKS document whose keys may sign tokens too (EdDSA, ES256, RS256); reloaded on SIGHUP (empty: none)")
	fs.StringVar(&rc.AdminToken, "admin-token", "", "bearer token that enables /stats (empty: no /stats)")
	fs.StringVar(&o.origins, "allowed-origins", "", "comma-separated browser origin host patterns allowed to connect (empty: any)")

	fs.IntVar(&gc.BcryptCost, "bcrypt-cost", 10, "bcrypt cost for keys")
	fs.IntVar(&gc.MaxRegistrations, "max-registrations", 10000, "most live registrations (0: no cap)")
	fs.IntVar(&gc.MaxMembers, "max-members", 1000, "most members per registration (0: no cap)")
	fs.IntVar(&gc.MaxSubscriptions, "max-subscriptions", 100, "most subscriptions per member of a pubsub registration (0: no cap)")
	fs.DurationVar(&gc.GCGrace, "gc-grace", 30*time.Second, "how long an emptied registration lives on (0: remove at once)")
	fs.DurationVar(&gc.UnusedTTL, "unused-ttl", 10*time.Minute, "remove a registration nobody joined after this long (0: never)")

	tc := &o.tls
	var acmeDomains string
	fs.StringVar(&tc.certFile, "tls-cert", "", "PEM certificate chain; with -tls-key, serve HTTPS on -addr (empty: no TLS from files)")
	fs.StringVar(&tc.keyFile, "tls-key", "", "PEM private key of -tls-cert")
	fs.StringVar(&acmeDomains, "acme-domains", "", "comma-separated domains to get certificates for from an ACME CA and serve HTTPS for on -addr; no other name is served (empty: no ACME)")
	fs.StringVar(&tc.acmeEmail, "acme-email", "", "contact address given to the ACME CA for expiry and account notices (empty: none)")
	fs.StringVar(&tc.acmeDirectory, "acme-directory", letsEncrypt, "ACME directory URL of the CA")
	fs.StringVar(&tc.acmeCache, "acme-cache", "certs/acme", "directory that keeps the ACME account key and certificates across restarts")
	fs.StringVar(&tc.acmeCARoots, "acme-ca-roots", "", "PEM file of the only roots trusted when talking to -acme-directory, for a private or test CA (empty: the system's roots)")
	fs.StringVar(&tc.httpAddr, "http-addr", "", "plain-HTTP listen address that answers ACME HTTP-01 challenges and redirects GET and HEAD without credentials to https (empty: :80 with -acme-domains, else none; off: none)")

	// The flag package would print the error and the whole usage to the
	// output; run prints the error and a one-line hint instead.
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	fs.SetOutput(stdout)
	switch {
	case errors.Is(err, flag.ErrHelp):
		fs.Usage()
		return nil, err
	case err != nil:
		return nil, usageError{err}
	case fs.NArg() > 0:
		return nil, usageError{fmt.Errorf("unexpected arguments: %q", fs.Args())}
	case o.version:
		// Before the environment, whose mistakes must not hide the version.
		return o, nil
	}
	if err := applyEnv(fs); err != nil {
		return nil, err
	}
	if err := tc.resolve(fs, acmeDomains); err != nil {
		return nil, err
	}
	if o.origins != "" {
		for p := range strings.SplitSeq(o.origins, ",") {
			if p = strings.TrimSpace(p); p != "" {
				rc.AllowedOrigins = append(rc.AllowedOrigins, p)
			}
		}
	}
	if gc.BcryptCost < 4 || gc.BcryptCost > 31 {
		return nil, fmt.Errorf("-bcrypt-cost %d: want 4 to 31", gc.BcryptCost)
	}
	if rc.MaxMessage <= 0 {
		return nil, fmt.Errorf("-max-message %d: want a positive size", rc.MaxMessage)
	}
	if body := max(rc.RelayMaxBody, 0); rc.RelayMaxMemory != 0 && rc.RelayMaxMemory < 4*max(body, 1) {
		// A relayed request holds its body and then its frame: below four
		// bodies' worth, a client could not have one large request
		// pending while sending the next.
		return nil, fmt.Errorf("-relay-max-memory %d: want 0 (the default) or at least 4 × -relay-max-body", rc.RelayMaxMemory)
	}
	if _, err := webhook.ParseAllow(rc.Webhooks.Allow); err != nil {
		return nil, err
	}
	if o.drainDelay < 0 {
		return nil, fmt.Errorf("-drain-delay %v: want 0 or more", o.drainDelay)
	}
	if rc.Tokens.MaxTTL <= 0 {
		return nil, fmt.Errorf("-token-max-ttl %v: want a positive duration", rc.Tokens.MaxTTL)
	}
	if !cluster.ValidName(o.cluster) {
		return nil, fmt.Errorf("-cluster %q: want 1 to 64 of A-Z a-z 0-9 _ -", o.cluster)
	}
	if o.nats != "" {
		dataSet := false
		fs.Visit(func(f *flag.Flag) { dataSet = dataSet || f.Name == "data" && o.data != "" })
		if dataSet {
			return nil, errors.New("-data with -nats: a cluster node keeps no data file, its registrations live in NATS")
		}
		o.data = ""
	}
	return o, nil
}

// applyEnv sets every flag not given on the command line from its
// WSROUTER_<FLAG> environment variable, so the command line wins.
func applyEnv(fs *flag.FlagSet) error {
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		// -version is an action, not a setting.
		if given[f.Name] || err != nil || f.Name == "version" {
			return
		}
		name := "WSROUTER_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(name); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s: %w", name, e)
			}
		}
	})
	return err
}

func newLogger(format, level string, w io.Writer) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("-log-level %q: %w", level, err)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		// slog's JSON handler writes a duration as integer nanoseconds;
		// "10s" is what the flags take and what a reader expects.
		opts.ReplaceAttr = func(_ []string, a slog.Attr) slog.Attr {
			if a.Value.Kind() == slog.KindDuration {
				a.Value = slog.StringValue(a.Value.Duration().String())
			}
			return a
		}
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("-log-format %q: want text or json", format)
}

// debugHandler serves the pprof profiles, on a listener of their own so they
// are never reachable through the public address.
func debugHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// listen opens the program's listeners. Tests replace it to make serving
// fail.
var listen = net.Listen

// run is the whole program. It serves until ctx is done, then shuts down
// gracefully: first -drain-delay with /healthz and /register answering 503,
// then members closed with 1001 within -shutdown-timeout. -h and -version
// write to stdout; logs, and a bad command line, go to stderr.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "backup" {
		return runBackup(args[1:], stdout, stderr)
	}
	o, err := parseFlags(args, stdout)
	var ue usageError
	switch {
	case errors.Is(err, flag.ErrHelp):
		return nil
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "wsrouter: %v\nrun 'wsrouter -h' for the flags\n", err)
		return err
	case err != nil:
		return err
	case o.version:
		fmt.Fprintln(stdout, readBuildInfo())
		return nil
	}
	log, err := newLogger(o.logFormat, o.logLevel, stderr)
	if err != nil {
		return err
	}
	// SIGHUP reloads the issuer's keys. It is caught from here on, whether
	// or not there are any, so that a stray HUP never ends the process,
	// not even while a large data file loads; one that arrives before the
	// router exists waits in the channel.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	tlsConf, plainHTTP, err := o.tls.load(log)
	if err != nil {
		return err
	}

	// Serve closes its listener; these closes are for the early returns.
	ln, err := listen("tcp", o.addr)
	if err != nil {
		return err
	}
	defer ln.Close()
	var hln, dln net.Listener
	if o.tls.httpAddr != "" {
		if hln, err = listen("tcp", o.tls.httpAddr); err != nil {
			return err
		}
		defer hln.Close()
	}
	if o.debugAddr != "" {
		if dln, err = listen("tcp", o.debugAddr); err != nil {
			return err
		}
		defer dln.Close()
	}

	// Registrations that outlive the process: the file is opened (and
	// locked) before anything is served, and read once.
	var recs []registry.Record
	var keeper secretKeeper // where a generated token key is kept
	if o.data != "" {
		store, err := boltstore.Open(o.data)
		if err != nil {
			return err
		}
		defer store.Close()
		start := time.Now()
		if recs, err = store.Load(ctx); err != nil {
			return err
		}
		o.router.Registry.Store = store
		o.router.Backup = func() (io.ReadCloser, int64, error) { return store.Snapshot() }
		log.Info("data file opened", "path", o.data, "registrations", len(recs), "took", time.Since(start))
		keeper = store
	}
	var node *cluster.Node
	if o.nats != "" {
		if node, err = o.joinCluster(ctx, log); err != nil {
			return err
		}
		defer node.Close()
		keeper = node
	}
	if err := o.loadTokenKeys(keeper, log); err != nil {
		return err
	}
	rt := router.New(o.router, log)
	go func() {
		for {
			select {
			case <-hup:
				o.reloadIssuerKeys(rt, log)
			case <-ctx.Done():
				return
			}
		}
	}()
	if err := restore(rt.Registry(), recs, log); err != nil {
		return err
	}
	if node != nil {
		start := time.Now()
		if err := node.Start(ctx, rt.Registry()); err != nil {
			return fmt.Errorf("cluster: %w", err)
		}
		log.Info("cluster joined", "cluster", o.cluster, "node", node.ID(), "registrations", rt.Registry().Len(), "took", time.Since(start))
	}
	newServer := func(h http.Handler) *http.Server {
		return &http.Server{
			Handler:           h,
			ReadHeaderTimeout: 10 * time.Second,
			// Bounds reading a whole request, body included, so a
			// client cannot hold a connection by trickling a form or a
			// relay body. net/http clears it on the WebSocket upgrade.
			ReadTimeout:    30 * time.Second,
			IdleTimeout:    2 * time.Minute,
			MaxHeaderBytes: 64 << 10,
			// Per-connection noise (scanners' TLS handshakes, clients
			// that hang up) at debug; failing accepts are logged at warn
			// by acceptLog.
			ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		}
	}
	srv := newServer(rt)
	srv.TLSConfig = tlsConf
	// -http-addr: ACME HTTP-01 challenges, and a redirect to https for
	// everything else. Nothing there reaches the router, which is served
	// over TLS only.
	var hsrv *http.Server
	if hln != nil {
		_, httpsPort, _ := net.SplitHostPort(ln.Addr().String())
		hsrv = newServer(plainHTTP(redirectHTTPS(httpsPort)))
	}
	mode, scheme := "off", "http"
	switch {
	case len(o.tls.acmeDomains) > 0:
		mode, scheme = "acme", "https"
	case tlsConf != nil:
		mode, scheme = "files", "https"
	}
	build := readBuildInfo()
	log.Info("listening", "url", scheme+"://"+ln.Addr().String(), "addr", ln.Addr().String(), "tls", mode,
		build.attrs(), limitAttrs(rt.Config(), o))
	if hsrv != nil {
		log.Info("redirecting http to https", "addr", hln.Addr().String(), "acme_http01", mode == "acme")
	}
	if dln != nil {
		dsrv := newServer(debugHandler())
		go dsrv.Serve(newAcceptLog(dln, log.With("listener", "debug")))
		defer dsrv.Close()
		log.Info("debug listening", "addr", dln.Addr().String())
	}

	serveErr := make(chan error, 2)
	go func() {
		ln := newAcceptLog(ln, log)
		if tlsConf != nil {
			// The certificate comes from srv.TLSConfig; ServeTLS also
			// sets up HTTP/2 for plain requests (WebSockets stay on
			// HTTP/1.1: net/http offers no extended CONNECT by default).
			serveErr <- srv.ServeTLS(ln, "", "")
			return
		}
		serveErr <- srv.Serve(ln)
	}()
	if hsrv != nil {
		go func() { serveErr <- hsrv.Serve(newAcceptLog(hln, log.With("listener", "http"))) }()
	}

	// Serve returns before Shutdown only when it fails; then the members
	// still get their 1001 and the router's timers stop, as on a signal.
	var failed error
	select {
	case failed = <-serveErr:
	case <-ctx.Done():
		if o.drainDelay > 0 {
			// Members, connects and relays carry on; /healthz and
			// /register answer 503 so that a load balancer stops
			// sending new work here before anyone is cut off.
			// Draining first, then the line that says so: whoever reads
			// the line finds the router draining.
			rt.SetDraining()
			log.Info("draining", "delay", o.drainDelay)
			t := time.NewTimer(o.drainDelay)
			select {
			case <-t.C:
			case failed = <-serveErr:
				t.Stop()
			}
		}
	}
	if failed != nil {
		log.Error("serving failed", "err", failed)
	}

	log.Info("shutting down", "timeout", o.shutdownTimeout)
	rt.SetDraining()
	sctx, cancel := context.WithTimeout(context.Background(), o.shutdownTimeout)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.Shutdown(sctx) }()
	hdone := make(chan error, 1)
	if hsrv != nil {
		go func() { hdone <- hsrv.Shutdown(sctx) }()
	} else {
		hdone <- nil
	}
	errRouter := rt.Shutdown(sctx)
	errServer := errors.Join(<-done, <-hdone)
	if errRouter != nil || errServer != nil {
		// Out of time: whatever is left is cut off. Still a clean exit
		// (status 0), as the README's Shutdown section promises.
		srv.Close()
		if hsrv != nil {
			hsrv.Close()
		}
		log.Warn("shutdown timed out; remaining connections dropped")
	}
	log.Info("stopped")
	return failed
}

// buildInfo says which build is running, from what the go command recorded
// in the binary.
type buildInfo struct {
	version   string // the main module's version; "(devel)" when unknown
	revision  string // vcs.revision; empty when not recorded
	modified  string // vcs.modified ("true" or "false"); empty when not recorded
	goVersion string
}

func readBuildInfo() buildInfo {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return buildInfo{version: "(devel)", goVersion: runtime.Version()}
	}
	return buildInfoOf(bi)
}

func buildInfoOf(bi *debug.BuildInfo) buildInfo {
	b := buildInfo{version: bi.Main.Version, goVersion: bi.GoVersion}
	if b.version == "" {
		b.version = "(devel)"
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			b.revision = s.Value
		case "vcs.modified":
			b.modified = s.Value
		}
	}
	return b
}

// String is the -version line, e.g.
// "wsrouter (devel) vcs.revision=3f88e05… vcs.modified=true go1.26.8".
func (b buildInfo) String() string {
	s := "wsrouter " + b.version
	if b.revision != "" {
		s += " vcs.revision=" + b.revision
	}
	if b.modified != "" {
		s += " vcs.modified=" + b.modified
	}
	if b.goVersion != "" {
		s += " " + b.goVersion
	}
	return s
}

// attrs are the build's log attributes, the recorded ones only.
func (b buildInfo) attrs() slog.Attr {
	as := []any{"version", b.version}
	if b.revision != "" {
		as = append(as, "vcs.revision", b.revision)
	}
	if b.modified != "" {
		as = append(as, "vcs.modified", b.modified == "true")
	}
	return slog.Group("build", append(as, "go", b.goVersion)...)
}

// joinCluster connects to -nats and makes the node the router's store and
// broker. Messages and relay bodies must fit in one NATS message: larger
// limits are lowered to what the servers take, and the log says so.
func (o *options) joinCluster(ctx context.Context, log *slog.Logger) (*cluster.Node, error) {
	node, err := cluster.Dial(ctx, cluster.Config{URLs: o.nats, Creds: o.natsCreds, Name: o.cluster, Log: log})
	if err != nil {
		return nil, err
	}
	rc := &o.router
	max := node.MaxPayload()
	if rc.MaxMessage+clusterHeader > max {
		rc.MaxMessage = max - clusterHeader
		log.Info("-max-message lowered to fit NATS's max_payload", "max_message", rc.MaxMessage, "max_payload", max)
	}
	if body := rc.RelayMaxBody; body <= 0 || body+clusterRelayHeader > max {
		if body <= 0 {
			body = relay.DefaultMaxBody
		}
		if body+clusterRelayHeader > max {
			rc.RelayMaxBody = max - clusterRelayHeader
			log.Info("-relay-max-body lowered to fit NATS's max_payload", "relay_max_body", rc.RelayMaxBody, "max_payload", max)
		}
	}
	rc.Registry.Store, rc.Registry.Broker, rc.Cluster = node, node, node
	return node, nil
}

// What a message and a relay request add to their payload between nodes:
// the message's header and event; the request's JSON, base64 body and
// headers.
const (
	clusterHeader      = 1 << 10
	clusterRelayHeader = 64 << 10
)

// secretKeeper keeps a secret made once with the data: the file store does.
type secretKeeper interface {
	Secret(name string, create func() ([]byte, error)) ([]byte, error)
}

// loadTokenKeys sets the router's token key, from -token-key, or kept with
// the data, or generated for this process only; and the issuer's keys from
// -token-issuer-keys, which must load at start.
func (o *options) loadTokenKeys(keeper secretKeeper, log *slog.Logger) error {
	tc := &o.router.Tokens
	switch {
	case o.tokenKey != "":
		b, err := os.ReadFile(o.tokenKey)
		if err != nil {
			return fmt.Errorf("-token-key: %w", err)
		}
		if tc.Key, err = token.ParsePrivateKey(b); err != nil {
			return fmt.Errorf("-token-key %s: %w", o.tokenKey, err)
		}
	case keeper != nil:
		where := o.data
		if o.nats != "" {
			where = "NATS bucket " + o.cluster
		}
		der, err := keeper.Secret("token-key", func() ([]byte, error) {
			log.Info("token key generated", "kept_in", where)
			return token.MarshalPKCS8(token.GenerateKey()), nil
		})
		if err != nil {
			return fmt.Errorf("token key: %w", err)
		}
		if tc.Key, err = token.ParsePKCS8(der); err != nil {
			return fmt.Errorf("token key in %s: %w", where, err)
		}
	default:
		tc.Key = token.GenerateKey()
		log.Info("token key generated for this process only: its tokens stop working at restart (set -data or -token-key)")
	}
	if o.tokenIssuerKeys != "" {
		ks, err := token.LoadKeys(o.tokenIssuerKeys)
		if err != nil {
			return fmt.Errorf("-token-issuer-keys: %w", err)
		}
		tc.Issuers = ks
		log.Info("token issuer keys loaded", "path", o.tokenIssuerKeys, "keys", ks.Len())
	}
	return nil
}

// reloadIssuerKeys reads -token-issuer-keys again (SIGHUP). A file that
// does not load leaves the old keys in place.
func (o *options) reloadIssuerKeys(rt *router.Router, log *slog.Logger) {
	if o.tokenIssuerKeys == "" {
		log.Info("SIGHUP: no -token-issuer-keys to reload")
		return
	}
	ks, err := token.LoadKeys(o.tokenIssuerKeys)
	if err != nil {
		log.Error("token issuer keys not reloaded: keeping the old ones", "path", o.tokenIssuerKeys, "err", err)
		return
	}
	closed := rt.SetTokenIssuers(ks)
	log.Info("token issuer keys reloaded", "path", o.tokenIssuerKeys, "keys", ks.Len(), "members_closed", closed)
}

// restoreChunk is how many registrations restore makes live between two
// progress lines.
const restoreChunk = 50000

// restore makes the stored registrations live again, each as never joined
// (removed after -unused-ttl unless someone joins), with a progress line
// per restoreChunk for a large store.
func restore(reg *registry.Registry, recs []registry.Record, log *slog.Logger) error {
	if len(recs) == 0 {
		return nil
	}
	start := time.Now()
	for i := 0; i < len(recs); i += restoreChunk {
		if err := reg.Restore(recs[i:min(i+restoreChunk, len(recs))]); err != nil {
			return fmt.Errorf("restore: %w", err)
		}
		if len(recs) > restoreChunk {
			log.Info("restoring registrations", "done", min(i+restoreChunk, len(recs)), "of", len(recs))
		}
	}
	log.Info("registrations restored", "count", len(recs), "took", time.Since(start))
	return nil
}

// runBackup is "wsrouter backup -data FILE -out COPY": a consistent copy of a
// data file no router is using. A running router is backed up through its
// GET /backup with the admin token instead (docs/operations.md).
func runBackup(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("wsrouter backup", flag.ContinueOnError)
	fs.SetOutput(stderr)
	data := fs.String("data", "wsrouter.db", "the data file to copy")
	out := fs.String("out", "", "where to write the copy (must not exist)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *out == "" {
		return errors.New("backup: -out is required")
	}
	n, err := boltstore.BackupFile(*data, *out)
	if errors.Is(err, boltstore.ErrLocked) {
		return fmt.Errorf("backup: %w: a running router is backed up with GET /backup and its admin token", err)
	}
	if err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	fmt.Fprintf(stdout, "wrote %s (%d bytes)\n", *out, n)
	return nil
}

// limitAttrs are the limits in force, for the startup line: what an operator
// looks for when a refusal surprises them. rc is the router's configuration
// with its defaults filled in.
func limitAttrs(rc router.Config, o *options) slog.Attr {
	gc := &o.router.Registry
	rate := func(l router.Limit) string {
		if l.Rate <= 0 {
			return "off"
		}
		return fmt.Sprintf("%g/s burst %d", l.Rate, l.Burst)
	}
	return slog.Group("limits",
		"max_message", rc.MaxMessage,
		"send_queue_bytes", rc.SendQueueBytes,
		"max_registrations", gc.MaxRegistrations,
		"max_members", gc.MaxMembers,
		"max_subscriptions", gc.MaxSubscriptions,
		"write_timeout", rc.WriteTimeout,
		"ping_interval", rc.PingInterval,
		"ping_timeout", rc.PingTimeout,
		"gc_grace", gc.GCGrace,
		"unused_ttl", gc.UnusedTTL,
		"relay_timeout", rc.RelayTimeout,
		"relay_max_body", rc.RelayMaxBody,
		"relay_max_pending", rc.RelayMaxPending,
		"relay_queue_bytes", rc.RelayQueueBytes,
		"relay_max_memory", rc.RelayMaxMemory,
		"rate_register", rate(rc.RateRegister),
		"rate_connect", rate(rc.RateConnect),
		"rate_relay", rate(rc.RateRelay),
		"rate_badkey", rate(rc.RateBadKey),
		"rate_message", rate(rc.RateMessage),
		"bcrypt_cost", gc.BcryptCost,
		"token_max_ttl", rc.Tokens.MaxTTL,
		"drain_delay", o.drainDelay,
		"shutdown_timeout", o.shutdownTimeout,
	)
}

// acceptLog makes a listener's Accept errors visible: at warn level, at most
// one line per interval, each with how many errors it left out. An error
// such as EMFILE (too many open files) is temporary to net/http, which
// retries with a backoff and says so only through its ErrorLog, kept at
// debug for the per-connection noise it mostly carries.
type acceptLog struct {
	net.Listener
	log   *slog.Logger
	every time.Duration
	now   func() time.Time

	// pending mirrors suppressed > 0, so a successful Accept takes the
	// lock only after errors.
	pending atomic.Bool

	mu         sync.Mutex
	last       time.Time // when a line was last logged; guarded by mu
	suppressed int       // errors not logged since; guarded by mu
}

func newAcceptLog(ln net.Listener, log *slog.Logger) *acceptLog {
	return &acceptLog{Listener: ln, log: log, every: time.Second, now: time.Now}
}

// Accept implements net.Listener.
func (l *acceptLog) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	switch {
	case err == nil:
		if l.pending.Load() {
			l.note(nil)
		}
	case !errors.Is(err, net.ErrClosed): // closed: Shutdown, not a failure
		l.note(err)
	}
	return c, err
}

// note logs an accept error, or a success after errors not logged yet,
// unless a line went out less than l.every ago; then it counts the error
// for the next line.
func (l *acceptLog) note(err error) {
	now := l.now()
	l.mu.Lock()
	if !l.last.IsZero() && now.Sub(l.last) < l.every {
		if err != nil {
			l.suppressed++
			l.pending.Store(true)
		}
		l.mu.Unlock()
		return
	}
	n := l.suppressed
	l.last, l.suppressed = now, 0
	l.pending.Store(false)
	l.mu.Unlock()
	if err != nil {
		l.log.Warn("accept failed", "err", err, "suppressed", n)
	} else if n > 0 {
		l.log.Info("accepting again", "suppressed", n)
	}
}
