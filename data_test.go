package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"wsrouter/registry/boltstore"

	"github.com/coder/websocket"
)

// connectStatus dials /connect and returns 101 or the refusal's status.
func connectStatus(t *testing.T, base, id, key string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	u := "ws" + strings.TrimPrefix(base, "http") + "/connect?" + url.Values{"id": {id}, "key": {key}}.Encode()
	c, resp, err := websocket.Dial(ctx, u, nil)
	if err == nil {
		c.CloseNow()
		return 101
	}
	if resp == nil {
		t.Fatalf("dial %s: %v", id, err)
	}
	return resp.StatusCode
}

// register registers id (key "k-"+id) and returns the status, or -1 when
// the request failed; it may run on any goroutine.
func register(t *testing.T, base, id string) int {
	t.Helper()
	q := url.Values{"key": {"k-" + id}, "host_key": {"h-" + id}, "reg_type": {"lobby"}, "id_req": {id}}
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Get(base + "/register?" + q.Encode())
	if err != nil {
		t.Errorf("register %s: %v", id, err)
		return -1
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestDataSurvivesRestart runs the whole program twice and more on one data
// file: registrations come back with their keys, removals (by /remove and by
// GC) stay removed, and a restored id is taken.
func TestDataSurvivesRestart(t *testing.T) {
	file := filepath.Join(t.TempDir(), "wsrouter.db")
	args := []string{"-data", file, "-bcrypt-cost", "4", "-gc-grace", "0"}

	base, lines, stop := startProgram(t, args...)
	for _, id := range []string{"kept", "removed", "collected"} {
		if code := register(t, base, id); code != 200 {
			t.Fatalf("register %s: %d", id, code)
		}
	}
	q := url.Values{"id": {"removed"}, "key": {"k-removed"}, "host_key": {"h-removed"}}
	if code, body := get(t, base+"/remove?"+q.Encode()); code != 200 {
		t.Fatalf("remove: %d %q", code, body)
	}
	// A member joins and leaves: with -gc-grace 0 that removes it.
	if code := connectStatus(t, base, "collected", "k-collected"); code != 101 {
		t.Fatalf("connect collected: %d", code)
	}
	waitLog(t, lines, "removed") // removed, then collected
	waitLog(t, lines, "removed")
	if err := stop(); err != nil {
		t.Fatal(err)
	}

	// From here on an emptied registration lives on for the default grace.
	args = args[:len(args)-2]
	base, lines, stop = startProgram(t, args...)
	if rec := waitLog(t, lines, "registrations restored"); rec["count"] != 1.0 {
		t.Errorf("restored: got %v, want 1", rec["count"])
	}
	if code := connectStatus(t, base, "kept", "k-kept"); code != 101 {
		t.Errorf("connect to a restored registration with its old key: got %d, want 101", code)
	}
	if code := connectStatus(t, base, "kept", "wrong"); code != 403 {
		t.Errorf("wrong key on a restored registration: got %d, want 403", code)
	}
	for _, id := range []string{"removed", "collected"} {
		if code := connectStatus(t, base, id, "k-"+id); code != 404 {
			t.Errorf("connect to %s after a restart: got %d, want 404", id, code)
		}
	}
	if code := register(t, base, "kept"); code != 409 {
		t.Errorf("register a restored id: got %d, want 409", code)
	}
	// Removed ids are free again, and the new registration is a new one.
	if code := register(t, base, "removed"); code != 200 {
		t.Errorf("register a removed id after a restart: got %d, want 200", code)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	base, _, _ = startProgram(t, args...)
	if code := connectStatus(t, base, "removed", "k-removed"); code != 101 {
		t.Errorf("the re-registered id after another restart: got %d, want 101", code)
	}
}

// TestDataUnusedTTLAfterRestart: a restored registration counts as never
// joined, so -unused-ttl removes it unless someone joins.
func TestDataUnusedTTLAfterRestart(t *testing.T) {
	file := filepath.Join(t.TempDir(), "wsrouter.db")
	base, _, stop := startProgram(t, "-data", file, "-bcrypt-cost", "4")
	register(t, base, "idle")
	register(t, base, "back")
	stop()
	// The connect to "back" must come within the TTL, on a loaded machine.
	base, lines, _ := startProgram(t, "-data", file, "-bcrypt-cost", "4", "-unused-ttl", "4s")
	if code := connectStatus(t, base, "back", "k-back"); code != 101 {
		t.Fatalf("connect: %d", code)
	}
	rec := waitLog(t, lines, "removed")
	if rec["reg"] != "idle" || rec["cause"] != "ttl" {
		t.Fatalf("removed: got %v, want idle by ttl", rec)
	}
}

func TestDataFileRefused(t *testing.T) {
	dir := t.TempDir()
	held := filepath.Join(dir, "held.db")
	startProgram(t, "-data", held)
	err := run(t.Context(), []string{"-addr", "127.0.0.1:0", "-data", held}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), held) || !strings.Contains(err.Error(), "another wsrouter holds") {
		t.Fatalf("a second process on the file: got %v, want an error naming it and the other process", err)
	}

	corrupt := filepath.Join(dir, "corrupt.db")
	os.WriteFile(corrupt, []byte(strings.Repeat("wsrouter? ", 2000)), 0o600)
	err = run(t.Context(), []string{"-addr", "127.0.0.1:0", "-data", corrupt}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), corrupt) {
		t.Fatalf("a corrupt file: got %v, want an error naming it", err)
	}
}

// binary builds wsrouter once per test run.
var binary = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "wsrouter-bin")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "wsrouter")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build: %v\n%s", err, out)
	}
	return bin, nil
})

