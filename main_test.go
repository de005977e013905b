package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"wsrouter/router"
)

func TestFlagsFromEnvironment(t *testing.T) {
	t.Setenv("WSROUTER_GC_GRACE", "5s")
	t.Setenv("WSROUTER_MAX_MEMBERS", "7")
	t.Setenv("WSROUTER_ALLOWED_ORIGINS", "a.example, *.b.example")
	t.Setenv("WSROUTER_MAX_REGISTRATIONS", "11")
	t.Setenv("WSROUTER_DRAIN_DELAY", "15s")
	t.Setenv("WSROUTER_VERSION", "not a bool") // -version is not read from the environment

	o, err := parseFlags([]string{"-max-registrations", "12"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		got  any
		want any
	}{
		{"env duration", o.router.Registry.GCGrace, 5 * time.Second},
		{"env int", o.router.Registry.MaxMembers, 7},
		{"flag wins over env", o.router.Registry.MaxRegistrations, 12},
		{"default", o.router.WriteTimeout, 10 * time.Second},
		{"env list", strings.Join(o.router.AllowedOrigins, "|"), "a.example|*.b.example"},
		{"env drain delay", o.drainDelay, 15 * time.Second},
		{"version not from env", o.version, false},
		{"relay queue default (0: sized from -relay-max-body)", o.router.RelayQueueBytes, int64(0)},
		{"relay memory default", o.router.RelayMaxMemory, int64(256 << 20)},
		{"message rate default", o.router.RateMessage, router.Limit{Rate: 1000, Burst: 2000}},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s: got %v, want %v", tt.name, tt.got, tt.want)
		}
	}
}

func TestFlagErrors(t *testing.T) {
	tests := []struct {
		name string
		env  [2]string
		args []string
	}{
		{name: "bad env value", env: [2]string{"WSROUTER_PING_INTERVAL", "soon"}},
		{name: "bad bcrypt cost", args: []string{"-bcrypt-cost", "3"}},
		{name: "bad log format", args: []string{"-log-format", "xml"}},
		{name: "stray argument", args: []string{"serve"}},
		{name: "negative drain delay", args: []string{"-drain-delay", "-1s"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.env[0] != "" {
				t.Setenv(tt.env[0], tt.env[1])
			}
			err := run(t.Context(), append(tt.args, "-addr", "127.0.0.1:0"), io.Discard, io.Discard)
			if err == nil {
				t.Fatal("got nil error, want one")
			}
		})
	}
}

// startProgram runs the whole program on a loopback port and returns its
// base URL, its log lines and a stop function that returns run's error.
func startProgram(t *testing.T, args ...string) (string, <-chan string, func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"-addr", "127.0.0.1:0", "-log-format", "json"}, args...), io.Discard, pw)
		pw.Close()
	}()
	lines := make(chan string, 1000)
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			var rec struct{ Msg, Addr string }
			json.Unmarshal(sc.Bytes(), &rec)
			if rec.Msg == "listening" {
				addr <- rec.Addr
			}
			select {
			case lines <- sc.Text():
			default:
			}
		}
		close(lines)
	}()
	stop := sync.OnceValue(func() error {
		cancel()
		select {
		case err := <-done:
			return err
		case <-time.After(15 * time.Second):
			return errors.New("run did not return")
		}
	})
	select {
	case a := <-addr:
		t.Cleanup(func() { stop() })
		return "http://" + a, lines, stop
	case err := <-done:
		t.Fatalf("run: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("program did not start")
	}
	return "", nil, nil
}

