package main

import (
	"context"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"wsrouter/registry/cluster/clustertest"
)

// TestClusterProgram runs the whole program twice as two nodes of one
// cluster: a registration made on one is joined on the other, a token
// minted on one admits on the other (the token key is the cluster's), and
// messages cross.
func TestClusterProgram(t *testing.T) {
	ns := clustertest.Start(t)
	a, _, _ := startProgram(t, "-nats", ns.URL(), "-cluster", "prog", "-bcrypt-cost", "4")
	b, _, _ := startProgram(t, "-nats", ns.URL(), "-cluster", "prog", "-bcrypt-cost", "4")

	code, id := get(t, a+"/register?reg_type=hostclient&key=k&host_key=h")
	if code != 200 {
		t.Fatalf("register: %d %s", code, id)
	}
	resp, err := http.PostForm(a+"/token", url.Values{"id": {id}, "host_key": {"h"}, "role": {"client"}})
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("token: %d %s", resp.StatusCode, tok)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	dial := func(base, q string) *websocket.Conn {
		t.Helper()
		ws := "ws" + strings.TrimPrefix(base, "http") + "/connect?" + q
		// The other node learns of the registration through its watch:
		// a 404 means not yet.
		for {
			c, resp, err := websocket.Dial(ctx, ws, nil)
			if err == nil {
				t.Cleanup(func() { c.CloseNow() })
				return c
			}
			if resp == nil || resp.StatusCode != 404 || ctx.Err() != nil {
				t.Fatalf("connect %s: %v", q, err)
			}
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	host := dial(a, "id="+id+"&key=k&sock_type=host")
	client := dial(b, "id="+id+"&token="+url.QueryEscape(string(tok)))

	// The host's node may not have seen the client's node yet: the
	// client says hello until the host hears it.
	go func() {
		for ctx.Err() == nil {
			if client.Write(ctx, websocket.MessageText, []byte("hello")) != nil {
				return
			}
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	if _, m, err := host.Read(ctx); err != nil || string(m) != "hello" {
		t.Fatalf("host on A: %q %v, want the client's hello from B", m, err)
	}
}

func TestClusterFlagErrors(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"-nats", "nats://127.0.0.1:1", "-data", "x.db"}, "-data"},
		{[]string{"-cluster", "a.b"}, "-cluster"},
		{[]string{"-cluster", ""}, "-cluster"},
		{[]string{"-nats", "nats://127.0.0.1:1"}, "NATS"}, // nobody there
		{[]string{"-nats", "nats://wsr:s3cretpw@127.0.0.1:1"}, "nats://…@127.0.0.1:1"},
	} {
		var log strings.Builder
		err := run(context.Background(), append([]string{"-addr", "127.0.0.1:0"}, c.args...), io.Discard, &log)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: got %v, want an error naming %s", c.args, err, c.want)
		}
		if strings.Contains(err.Error()+log.String(), "s3cretpw") {
			t.Errorf("%v: the NATS password is in the error or the log", c.args)
		}
	}
}
