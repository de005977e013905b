// Package clustertest runs an embedded NATS server with JetStream for the
// cluster's tests: loopback, a temporary store, no outside service.
package clustertest

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// NATS is an embedded NATS server that a test can stop and start again on
// the same port and store.
type NATS struct {
	t    testing.TB
	opts server.Options
	srv  *server.Server
}

// Start starts a NATS server with JetStream on a free loopback port; it is
// shut down when the test ends.
func Start(t testing.TB) *NATS {
	t.Helper()
	n := &NATS{t: t, opts: server.Options{
		Host:      "127.0.0.1",
		Port:      server.RANDOM_PORT,
		JetStream: true,
		StoreDir:  t.TempDir(),
		NoLog:     true,
		NoSigs:    true,
		// The default 1 MB, so that the router's limits meet NATS's.
		MaxPayload: 1 << 20,
	}}
	n.start()
	n.opts.Port = n.srv.Addr().(*net.TCPAddr).Port
	t.Cleanup(n.Stop)
	return n
}

func (n *NATS) start() {
	n.t.Helper()
	opts := n.opts
	srv, err := server.NewServer(&opts)
	if err != nil {
		n.t.Fatalf("nats server: %v", err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(20 * time.Second) {
		n.t.Fatal("nats server not ready in 20 s")
	}
	n.srv = srv
}

// URL is the server's client URL.
func (n *NATS) URL() string { return fmt.Sprintf("nats://127.0.0.1:%d", n.opts.Port) }

// Stop shuts the server down (its store stays).
func (n *NATS) Stop() {
	if n.srv != nil {
		n.srv.Shutdown()
		n.srv.WaitForShutdown()
		n.srv = nil
	}
}

// Restart starts the server again on its port and store.
func (n *NATS) Restart() {
	n.t.Helper()
	n.Stop()
	n.start()
}
