package router

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/coder/websocket"

	"wsrouter/registry"
)

// eventually waits for cond, checking it every few milliseconds, within the
// test timeout: for state that has no event to wait on.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestInvalidUTF8Closed: a text message that is not UTF-8 closes its sender
// with 1007, and no receiver sees it (browsers would fail their connection
// on it): in a lobby, and from a client to a hostclient's host.
func TestInvalidUTF8Closed(t *testing.T) {
	for _, tt := range []struct {
		regType, from, to string
	}{
		{"lobby", "", ""},
		{"hostclient", "client", "host"},
		{"hostclient", "host", "client"},
	} {
		t.Run(tt.regType+"/"+tt.from, func(t *testing.T) {
			ts := newTestServer(t, Config{Registry: regCfgKeep()})
			id := ts.register(t, tt.regType)
			bad, recv := ts.dial(t, id, tt.from), ts.dial(t, id, tt.to)
			other := ts.dial(t, id, tt.from)
			ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
			defer cancel()
			if err := bad.Write(ctx, websocket.MessageText, []byte("ok \xff\xfe")); err != nil {
				t.Fatal(err)
			}
			if code, reason := closeStatus(t, bad); code != codeInvalidUTF8 || reason == "" {
				t.Fatalf("sender closed with %d %q, want 1007 with a reason", code, reason)
			}
			// Binary messages carry any bytes.
			if err := other.Write(ctx, websocket.MessageBinary, []byte("\xff\xfe")); err != nil {
				t.Fatal(err)
			}
			if typ, got := read(t, recv); typ != websocket.MessageBinary || got != "\xff\xfe" {
				t.Fatalf("receiver: got %v %q, want the binary message (the invalid text never forwarded)", typ, got)
			}
			if got := metricValue(t, ts, "wsrouter_closes_total", "code", "1007"); got != 1 {
				t.Errorf("closes{code=1007}: got %v, want 1", got)
			}
		})
	}
}

// TestMessageRateClosed: a member sending data frames, or pings, faster than
// -rate-message allows is closed with 1008; the others are unaffected.
func TestMessageRateClosed(t *testing.T) {
	for _, kind := range []string{"data", "ping"} {
		t.Run(kind, func(t *testing.T) {
			ts := newTestServer(t, Config{RateMessage: Limit{Rate: 5, Burst: 20}, Registry: regCfgKeep()})
			id := ts.register(t, "lobby")
			flood, recv := ts.dial(t, id, ""), ts.dial(t, id, "")
			ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
			defer cancel()
			floodDone := make(chan struct{})
			go func() {
				defer close(floodDone)
				for i := 0; i < 10000; i++ {
					var err error
					if kind == "data" {
						err = flood.Write(ctx, websocket.MessageText, []byte("spam"))
					} else {
						pctx, pcancel := context.WithTimeout(ctx, 200*time.Millisecond)
						err = flood.Ping(pctx)
						pcancel()
						if ctx.Err() == nil && err != nil && pctx.Err() != nil {
							continue // no pong: the server stopped answering
						}
					}
					if err != nil {
						return
					}
				}
			}()
			code, reason := closeStatus(t, flood)
			<-floodDone
			if code != codePolicy || reason != "message rate exceeded" {
				t.Fatalf("flooding member closed with %d %q, want 1008 message rate exceeded", code, reason)
			}
			// At most the burst (and what the rate added meanwhile) was
			// forwarded; the receiver is still served.
			write(t, ts.dial(t, id, ""), "after")
			n := 0
			for {
				if _, m := read(t, recv); m == "after" {
					break
				}
				n++
			}
			if kind == "ping" && n != 0 {
				t.Errorf("receiver got %d messages from a ping flood, want 0", n)
			}
			if kind == "data" && n > 40 {
				t.Errorf("receiver got %d flood messages, want about the burst of 20", n)
			}
		})
	}
}

// TestSlowConsumerCountedOnce: a slow consumer whose stalled write then
// times out is one close, 4008, not also a write failure.
func TestSlowConsumerCountedOnce(t *testing.T) {
	// The queue overflows long before the stalled write times out, even on
	// a loaded machine; then the write times out and must not count again.
	ts := newTestServer(t, Config{SendQueueBytes: 256 << 10, WriteTimeout: 2 * time.Second, Registry: regCfgKeep()})
	id := ts.register(t, "lobby")
	sender := ts.dial(t, id, "")
	ts.dial(t, id, "") // never reads
	reg := mustGet(t, ts, id)
	payload := bytes.Repeat([]byte("x"), 64<<10)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	for sent := 0; metricValue(t, ts, "wsrouter_closes_total", "code", "4008") == 0; sent++ {
		if err := sender.Write(ctx, websocket.MessageBinary, payload); err != nil {
			t.Fatalf("write %d: %v", sent, err)
		}
	}
	eventually(t, "the slow member to be dropped", func() bool {
		_, _, members := reg.Counts()
		return members == 1
	})
	if got := metricValue(t, ts, "wsrouter_closes_total", "code", "write_failed"); got != 0 {
		t.Errorf("closes{code=write_failed}: got %v, want 0 (counted as 4008 only)", got)
	}
}

// TestQueueForgetsBurstCapacity: after a burst is written, the queue keeps
// at most maxKeptBatch slots, not the burst's backing array.
func TestQueueForgetsBurstCapacity(t *testing.T) {
	q := newSendQueue(1<<30, 1<<20)
	q.openWriters()
	for range 60000 {
		q.push(registry.Message{Data: []byte("x")})
	}
	batch, _, step := q.next(nil)
	if step != stepWrite || len(batch) != 60000 {
		t.Fatalf("next: got %d messages, step %v; want the burst", len(batch), step)
	}
	if _, _, step := q.next(batch); step != stepPark {
		t.Fatalf("next after the burst: got step %v, want park", step)
	}
	q.mu.Lock()
	kept := cap(q.msgs)
	q.mu.Unlock()
	if kept > maxKeptBatch {
		t.Fatalf("queue keeps %d slots after a burst, want at most %d", kept, maxKeptBatch)
	}
}