func TestProgramEndToEnd(t *testing.T) {
	// The environment configures the whole program, not just parseFlags.
	t.Setenv("WSROUTER_BCRYPT_COST", "4")
	t.Setenv("WSROUTER_LOG_LEVEL", "debug")
	base, lines, stop := startProgram(t, "-max-registrations", "1")

	q := url.Values{"key": {"the-key"}, "host_key": {"the-host-key"}, "reg_type": {"lobby"}}
	resp, err := http.Get(base + "/register?" + q.Encode())
	if err != nil {
		t.Fatal(err)
	}
	id, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("register: got %d", resp.StatusCode)
	}
	// The registry's flags reach the registry.
	resp, err = http.Get(base + "/register?" + q.Encode())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 503 {
		t.Fatalf("register beyond -max-registrations 1: got %d, want 503", resp.StatusCode)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	wsBase := "ws" + strings.TrimPrefix(base, "http")
	join := url.Values{"id": {string(id)}, "key": {"the-key"}}.Encode()
	a, _, err := websocket.Dial(ctx, wsBase+"/connect?"+join, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _, err := websocket.Dial(ctx, wsBase+"/connect?"+join, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Write(ctx, websocket.MessageText, []byte("payload-secret")); err != nil {
		t.Fatal(err)
	}
	if _, m, err := b.Read(ctx); err != nil || string(m) != "payload-secret" {
		t.Fatalf("got %q %v, want payload-secret", m, err)
	}

	// SIGINT/SIGTERM cancel run's context: every member gets 1001 and run
	// returns nil.
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	for _, c := range []*websocket.Conn{a, b} {
		_, _, err := c.Read(ctx)
		if got := websocket.CloseStatus(err); got != websocket.StatusGoingAway {
			t.Fatalf("got close %v (%v), want 1001", got, err)
		}
	}
	if err := <-stopped; err != nil {
		t.Fatalf("run returned %v, want nil", err)
	}

	// Logs are JSON at debug level, carry the connection's registration,
	// and never a key or a payload.
	sawConn := false
	for line := range lines {
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line %q is not JSON", line)
		}
		for _, secret := range []string{"the-key", "the-host-key", "payload-secret"} {
			if strings.Contains(line, secret) {
				t.Fatalf("log line %q contains %q", line, secret)
			}
		}
		if rec["reg"] == string(id) && rec["conn"] != nil && rec["role"] == "member" {
			sawConn = true
		}
	}
	if !sawConn {
		t.Error("no log line carried reg, role and conn")
	}
}

func TestHelp(t *testing.T) {
	var stdout, stderr strings.Builder
	if err := run(t.Context(), []string{"-h"}, &stdout, &stderr); err != nil {
		t.Fatalf("run -h: got %v, want nil", err)
	}
	out := stdout.String()
	first, _, _ := strings.Cut(out, "\n")
	if first != about {
		t.Errorf("first line: got %q, want %q", first, about)
	}
	for _, want := range []string{"WSROUTER_<FLAG>", "WSROUTER_ADDR", "-addr", "-drain-delay", "-rate-message", "-relay-max-memory", "-version"} {
		if !strings.Contains(out, want) {
			t.Errorf("-h output has no %q", want)
		}
	}
	if stderr.Len() != 0 {
		t.Errorf("-h wrote %q to stderr, want nothing", stderr.String())
	}
}

func TestVersion(t *testing.T) {
	// The version needs nothing else to be right, the environment included.
	t.Setenv("WSROUTER_PING_INTERVAL", "soon")
	var stdout, stderr strings.Builder
	if err := run(t.Context(), []string{"-version"}, &stdout, &stderr); err != nil {
		t.Fatalf("run -version: got %v, want nil", err)
	}
	if got, want := stdout.String(), readBuildInfo().String()+"\n"; got != want || !strings.HasPrefix(got, "wsrouter ") {
		t.Errorf("stdout: got %q, want %q", got, want)
	}
	if stderr.Len() != 0 {
		t.Errorf("-version wrote %q to stderr, want nothing", stderr.String())
	}
}

func TestBuildInfo(t *testing.T) {
	tests := []struct {
		name string
		bi   debug.BuildInfo
		want string
	}{
		{"nothing recorded", debug.BuildInfo{GoVersion: "go1.26.8"}, "wsrouter (devel) go1.26.8"},
		{"devel", debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "(devel)"}}, "wsrouter (devel) go1.26.8"},
		{"tagged, clean", debug.BuildInfo{
			GoVersion: "go1.26.8",
			Main:      debug.Module{Version: "v1.2.3"},
			Settings:  []debug.BuildSetting{{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: "0123abcd"}, {Key: "vcs.modified", Value: "false"}},
		}, "wsrouter v1.2.3 vcs.revision=0123abcd vcs.modified=false go1.26.8"},
		{"modified", debug.BuildInfo{
			GoVersion: "go1.26.8",
			Settings:  []debug.BuildSetting{{Key: "vcs.revision", Value: "0123abcd"}, {Key: "vcs.modified", Value: "true"}},
		}, "wsrouter (devel) vcs.revision=0123abcd vcs.modified=true go1.26.8"},
	}
	for _, tt := range tests {
		if got := buildInfoOf(&tt.bi).String(); got != tt.want {
			t.Errorf("%s: got %q, want %q", tt.name, got, tt.want)
		}
	}
}

