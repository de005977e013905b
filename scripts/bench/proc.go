package main

import (
	"bufio"
	"context"
	"debug/buildinfo"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat. It
// is 100 on every Linux architecture Go supports (the kernel fixes it for
// the user ABI whatever CONFIG_HZ is).
const clockTicks = 100

// binaries are the programs the tool starts.
type binaries struct {
	server string // wsrouter
	ref    string // a binary with the refserver mode
	// source describes the wsrouter source built (revision, changed
	// paths); empty with -server-bin.
	source map[string]any
}

// findBinaries builds wsrouter into tmp unless -server-bin is given, and
// picks the reference binary: this program unless -ref-bin is given.
func findBinaries(ctx context.Context, o *options, tmp string, log io.Writer) (binaries, error) {
	var b binaries
	b.server = o.serverBin
	if b.server == "" {
		root, err := moduleRoot(ctx)
		if err != nil {
			return b, err
		}
		b.server = filepath.Join(tmp, "wsrouter")
		fmt.Fprintf(log, "building wsrouter from %s …\n", root)
		cmd := exec.CommandContext(ctx, "go", "build", "-o", b.server, ".")
		cmd.Dir = root
		cmd.Stdout, cmd.Stderr = log, log
		if err := cmd.Run(); err != nil {
			return b, fmt.Errorf("go build wsrouter: %w", err)
		}
		b.source = gitSource(ctx, root)
	}
	b.ref = o.refBin
	if b.ref == "" {
		exe, err := os.Executable()
		if err != nil {
			return b, fmt.Errorf("find own binary for the reference: %w", err)
		}
		b.ref = exe
	}
	return b, nil
}

// gitSource describes the working tree the server was built from: the
// commit and the paths with changes on top of it (the build is not stamped
// when GOFLAGS has -buildvcs=false). Nil outside a git checkout.
func gitSource(ctx context.Context, root string) map[string]any {
	rev, err := exec.CommandContext(ctx, "git", "-C", root, "rev-parse", "HEAD").Output()
	if err != nil {
		return nil
	}
	m := map[string]any{"server_vcs_revision": strings.TrimSpace(string(rev))}
	st, err := exec.CommandContext(ctx, "git", "-C", root, "status", "--porcelain").Output()
	if err == nil {
		changed := strings.Split(strings.TrimRight(string(st), "\n"), "\n")
		if len(changed) == 1 && changed[0] == "" {
			changed = nil
		}
		m["server_vcs_modified"] = len(changed) > 0
		if len(changed) > 20 {
			changed = append(changed[:20], "…")
		}
		m["server_tree_changes"] = changed
	}
	return m
}

// moduleRoot returns the directory of the wsrouter module's go.mod.
func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside the wsrouter module: run from the repository or pass -server-bin")
	}
	return filepath.Dir(mod), nil
}

// wsrouterArgs are the wsrouter flags: the tool's, the scenario's, then
// -server-flags, which win as the last of repeated flags does; -addr is
// added at start.
func wsrouterArgs(o *options, scenario []string) []string {
	args := []string{"-log-level", o.logLevel, "-shutdown-timeout", "5s"}
	args = append(args, scenario...)
	return append(args, splitFlags(o.serverFlags)...)
}

func refArgs(o *options) []string {
	return []string{"-queue", strconv.Itoa(o.refQueue)}
}

// serverEnv returns the environment of a server child: the tool's, minus
// any WSROUTER_* variable (so the user's shell cannot change the server's
// configuration unseen), plus per-IP rate limits and the per-member frame
// rate turned off: their defaults (10 connects/s per address, 1,000 frames/s
// per member) would measure the limiters instead of the router.
// Variables for flags a server does not have are ignored by it.
func serverEnv(base []string) []string {
	var env []string
	for _, kv := range base {
		if !strings.HasPrefix(kv, "WSROUTER_") {
			env = append(env, kv)
		}
	}
	return append(env,
		"WSROUTER_RATE_REGISTER=0",
		"WSROUTER_RATE_CONNECT=0",
		"WSROUTER_RATE_RELAY=0",
		"WSROUTER_RATE_BADKEY=0",
		"WSROUTER_RATE_MESSAGE=0",
		// Memory only, unless a scenario passes -data: a data file would
		// carry registrations from one run into the next.
		"WSROUTER_DATA=",
	)
}

// serverProc is a running server child.
type serverProc struct {
	kind    string
	cmd     *exec.Cmd
	addr    string // host:port on 127.0.0.1
	logPath string
	logFile *os.File
	done    chan struct{} // closed when the process has exited
	waitErr error         // set before done is closed
}

// startServer starts bin with args plus -addr on a free loopback port and
// waits until /healthz answers 200. The process dies with ctx, and with
// this process (Pdeathsig) should the tool be killed outright.
func startServer(ctx context.Context, kind, bin string, args []string, tmp string) (*serverProc, error) {
	addr, err := freePort()
	if err != nil {
		return nil, err
	}
	return startServerAt(ctx, kind, bin, args, tmp, addr)
}

// startServerAt is startServer on a given address (a restart keeps its
// predecessor's, so that clients come back to it).
func startServerAt(ctx context.Context, kind, bin string, args []string, tmp, addr string) (*serverProc, error) {
	logf, err := os.CreateTemp(tmp, kind+"-*.log")
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, bin, append(append([]string(nil), args...), "-addr", addr)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = serverEnv(os.Environ())
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 2 * time.Second
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", kind, err)
	}
	p := &serverProc{kind: kind, cmd: cmd, addr: addr, logPath: logf.Name(), logFile: logf, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	if err := p.waitHealthy(ctx, 15*time.Second); err != nil {
		p.kill()
		return nil, fmt.Errorf("%s did not come up: %w (log: %s)", kind, err, p.logTail())
	}
	return p, nil
}

