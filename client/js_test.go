package client

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// TestJavaScriptClient runs client/js's own tests (node --test) against the
// real router binary, built here. npm ci installs their one dev dependency
// (ws, for Node 20) from the committed package-lock.json.
func TestJavaScriptClient(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("no node in CI: .ci/run installs it")
		}
		t.Skip("no node: install Node.js 20 or later to run the JavaScript client's tests")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	bin := filepath.Join(t.TempDir(), "wsrouter")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "wsrouter").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	npm := exec.CommandContext(ctx, "npm", "ci", "--no-audit", "--no-fund")
	npm.Dir = "js"
	if out, err := npm.CombinedOutput(); err != nil {
		t.Fatalf("npm ci: %v\n%s", err, out)
	}
	cmd := exec.CommandContext(ctx, node, "--test", "test/")
	cmd.Dir = "js"
	cmd.Env = append(os.Environ(), "WSROUTER_BIN="+bin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("node --test: %v\n%s", err, out)
	}
	t.Logf("%s", out)
}