func TestBadFlag(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string // the error
	}{
		{"unknown flag", []string{"-nope"}, "flag provided but not defined: -nope"},
		{"bad value", []string{"-max-members", "many"}, `invalid value "many" for flag -max-members`},
		{"stray argument", []string{"serve"}, `unexpected arguments: ["serve"]`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr strings.Builder
			err := run(t.Context(), append([]string{"-addr", "127.0.0.1:0"}, tt.args...), &stdout, &stderr)
			if err == nil {
				t.Fatal("got nil error, want one")
			}
			got := stderr.String()
			lines := strings.Split(strings.TrimSuffix(got, "\n"), "\n")
			if len(lines) != 2 || !strings.HasPrefix(lines[0], "wsrouter: "+tt.want) || lines[1] != "run 'wsrouter -h' for the flags" {
				t.Errorf("stderr: got %q, want the error %q once and the hint, without the usage", got, tt.want)
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout: got %q, want nothing", stdout.String())
			}
			// main must not print it again.
			var mainOut strings.Builder
			if code := exitCode(err, &mainOut); code != 2 || mainOut.Len() != 0 {
				t.Errorf("exitCode: got %d and %q, want 2 and nothing", code, mainOut.String())
			}
		})
	}

	// Any other error is main's to print, once.
	var mainOut strings.Builder
	if code := exitCode(errors.New("listen: address in use"), &mainOut); code != 1 || mainOut.String() != "wsrouter: listen: address in use\n" {
		t.Errorf("exitCode of a plain error: got %d and %q, want 1 and the error", code, mainOut.String())
	}
	if code := exitCode(nil, &mainOut); code != 0 {
		t.Errorf("exitCode(nil): got %d, want 0", code)
	}
}

func TestJSONLogDurations(t *testing.T) {
	var buf strings.Builder
	log, err := newLogger("json", "info", &buf)
	if err != nil {
		t.Fatal(err)
	}
	log.Info("x", "timeout", 10*time.Second, slog.Group("g", "grace", 1500*time.Millisecond), "n", 3)
	var rec struct {
		Timeout string
		G       struct{ Grace string }
		N       int
	}
	if err := json.Unmarshal([]byte(buf.String()), &rec); err != nil {
		t.Fatalf("%q: %v", buf.String(), err)
	}
	if rec.Timeout != "10s" || rec.G.Grace != "1.5s" || rec.N != 3 {
		t.Errorf("got %s, want timeout 10s, g.grace 1.5s, n 3", buf.String())
	}
}

func TestStartupLine(t *testing.T) {
	_, lines, _ := startProgram(t, "-rate-connect", "0", "-max-members", "7")
	rec := waitLog(t, lines, "listening")
	if rec["level"] != "INFO" {
		t.Errorf("level: got %v, want INFO", rec["level"])
	}
	if got, want := rec["url"], "http://"+rec["addr"].(string); got != want {
		t.Errorf("url: got %v, want %v", got, want)
	}
	build, _ := rec["build"].(map[string]any)
	if v, _ := build["version"].(string); v == "" {
		t.Errorf("build: got %v, want a version", rec["build"])
	}
	limits, _ := rec["limits"].(map[string]any)
	tests := []struct {
		name string
		want any
	}{
		{"max_message", float64(1 << 20)},
		{"max_members", float64(7)},
		{"max_registrations", float64(10000)},
		{"send_queue_bytes", float64(4 << 20)},
		{"relay_queue_bytes", float64(8 << 20)},
		{"relay_max_memory", float64(256 << 20)},
		{"rate_message", "1000/s burst 2000"},
		{"rate_connect", "off"},
		{"write_timeout", "10s"},
		{"drain_delay", "0s"},
	}
	for _, tt := range tests {
		if got := limits[tt.name]; got != tt.want {
			t.Errorf("limits.%s: got %v (%T), want %v", tt.name, got, got, tt.want)
		}
	}
}