// startBinary starts the real binary and returns its base URL once it
// listens, and its log lines (dropped when nobody reads them).
func startBinary(t *testing.T, args ...string) (*exec.Cmd, string, <-chan string) {
	t.Helper()
	bin, err := binary()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, append([]string{"-addr", "127.0.0.1:0", "-log-format", "json"}, args...)...)
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	addr := make(chan string, 1)
	lines := make(chan string, 1000)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			var rec struct{ Msg, Addr string }
			if json.Unmarshal(sc.Bytes(), &rec) == nil && rec.Msg == "listening" {
				addr <- rec.Addr
			}
			select {
			case lines <- sc.Text():
			default:
			}
		}
	}()
	select {
	case a := <-addr:
		return cmd, "http://" + a, lines
	case <-time.After(60 * time.Second):
		t.Fatal("the binary did not start listening")
		return nil, "", nil
	}
}

// TestDataKill9: 200 registrations made at once are all there after the
// process is killed with SIGKILL the instant the last answer arrives: a 200
// from /register means the record is on disk. Several rounds on one file.
func TestDataKill9(t *testing.T) {
	file := filepath.Join(t.TempDir(), "wsrouter.db")
	args := []string{"-data", file, "-bcrypt-cost", "4", "-rate-register", "0", "-admin-token", "adm"}
	const rounds, n = 3, 200
	for round := range rounds {
		cmd, base, _ := startBinary(t, args...)
		var wg sync.WaitGroup
		codes := make(chan int, n)
		for i := range n {
			wg.Go(func() { codes <- register(t, base, fmt.Sprintf("r%d-%d", round, i)) })
		}
		wg.Wait()
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		close(codes)
		for c := range codes {
			if c != 200 {
				t.Fatalf("round %d: a register answered %d", round, c)
			}
		}

		check, base, _ := startBinary(t, args...)
		req, _ := http.NewRequest("GET", base+"/stats", nil)
		req.Header.Set("Authorization", "Bearer adm")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var stats struct {
			Registrations []struct{ ID string } `json:"registrations"`
		}
		json.NewDecoder(resp.Body).Decode(&stats)
		resp.Body.Close()
		have := map[string]bool{}
		for _, r := range stats.Registrations {
			have[r.ID] = true
		}
		for r := 0; r <= round; r++ {
			for i := range n {
				if id := fmt.Sprintf("r%d-%d", r, i); !have[id] {
					t.Fatalf("after kill -9 in round %d: %s is missing (%d registrations back)", round, id, len(have))
				}
			}
		}
		if len(have) != n*(round+1) {
			t.Fatalf("round %d: %d registrations back, want %d", round, len(have), n*(round+1))
		}
		// The next round takes the file over from this process.
		check.Process.Kill()
		check.Wait()
	}
}

// TestDataCorruptExitStatus: the real binary exits non-zero on a corrupt
// data file, naming it.
func TestDataCorruptExitStatus(t *testing.T) {
	bin, err := binary()
	if err != nil {
		t.Fatal(err)
	}
	corrupt := filepath.Join(t.TempDir(), "corrupt.db")
	os.WriteFile(corrupt, []byte(strings.Repeat("wsrouter? ", 2000)), 0o600)
	out, err := exec.Command(bin, "-addr", "127.0.0.1:0", "-data", corrupt).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() == 0 || !strings.Contains(string(out), corrupt) {
		t.Fatalf("got %v with %q, want a non-zero exit naming the file", err, out)
	}
}

// TestDataBackupWhileRunning: GET /backup with the admin token is a
// consistent copy of the file a running router holds; the backup command
// copies one no router holds.
func TestDataBackupWhileRunning(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "wsrouter.db")
	base, _, stop := startProgram(t, "-data", file, "-bcrypt-cost", "4", "-admin-token", "adm")
	register(t, base, "saved")
	if code, _ := get(t, base+"/backup"); code != 401 {
		t.Fatalf("/backup without the token: got %d, want 401", code)
	}
	req, _ := http.NewRequest("GET", base+"/backup", nil)
	req.Header.Set("Authorization", "Bearer adm")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("/backup: %v %v", resp, err)
	}
	copyPath := filepath.Join(dir, "copy.db")
	f, _ := os.Create(copyPath)
	n, err := io.Copy(f, resp.Body)
	f.Close()
	resp.Body.Close()
	if err != nil || resp.ContentLength <= 0 || n != resp.ContentLength {
		t.Fatalf("/backup: read %d bytes (%v), Content-Length %d; want the whole announced length", n, err, resp.ContentLength)
	}
	stop()

	cmdCopy := filepath.Join(dir, "cmd-copy.db")
	var out strings.Builder
	if err := run(t.Context(), []string{"backup", "-data", file, "-out", cmdCopy}, &out, io.Discard); err != nil {
		t.Fatalf("wsrouter backup: %v", err)
	}
	for _, p := range []string{copyPath, cmdCopy} {
		s, err := boltstore.Open(p)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		recs, err := s.Load(context.Background())
		s.Close()
		if err != nil || len(recs) != 1 || recs[0].ID != "saved" {
			t.Fatalf("%s holds %v, %v; want the registration saved", p, recs, err)
		}
	}
}
