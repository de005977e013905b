package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// natsServerMode is the hidden first argument that runs a NATS server with
// JetStream for -nodes: the cluster's NATS, in a process of its own so that
// its CPU and memory are counted with the servers', not the load
// generator's. -addr is its monitoring port (its /healthz tells when it is
// ready), -port its client port.
const natsServerMode = "natsserver"

func runNATSServer(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet(natsServerMode, flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:8222", "monitoring address")
	port := fs.Int("port", 4222, "client port on 127.0.0.1")
	store := fs.String("store", "", "JetStream store directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	host, mport, err := splitHostPort(*addr)
	if err != nil {
		return err
	}
	srv, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: *port, HTTPHost: host, HTTPPort: mport,
		JetStream: true, StoreDir: *store, NoSigs: true, NoLog: true,
	})
	if err != nil {
		return err
	}
	go srv.Start()
	if !srv.ReadyForConnections(20 * time.Second) {
		return errors.New("nats server not ready within 20s")
	}
	<-ctx.Done()
	srv.Shutdown()
	srv.WaitForShutdown()
	return nil
}

func splitHostPort(addr string) (string, int, error) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	return host, port, err
}

// startCluster starts a NATS server and n wsrouter nodes on it, each with
// args; the nodes come first in the returned list, NATS last.
func startCluster(ctx context.Context, n int, bins binaries, args []string, tmp string) ([]*serverProc, error) {
	var procs []*serverProc
	fail := func(err error) ([]*serverProc, error) {
		for _, p := range procs {
			p.kill()
		}
		return nil, err
	}
	clientAddr, err := freePort()
	if err != nil {
		return nil, err
	}
	_, port, _ := splitHostPort(clientAddr)
	store, err := os.MkdirTemp(tmp, "nats-")
	if err != nil {
		return nil, err
	}
	natsProc, err := startServer(ctx, "nats", bins.ref, []string{natsServerMode, "-port", strconv.Itoa(port), "-store", store}, tmp)
	if err != nil {
		return nil, err
	}
	procs = append(procs, natsProc)
	url := "nats://" + clientAddr
	cluster := "bench" + randHex(4)
	for i := range n {
		p, err := startServer(ctx, fmt.Sprintf("%s-%d", kindWsrouter, i), bins.server, append(append([]string(nil), args...), "-nats", url, "-cluster", cluster), tmp)
		if err != nil {
			return fail(err)
		}
		procs = append(procs, p)
	}
	// Nodes first, NATS last.
	return append(procs[1:], natsProc), nil
}