// scriptedListener fails its first errs Accepts with a temporary error,
// then accepts one connection, then is closed.
type scriptedListener struct {
	errs     int
	accepted bool
}

type tempError struct{}

func (tempError) Error() string   { return "accept tcp: too many open files" }
func (tempError) Timeout() bool   { return false }
func (tempError) Temporary() bool { return true }

func (l *scriptedListener) Accept() (net.Conn, error) {
	switch {
	case l.errs > 0:
		l.errs--
		return nil, tempError{}
	case !l.accepted:
		l.accepted = true
		c, _ := net.Pipe()
		return c, nil
	}
	return nil, net.ErrClosed
}
func (l *scriptedListener) Close() error   { return nil }
func (l *scriptedListener) Addr() net.Addr { return &net.TCPAddr{} }

func TestAcceptErrorsLogged(t *testing.T) {
	const errs = 3000
	var buf strings.Builder
	log, err := newLogger("json", "info", &buf)
	if err != nil {
		t.Fatal(err)
	}
	// A fake clock: each Accept takes 1 ms, so the flood lasts 3 s.
	now := time.Unix(0, 0)
	l := newAcceptLog(&scriptedListener{errs: errs}, log)
	l.now = func() time.Time { now = now.Add(time.Millisecond); return now }
	for {
		c, err := l.Accept()
		if errors.Is(err, net.ErrClosed) {
			break
		}
		if c != nil {
			c.Close()
		}
	}

	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) > 5 {
		t.Fatalf("got %d log lines for %d accept errors over 3 s, want at most 5", len(lines), errs)
	}
	counted, failed, recovered := 0, 0, 0
	for _, line := range lines {
		var rec struct {
			Level, Msg, Err string
			Suppressed      int
		}
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("%q: %v", line, err)
		}
		switch rec.Msg {
		case "accept failed":
			failed++
			counted += 1 + rec.Suppressed
			if rec.Level != "WARN" || !strings.Contains(rec.Err, "too many open files") {
				t.Errorf("got %s, want a warning with the error", line)
			}
		case "accepting again":
			recovered++
			counted += rec.Suppressed
		default:
			t.Errorf("unexpected line %s", line)
		}
	}
	if failed < 2 || recovered != 1 || counted != errs {
		t.Errorf("got %d failure lines, %d recovery lines, %d errors counted; want 2 or more, 1, %d:\n%s", failed, recovered, counted, errs, buf.String())
	}
}

