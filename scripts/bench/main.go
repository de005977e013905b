// Command bench measures wsrouter against a reference broadcaster. Each
// server under test is a separate process on a loopback port, so that its CPU
// time (utime+stime in /proc/<pid>/stat) and memory (VmRSS in
// /proc/<pid>/status) are its own and not the load generator's.
//
// Usage:
//
//	go run ./scripts/bench <scenario> [flags]
//	go run ./scripts/bench <scenario> -h
//
// Scenarios (the table is scenarios below):
//
//	fanout   one lobby: -members N, -senders S of them send -size byte
//	         messages at max rate (-rate 0, -window in flight per sender) or
//	         at -rate R deliveries/s; deliveries/s, latency, loss, CPU
//	idle     -conns N idle connections (or max) in registrations of
//	         -per-reg members: connects/s while establishing, RSS per conn
//	connect  connect+close churn at concurrency -c, -auth key (a fresh
//	         registration per connect: bcrypt runs), remembered (the same
//	         one and key) or token, or several of them in one run
//	pair     -pairs P hostclient registrations, the client sends, the host
//	         echoes: round trips/s and RTT
//	register -c concurrent /register of fresh lobbies (wsrouter only; with
//	         -server-flags "-data FILE" the records go to a data file)
//	send     -c backends POST /send to one of -members members by connection
//	         id (wsrouter only): requests/s, latency, loss
//	webhook  -members clients send as fast as the router takes them; a local
//	         receiver counts their message webhooks (wsrouter only)
//	storm    -n members connect at once to -regs registrations nobody
//	         joined yet (a fleet after a restart), with keys or tokens;
//	         -restart connects them first, restarts the server on a data
//	         file and times their reconnecting: admitted, time to all in
//	pubsub   one event, -members subscribers, -publishers publishing, beside
//	         a lobby of the same size in the same run; or -wild: -subs
//	         wildcard subscriptions per member, publishes to random events
//	reconnect -n Go clients of wsrouter/client in one lobby; the router is
//	         restarted on its data file; seconds until all are back
//	relay    -c concurrent HTTP clients, each in a closed loop, GET
//	         /relay/{id}/reading answered by a host in this process, beside
//	         the same handler served directly (the reference here):
//	         round trips/s, latency, errors, CPU per request
//
// The wsrouter binary is built from the repository (go build -o <tmp> .)
// unless -server-bin names one. The reference server is this same program
// in its hidden refserver mode (see refserver.go), or in another hidden mode
// a scenario names (relay: directserver, see direct.go).
//
// Each run starts the reference, measures it and stops it, then does the
// same for wsrouter (the order alternates from run to run so that drift on a
// shared machine does not always favour the same one); the two never run at
// the same time. -runs N repeats that and reports medians. Every figure for
// wsrouter is also given as a ratio to the reference's.
//
// Output: one JSON line (machine, parameters, every run, medians, ratios,
// anomalies), then a short human summary, on stdout. Progress goes to
// stderr. Child processes are killed when the tool exits, on error or
// interrupt too.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"
)

// A scenario is one entry of the benchmark table. Adding one (relay, say) is
// an entry here and a file with a type implementing bench.
type scenario struct {
	name    string
	summary string
	// newBench registers the scenario's own flags on fs and returns the
	// benchmark, which reads them once fs is parsed. Nil means not
	// implemented yet.
	newBench func(fs *flag.FlagSet) bench
}

// scenarios is the benchmark table.
var scenarios = []scenario{
	{"fanout", "one lobby, some members sending to all: deliveries/s, latency, loss, CPU per delivery", newFanout},
	{"idle", "many idle connections: connects/s while establishing, server RSS per connection", newIdle},
	{"connect", "connect+close churn with first-time keys (bcrypt), remembered keys or tokens (-auth): connects/s", newConnect},
	{"pair", "hostclient pairs ping-ponging: round trips/s, RTT", newPair},
	{"relay", "HTTP requests relayed to a host, beside a direct HTTP server: round trips/s, latency", newRelay},
	{"register", "fresh registrations at concurrency -c (-targets wsrouter; -server-flags \"-data FILE\" for a data file): registers/s", newRegister},
	{"send", "POST /send to one of many members by connection id (-targets wsrouter): requests/s, latency, loss", newSend},
	{"webhook", "message webhooks from many members to a local receiver (-targets wsrouter): events/s, loss", newWebhook},
	{"pubsub", "pub/sub fan-out beside a lobby of the same size, or -wild: many wildcard subscriptions (-targets wsrouter): deliveries/s, CPU per delivery", newPubSub},
	{"reconnect", "Go clients (wsrouter/client) reconnecting after a router restart (-targets wsrouter): seconds until all are back, per-second curve", newReconnect},
	{"storm", "many first connects at once, with keys or tokens, optionally after a server restart (-restart): admitted, refused, seconds until all are in", newStorm},
}

