package main

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"wsrouter/client"
	"wsrouter/registry"
	"wsrouter/router"
)

// TestBackend runs the example against a real router: a guest is refused
// at its connect, "ping" is answered "pong" through /send, and "bye" closes
// the member with 4100 through DELETE /member.
func TestBackend(t *testing.T) {
	rt := router.New(router.Config{Webhooks: router.WebhookConfig{Allow: "127.0.0.1"},
		Registry: registry.Config{BcryptCost: 4, GCGrace: time.Hour}}, nil)
	srv := httptest.NewServer(rt)
	defer srv.Close()
	t.Setenv("WSR_KEY", "member-key")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() { done <- run(ctx, srv.URL, "127.0.0.1:0", pw); pw.Close() }()
	line, err := bufio.NewReader(pr).ReadString('\n')
	if err != nil {
		t.Fatalf("no registration line: %v (%v)", err, <-done)
	}
	go io.Copy(io.Discard, pr)
	id := strings.TrimSuffix(strings.Fields(line)[1], ";")

	if _, err := client.Dial(ctx, client.Options{URL: srv.URL, ID: id, Key: os.Getenv("WSR_KEY"), Name: "guest-1"}); !errors.Is(err, client.ErrForbidden) {
		t.Fatalf("a guest: %v, want refused (403)", err)
	}
	states := make(chan client.State, 8)
	alice, err := client.Dial(ctx, client.Options{URL: srv.URL, ID: id, Key: os.Getenv("WSR_KEY"), Name: "alice",
		OnState: func(s client.State) { states <- s }})
	if err != nil {
		t.Fatal(err)
	}
	alice.Write(ctx, websocket.MessageText, []byte("ping"))
	if m, err := alice.Read(ctx); err != nil || string(m.Data) != "pong" {
		t.Fatalf("after ping: %q %v", m.Data, err)
	}
	alice.Write(ctx, websocket.MessageText, []byte("bye"))
	for s := range states {
		if s.Kind == client.Closed {
			if !errors.Is(s.Err, client.ErrClosedByBackend) || !strings.Contains(s.Err.Error(), "4100") {
				t.Fatalf("closed with %v, want 4100 from the backend", s.Err)
			}
			break
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