// get answers a GET's status and body.
func get(t *testing.T, url string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// lobbyQuery registers with key k and host key hk.
var lobbyQuery = url.Values{"key": {"k"}, "host_key": {"hk"}, "reg_type": {"lobby"}}

// joinNewLobby registers a lobby (key "k") and returns its /connect URL.
func joinNewLobby(t *testing.T, base string) string {
	t.Helper()
	code, id := get(t, base+"/register?"+lobbyQuery.Encode())
	if code != 200 {
		t.Fatalf("register: got %d %q, want 200", code, id)
	}
	return "ws" + strings.TrimPrefix(base, "http") + "/connect?" + url.Values{"id": {id}, "key": {"k"}}.Encode()
}

func TestDrainDelay(t *testing.T) {
	// Long enough for the checks below on a loaded machine; they only
	// have to start and finish inside it.
	const delay = 4 * time.Second
	base, lines, stop := startProgram(t, "-drain-delay", delay.String(), "-bcrypt-cost", "4")
	join := joinNewLobby(t, base)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dial := func() *websocket.Conn {
		t.Helper()
		c, _, err := websocket.Dial(ctx, join, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.CloseNow() })
		return c
	}
	a, b := dial(), dial()

	// SIGTERM.
	signalled := time.Now()
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	if rec := waitLog(t, lines, "draining"); rec["delay"] != delay.String() {
		t.Errorf("draining log: got delay %v, want %q", rec["delay"], delay.String())
	}

	// The load balancer's view: not ready, and no new registrations...
	if code, body := get(t, base+"/healthz"); code != http.StatusServiceUnavailable {
		t.Errorf("healthz while draining: got %d %q, want 503", code, body)
	}
	if code, body := get(t, base+"/register?"+lobbyQuery.Encode()); code != http.StatusServiceUnavailable {
		t.Errorf("register while draining: got %d %q, want 503", code, body)
	}
	// ...while members keep talking and may still join.
	c := dial()
	for _, hop := range []struct {
		name     string
		from, to *websocket.Conn
	}{{"a to b", a, b}, {"c to a", c, a}} {
		msg := "while draining, " + hop.name
		if err := hop.from.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			t.Fatalf("%s: %v", hop.name, err)
		}
		if _, got, err := hop.to.Read(ctx); err != nil || string(got) != msg {
			t.Fatalf("%s: got %q %v, want %q", hop.name, got, err, msg)
		}
	}

	// Then every member gets 1001, no earlier than the delay, and run
	// returns nil.
	for _, m := range []*websocket.Conn{a, b, c} {
		for {
			_, _, err := m.Read(ctx)
			if err == nil {
				continue // a's copy of c's message
			}
			if got := websocket.CloseStatus(err); got != websocket.StatusGoingAway {
				t.Fatalf("got close %v (%v), want 1001", got, err)
			}
			break
		}
	}
	if elapsed := time.Since(signalled); elapsed < delay {
		t.Errorf("members closed %v after the signal, want -drain-delay %v or more", elapsed, delay)
	}
	if err := <-stopped; err != nil {
		t.Fatalf("run returned %v, want nil", err)
	}
}

// breakableListener is a real listener whose Accept fails for good once
// broken, as one whose socket the kernel took away would.
type breakableListener struct {
	net.Listener
	broken atomic.Bool
}

var errAcceptBroken = errors.New("accept tcp: the listener broke")

func (l *breakableListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if l.broken.Load() {
		if c != nil {
			c.Close()
		}
		return nil, errAcceptBroken
	}
	return c, err
}

func (l *breakableListener) breakNow() {
	l.broken.Store(true)
	l.Listener.Close() // wakes Accept
}

func TestServeFailureShutsDown(t *testing.T) {
	lns := make(chan *breakableListener, 1)
	listen = func(network, addr string) (net.Listener, error) {
		ln, err := net.Listen(network, addr)
		if err != nil {
			return nil, err
		}
		bl := &breakableListener{Listener: ln}
		lns <- bl
		return bl, nil
	}
	t.Cleanup(func() { listen = net.Listen })

	base, lines, stop := startProgram(t, "-bcrypt-cost", "4")
	ln := <-lns
	join := joinNewLobby(t, base)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m, _, err := websocket.Dial(ctx, join, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.CloseNow()

	ln.breakNow()
	// Serving failed: the member still gets 1001, and run returns the
	// error after shutting the router down.
	if _, _, err := m.Read(ctx); websocket.CloseStatus(err) != websocket.StatusGoingAway {
		t.Fatalf("got close %v, want 1001", err)
	}
	waitLog(t, lines, "serving failed")
	waitLog(t, lines, "stopped")
	if err := stop(); !errors.Is(err, errAcceptBroken) {
		t.Fatalf("run returned %v, want %v", err, errAcceptBroken)
	}
}

// TestMain keeps the registrations of every test in memory unless the test
// asks for a file (-data on its command line wins over the environment):
// the default, wsrouter.db in the working directory, would be shared by the
// tests and left in the source tree.
func TestMain(m *testing.M) {
	if _, ok := os.LookupEnv("WSROUTER_DATA"); !ok {
		os.Setenv("WSROUTER_DATA", "")
	}
	os.Exit(m.Run())
}