// freePort returns a loopback address with a port that was free a moment
// ago.
func freePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func (p *serverProc) waitHealthy(ctx context.Context, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	client := &http.Client{Timeout: time.Second}
	for {
		select {
		case <-p.done:
			return fmt.Errorf("exited: %v", p.waitErr)
		default:
		}
		resp, err := client.Get("http://" + p.addr + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no healthy answer within %v (last error: %v)", limit, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// alive reports whether the process is still running.
func (p *serverProc) alive() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// cpu returns the process's CPU time so far, user plus system.
func (p *serverProc) cpu() (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces;
	// fields after it start with the state (field 3). utime and stime are
	// fields 14 and 15.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("malformed /proc stat")
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, errors.New("short /proc stat")
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(ut+st) * time.Second / clockTicks, nil
}

// rss returns the process's resident set size in bytes (VmRSS).
func (p *serverProc) rss() (int64, error) {
	v, err := procStatusField(p.cmd.Process.Pid, "VmRSS:")
	if err != nil {
		return 0, err
	}
	kb, err := strconv.ParseInt(strings.TrimSuffix(v, " kB"), 10, 64)
	return kb << 10, err
}

func procStatusField(pid int, name string) (string, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name); ok {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("no %s in /proc/%d/status", name, pid)
}

// nofile returns the child's open-file limits as "soft/hard", to show it
// inherited the raised limit.
func (p *serverProc) nofile() string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", p.cmd.Process.Pid))
	if err != nil {
		return ""
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Max open files"); ok {
			f := strings.Fields(rest)
			if len(f) >= 2 {
				return f[0] + "/" + f[1]
			}
		}
	}
	return ""
}

// scrapeMetrics returns the wsrouter /metrics samples that tell how the run
// went on the server's side: closes by code, key checks by kind, rate
// limiting, relayed requests by status.
func (p *serverProc) scrapeMetrics() map[string]string {
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get("http://" + p.addr + "/metrics")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		for _, prefix := range []string{"wsrouter_closes_total", "wsrouter_key_check_seconds_count", "wsrouter_rate_limited_total", "wsrouter_relay_requests_total"} {
			if strings.HasPrefix(line, prefix) {
				if i := strings.LastIndexByte(line, ' '); i > 0 {
					out[line[:i]] = line[i+1:]
				}
			}
		}
	}
	return out
}

// stop asks the server to shut down (SIGTERM) and waits for it, killing it
// if it takes too long. It reports an unclean exit.
func (p *serverProc) stop() error {
	defer p.logFile.Close()
	if !p.alive() {
		return fmt.Errorf("exited during the run: %v", p.waitErr)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
		return errors.New("did not exit within 10s of SIGTERM; killed")
	}
	if p.waitErr != nil {
		return fmt.Errorf("exit after SIGTERM: %v", p.waitErr)
	}
	return nil
}

// kill ends the process at once if it still runs. It is the deferred
// backstop; stop is the orderly way.
func (p *serverProc) kill() {
	if p.alive() {
		p.cmd.Process.Kill()
		<-p.done
	}
	p.logFile.Close()
}

// logProblems returns the server's log lines that signal trouble: slog
// WARN and ERROR records, panics and fatal runtime errors.
func (p *serverProc) logProblems() []string {
	f, err := os.Open(p.logPath)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if strings.Contains(l, "level=WARN") || strings.Contains(l, "level=ERROR") ||
			strings.Contains(l, `"level":"WARN"`) || strings.Contains(l, `"level":"ERROR"`) ||
			strings.HasPrefix(l, "panic:") || strings.HasPrefix(l, "fatal error:") {
			out = append(out, l)
		}
	}
	return out
}

// logTail returns the end of the server's log, for error messages.
func (p *serverProc) logTail() string {
	b, _ := os.ReadFile(p.logPath)
	if len(b) > 600 {
		b = b[len(b)-600:]
	}
	return strings.TrimSpace(string(b))
}

// raiseNoFile raises this process's soft RLIMIT_NOFILE to the hard limit
// and returns it. Calling Setrlimit explicitly also stops the Go runtime
// from restoring the original soft limit in children (it does so by
// default since Go 1.19), so the servers started afterwards inherit it.
func raiseNoFile() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("getrlimit: %w", err)
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("setrlimit: %w", err)
	}
	return lim.Cur, nil
}

// machineInfo describes where the numbers were made and what was measured.
func machineInfo(bins binaries) map[string]any {
	serverBin := bins.server
	m := map[string]any{
		"nproc":      runtime.NumCPU(),
		"gomaxprocs": runtime.GOMAXPROCS(0),
		"go_version": runtime.Version(),
		"goos_arch":  runtime.GOOS + "/" + runtime.GOARCH,
	}
	if bi, err := buildinfo.ReadFile(serverBin); err == nil {
		m["server_go_version"] = bi.GoVersion
		// Which source was measured: the commit, and whether the
		// working tree had changes on top of it.
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				m["server_vcs_revision"] = s.Value
			case "vcs.modified":
				m["server_vcs_modified"] = s.Value == "true"
			}
		}
	}
	for k, v := range bins.source {
		m[k] = v
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m["cpu_model"] = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m["kernel"] = strings.TrimSpace(string(b))
	}
	// Others may share the machine: the load at the start says how much.
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		m["loadavg_at_start"] = strings.Join(strings.Fields(string(b))[:3], " ")
	}
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil {
		m["nofile_limit"] = lim.Cur
	}
	return m
}

// processCPU returns this process's CPU time so far (the load generator's),
// to tell whether the clients rather than the server were the bottleneck.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