// bench is one configured scenario.
type bench interface {
	// check validates the flags; o holds the common ones.
	check(o *options) error
	// params describes the configuration for the JSON record.
	params() map[string]any
	// serverArgs returns wsrouter flags the scenario needs beyond the
	// common ones (limits such as -max-members).
	serverArgs() []string
	// run measures one started server once.
	run(ctx context.Context, t *target) (*result, error)
	// describe is the summary's title line.
	describe() string
}

// referee is implemented by a scenario whose reference is not the refserver
// broadcaster.
type referee interface {
	reference() refSpec
}

// refSpec says which server is the reference and what the summary calls the
// two servers. In the JSON they stay "reference" and "wsrouter", as in every
// scenario; "labels" gives the names.
type refSpec struct {
	mode string   // hidden mode of the reference binary
	args []string // its flags; -addr is added at start
	// names in the summary and aliases for -targets
	refName, wsName string
}

// cleaner is implemented by a scenario that leaves something to remove once
// every run is over.
type cleaner interface {
	cleanup()
}

// goaler is implemented by a scenario with targets to meet (from an issue,
// say); they are checked against the medians and printed in the summary.
type goaler interface {
	goals(rep *report) []goal
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// With SIGPIPE handled, a closed stdout (bench … | head -1) makes the
	// write fail instead of killing the process, so the deferred cleanup
	// (servers, temp dir) still runs. A handled signal is reset to its
	// default in children, unlike an ignored one.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	var err error
	switch {
	case len(os.Args) > 1 && os.Args[1] == refServerMode:
		err = runRefServer(ctx, os.Args[2:], os.Stderr)
	case len(os.Args) > 1 && os.Args[1] == directServerMode:
		err = runDirectServer(ctx, os.Args[2:], os.Stderr)
	case len(os.Args) > 1 && os.Args[1] == natsServerMode:
		err = runNATSServer(ctx, os.Args[2:], os.Stderr)
	default:
		err = run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	}
	stop()
	switch {
	case errors.Is(err, flag.ErrHelp):
		// Help was asked for and given.
	case err != nil:
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// options are the flags common to every scenario.
type options struct {
	duration    time.Duration
	warmup      time.Duration
	runs        int
	serverBin   string
	refBin      string
	targets     string
	serverFlags string
	logLevel    string
	srcIPs      int
	refQueue    int
	nodes       int
}

func (o *options) register(fs *flag.FlagSet) {
	fs.DurationVar(&o.duration, "duration", 5*time.Second, "measured window of each run")
	fs.DurationVar(&o.warmup, "warmup", 500*time.Millisecond, "traffic before the measured window (fanout, pair, relay)")
	fs.IntVar(&o.runs, "runs", 1, "repeat the whole scenario this many times and report medians")
	fs.StringVar(&o.serverBin, "server-bin", "", "wsrouter binary to test (default: go build the repository to a temp dir)")
	fs.StringVar(&o.refBin, "ref-bin", "", "binary whose hidden server modes (refserver, directserver) are the reference (default: this program)")
	fs.StringVar(&o.targets, "targets", "both", "which servers to measure: both, wsrouter or reference (relay: also relay or direct)")
	fs.StringVar(&o.serverFlags, "server-flags", "", "extra wsrouter flags, space-separated, overriding the scenario's (e.g. \"-send-queue-bytes 65536\")")
	fs.StringVar(&o.logLevel, "log-level", "info", "wsrouter -log-level; its WARN/ERROR lines are reported as anomalies")
	fs.IntVar(&o.srcIPs, "src-ips", 8, "client source addresses 127.0.0.2 … 127.0.0.(1+n), rotated per connection")
	fs.IntVar(&o.refQueue, "ref-queue", 1024, "the reference's per-member channel capacity, in messages")
	fs.IntVar(&o.nodes, "nodes", 1, "fanout, pair: run wsrouter as a cluster of this many nodes on a NATS server the tool starts, members spread over them; the reference is then one wsrouter node")
}

func (o *options) check() error {
	switch {
	case o.duration <= 0:
		return errors.New("-duration must be positive")
	case o.warmup < 0:
		return errors.New("-warmup must not be negative")
	case o.runs < 1:
		return errors.New("-runs must be at least 1")
	case o.srcIPs < 1 || o.srcIPs > 250:
		return errors.New("-src-ips must be 1 to 250")
	case o.refQueue < 1:
		return errors.New("-ref-queue must be positive")
	case o.nodes < 1 || o.nodes > 16:
		return errors.New("-nodes must be 1 to 16")
	}
	switch o.targets {
	case "both", kindWsrouter, kindReference:
	default:
		return fmt.Errorf("-targets %q: want both, %s or %s", o.targets, kindWsrouter, kindReference)
	}
	return nil
}

// kinds returns the servers to measure in run i (0-based): both alternate
// which goes first.
func (o *options) kinds(i int) []string {
	switch o.targets {
	case kindWsrouter, kindReference:
		return []string{o.targets}
	}
	if i%2 == 1 {
		return []string{kindWsrouter, kindReference}
	}
	return []string{kindReference, kindWsrouter}
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: go run ./scripts/bench <scenario> [flags]   (<scenario> -h for its flags)")
	fmt.Fprintln(w, "scenarios:")
	for _, s := range scenarios {
		fmt.Fprintf(w, "  %-8s %s\n", s.name, s.summary)
	}
}

// run is the whole tool but the hidden server modes.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		usage(stderr)
		return errors.New("no scenario given")
	}
	if args[0] == "-h" || args[0] == "-help" || args[0] == "help" {
		usage(stderr)
		return flag.ErrHelp
	}
	var sc *scenario
	for i := range scenarios {
		if scenarios[i].name == args[0] {
			sc = &scenarios[i]
		}
	}
	if sc == nil {
		usage(stderr)
		return fmt.Errorf("unknown scenario %q", args[0])
	}
	if sc.newBench == nil {
		return fmt.Errorf("scenario %s is not implemented yet: add it to the scenario table with a type implementing bench", sc.name)
	}

	fs := flag.NewFlagSet(sc.name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := &options{}
	o.register(fs)
	b := sc.newBench(fs)
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	ref := refSpec{mode: refServerMode, args: refArgs(o), refName: kindReference, wsName: kindWsrouter}
	if o.nodes > 1 {
		if sc.name != "fanout" && sc.name != "pair" {
			return fmt.Errorf("-nodes is for fanout and pair, not %s", sc.name)
		}
		// The reference is wsrouter itself on one node (mode ""), with
		// the cluster's flags but -nats.
		ref = refSpec{mode: "", args: wsrouterArgs(o, b.serverArgs()), refName: "1 node", wsName: fmt.Sprintf("%d nodes", o.nodes)}
		switch o.targets {
		case ref.refName:
			o.targets = kindReference
		case ref.wsName:
			o.targets = kindWsrouter
		}
	} else if r, ok := b.(referee); ok {
		ref = r.reference()
		// The scenario's names for the two servers are aliases.
		switch o.targets {
		case ref.refName:
			o.targets = kindReference
		case ref.wsName:
			o.targets = kindWsrouter
		}
	}
	if err := o.check(); err != nil {
		return err
	}
	// Before the scenario's check (idle's -conns max reads the limit) and
	// before any child starts, so that the servers inherit it.
	if _, err := raiseNoFile(); err != nil {
		return err
	}
	if c, ok := b.(cleaner); ok {
		defer c.cleanup()
	}
	if err := b.check(o); err != nil {
		return err
	}

	tmp, err := os.MkdirTemp("", "wsrouter-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	bins, err := findBinaries(ctx, o, tmp, stderr)
	if err != nil {
		return err
	}
	dial := newDialer(o.srcIPs)
	defer dial.close()

	rep := &report{
		Scenario: sc.name,
		Started:  time.Now().UTC().Format(time.RFC3339),
		Machine:  machineInfo(bins),
		Params:   b.params(),
		Common: map[string]any{
			"duration": o.duration.String(), "warmup": o.warmup.String(), "runs": o.runs,
			"src_ips": o.srcIPs, "ref_queue": o.refQueue,
		},
		ServerArgs: map[string][]string{},
	}
	if ref.mode != refServerMode {
		delete(rep.Common, "ref_queue") // the broadcaster's; not started
		rep.Labels = map[string]string{kindReference: ref.refName, kindWsrouter: ref.wsName}
		rep.ReferenceMode = ref.mode
	}
	argsOf := map[string][]string{
		kindWsrouter:  wsrouterArgs(o, b.serverArgs()),
		kindReference: ref.args,
	}
	for _, k := range o.kinds(0) {
		rep.ServerArgs[k] = argsOf[k]
	}
	rep.ServerEnv = serverEnv(nil)

	failed := false
	for i := range o.runs {
		rr := runRecord{Run: i + 1, Order: o.kinds(i), Targets: map[string]*targetRecord{}}
		for _, kind := range rr.Order {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			fmt.Fprintf(stderr, "run %d/%d: %s …\n", i+1, o.runs, rep.label(kind))
			tr := measure(ctx, b, kind, rep.label(kind), bins, ref.mode, argsOf[kind], tmp, dial, o.nodes, stderr)
			if tr.Error != "" {
				failed = true
				fmt.Fprintf(stderr, "run %d/%d: %s failed: %s\n", i+1, o.runs, rep.label(kind), tr.Error)
			}
			rr.Targets[kind] = tr
		}
		rr.Ratio = ratios(figuresOf(rr.Targets[kindWsrouter]), figuresOf(rr.Targets[kindReference]))
		rep.Runs = append(rep.Runs, rr)
	}
	rep.summarise()
	if g, ok := b.(goaler); ok {
		rep.Goals = g.goals(rep)
	}

	if err := rep.write(stdout, b.describe()); err != nil {
		return err
	}
	if failed {
		return errors.New("some runs failed (see \"error\" in the JSON)")
	}
	return nil
}

// measure starts one server, runs the scenario against it once and stops
// it, whatever happens. name is what progress lines call it; refMode is the
// reference binary's hidden mode.
func measure(ctx context.Context, b bench, kind, name string, bins binaries, refMode string, args []string, tmp string, dial *dialer, nodes int, stderr io.Writer) *targetRecord {
	tr := &targetRecord{}
	bin, binArgs := bins.server, args
	if kind == kindReference && refMode != "" {
		bin, binArgs = bins.ref, append([]string{refMode}, args...)
	}
	var t *target
	if kind == kindWsrouter && nodes > 1 {
		procs, err := startCluster(ctx, nodes, bins, args, tmp)
		if err != nil {
			tr.Error = err.Error()
			return tr
		}
		t = &target{kind: kind, name: name, srv: procs[0], nodes: procs[:nodes], others: procs[nodes:], dial: dial, log: stderr}
	} else {
		srv, err := startServer(ctx, kind, bin, binArgs, tmp)
		if err != nil {
			tr.Error = err.Error()
			return tr
		}
		t = &target{kind: kind, name: name, srv: srv, dial: dial, log: stderr, wsRef: refMode == ""}
	}
	// A scenario may restart the server; the last one is stopped here.
	defer func() {
		t.srv.kill()
		for _, p := range t.procs() {
			p.kill()
		}
	}()
	var earlier []string // problems logged by servers a restart stopped
	t.restart = func(ctx context.Context) error {
		// Pooled HTTP connections would die with the server anyway; one
		// the transport dialed and never used is, to net/http's Shutdown,
		// a connection about to send a request, waited for up to 5 s.
		dial.close()
		if err := t.srv.stop(); err != nil {
			return fmt.Errorf("stop for a restart: %w", err)
		}
		earlier = append(earlier, t.srv.logProblems()...)
		next, err := startServerAt(ctx, kind, bin, binArgs, tmp, t.srv.addr)
		if err != nil {
			return fmt.Errorf("restart: %w", err)
		}
		t.srv = next
		return nil
	}
	res, err := b.run(ctx, t)
	srv := t.srv
	if res == nil {
		res = newResult()
	}
	if kind == kindWsrouter {
		if m := srv.scrapeMetrics(); len(m) > 0 {
			res.notes["server_metrics"] = m
		}
	}
	if lim := srv.nofile(); lim != "" {
		res.notes["server_nofile"] = lim
	}
	if err != nil {
		tr.Error = err.Error()
	}
	if err := srv.stop(); err != nil {
		res.anomaly("%s: %v", kind, err)
	}
	for _, p := range t.procs()[1:] { // the other nodes, then NATS
		if err := p.stop(); err != nil {
			res.anomaly("%s: %v", p.kind, err)
		}
		earlier = append(earlier, p.logProblems()...)
	}
	if probs := append(earlier, srv.logProblems()...); len(probs) > 0 {
		res.notes["server_log_problems"] = probs
		res.anomaly("%s logged %d WARN/ERROR/panic lines, e.g. %q", kind, len(probs), probs[0])
	}
	tr.Figures, tr.Notes, tr.Anomalies = res.figures, res.notes, res.anomalies
	return tr
}

// sortedKeys returns m's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// splitFlags splits -server-flags on spaces.
func splitFlags(s string) []string { return strings.Fields(s) }
