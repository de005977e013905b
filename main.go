// Command wsrouter is a self-hosted WebSocket router: programs on different
// private networks reach each other through rooms on one server they all dial
// out to. See README.md for the API and ../shared/SPEC.md for the contract.
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
	"strings"
	"syscall"
	"time"

	"wsrouter/router"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "wsrouter:", err)
		os.Exit(1)
	}
}

// options are the command-line flags, each also read from WSROUTER_<FLAG>.
type options struct {
	addr            string
	logFormat       string
	logLevel        string
	shutdownTimeout time.Duration
	debugAddr       string

	router  router.Config // router.Registry holds the registry's flags
	origins string

	tls tlsOptions
}

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("wsrouter", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.addr, "addr", ":8741", "listen address")
	fs.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.StringVar(&o.debugAddr, "debug-addr", "", "listen address for Go's pprof profiles at /debug/pprof/ (empty: off; keep it on loopback)")
	fs.DurationVar(&o.shutdownTimeout, "shutdown-timeout", 10*time.Second, "how long a graceful shutdown may take")

	rc, gc := &o.router, &o.router.Registry
	fs.Int64Var(&rc.MaxMessage, "max-message", 1<<20, "largest data message in bytes; a larger one closes its sender with 1009")
	fs.IntVar(&rc.SendQueueBytes, "send-queue-bytes", 4<<20, "send queue bound per member, in bytes (payload + 64 per message); overflow closes it with 4008")
	fs.DurationVar(&rc.WriteTimeout, "write-timeout", 10*time.Second, "deadline for every write, close frames included")
	fs.DurationVar(&rc.PingInterval, "ping-interval", 30*time.Second, "how often the server pings each member (negative: never)")
	fs.DurationVar(&rc.PingTimeout, "ping-timeout", 30*time.Second, "how long a ping may go unanswered before the member is dropped")
	fs.DurationVar(&rc.RelayTimeout, "relay-timeout", 10*time.Second, "how long a relay request waits for the device's reply (then 504)")
	fs.Int64Var(&rc.RelayMaxBody, "relay-max-body", 1<<20, "largest relayed request body, and reply body once decoded, in bytes (then 413 / 502)")
	fs.IntVar(&rc.RelayMaxPending, "relay-max-pending", 100, "most relay requests waiting on one registration (then 429)")
	fs.Int64Var(&rc.RelayQueueBytes, "relay-queue-bytes", 8<<20, "relay request bytes queued to one device and not yet written (then 503); keep it at least 3 × -relay-max-body")
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
	fs.StringVar(&rc.AdminToken, "admin-token", "", "bearer token that enables /stats (empty: no /stats)")
	fs.StringVar(&o.origins, "allowed-origins", "", "comma-separated browser origin host patterns allowed to connect (empty: any)")

	fs.IntVar(&gc.BcryptCost, "bcrypt-cost", 10, "bcrypt cost for keys")
	fs.IntVar(&gc.MaxRegistrations, "max-registrations", 10000, "most live registrations (0: no cap)")
	fs.IntVar(&gc.MaxMembers, "max-members", 1000, "most members per registration (0: no cap)")
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
	fs.StringVar(&tc.httpAddr, "http-addr", "", "plain-HTTP listen address that answers ACME HTTP-01 challenges and redirects GET and HEAD to https (empty: :80 with -acme-domains, else none; off: none)")

	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
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
	return o, nil
}

// applyEnv sets every flag not given on the command line from its
// WSROUTER_<FLAG> environment variable, so the command line wins.
func applyEnv(fs *flag.FlagSet) error {
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] || err != nil {
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

// run is the whole program: it serves until ctx is done, then shuts down
// gracefully. Logs go to stderr; stdout is unused but kept so that a test can
// run the program exactly as main does.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	log, err := newLogger(o.logFormat, o.logLevel, stderr)
	if err != nil {
		return err
	}

	tlsConf, plainHTTP, err := o.tls.load(log)
	if err != nil {
		return err
	}

	rt := router.New(o.router, log)
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
			ErrorLog:       slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		}
	}
	srv := newServer(rt)
	srv.TLSConfig = tlsConf
	ln, err := net.Listen("tcp", o.addr)
	if err != nil {
		return err
	}
	// -http-addr: ACME HTTP-01 challenges, and a redirect to https for
	// everything else. Nothing there reaches the router, which is served
	// over TLS only.
	var hsrv *http.Server
	var hln net.Listener
	if o.tls.httpAddr != "" {
		if hln, err = net.Listen("tcp", o.tls.httpAddr); err != nil {
			ln.Close()
			return err
		}
		_, httpsPort, _ := net.SplitHostPort(ln.Addr().String())
		hsrv = newServer(plainHTTP(redirectHTTPS(httpsPort)))
	}
	mode := "off"
	switch {
	case len(o.tls.acmeDomains) > 0:
		mode = "acme"
	case tlsConf != nil:
		mode = "files"
	}
	log.Info("listening", "addr", ln.Addr().String(), "tls", mode)
	if hsrv != nil {
		log.Info("redirecting http to https", "addr", hln.Addr().String(), "acme_http01", mode == "acme")
	}

	if o.debugAddr != "" {
		dln, err := net.Listen("tcp", o.debugAddr)
		if err != nil {
			ln.Close()
			if hln != nil {
				hln.Close()
			}
			return err
		}
		dsrv := newServer(debugHandler())
		go dsrv.Serve(dln)
		defer dsrv.Close()
		log.Info("debug listening", "addr", dln.Addr().String())
	}

	serveErr := make(chan error, 2)
	go func() {
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
		go func() { serveErr <- hsrv.Serve(hln) }()
	}

	select {
	case err := <-serveErr:
		srv.Close()
		if hsrv != nil {
			hsrv.Close()
		}
		return err
	case <-ctx.Done():
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
		// Out of time: whatever is left is cut off. Still a clean exit, as
		// SPEC §8 asks.
		srv.Close()
		if hsrv != nil {
			hsrv.Close()
		}
		log.Warn("shutdown timed out; remaining connections dropped")
	}
	log.Info("stopped")
	return nil
}
