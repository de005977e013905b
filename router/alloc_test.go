package router

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// rawMember is a WebSocket client without a WebSocket library: it performs
// the upgrade by hand, then either writes pre-encoded frames or counts the
// bytes it receives. Neither allocates per message, so what the process
// allocates while messages flow is the server's doing.
type rawMember struct {
	nc   net.Conn
	br   *bufio.Reader
	got  atomic.Int64
	more chan struct{} // capacity 1: got grew
}

func dialRaw(t testing.TB, ts *testServer, id string) *rawMember {
	t.Helper()
	nc, err := net.Dial("tcp", strings.TrimPrefix(ts.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	q := url.Values{"id": {id}, "key": {testKey}}
	fmt.Fprintf(nc, "GET /connect?%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", q.Encode())
	br := bufio.NewReader(nc)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	return &rawMember{nc: nc, br: br, more: make(chan struct{}, 1)}
}

// count reads and counts bytes until the connection ends.
func (m *rawMember) count() {
	buf := make([]byte, 64<<10)
	for {
		n, err := m.br.Read(buf)
		m.got.Add(int64(n))
		select {
		case m.more <- struct{}{}:
		default:
		}
		if err != nil {
			return
		}
	}
}

// maskedTextFrame encodes a client text frame of n bytes.
func maskedTextFrame(n int) []byte {
	f := []byte{0x81, 0x80 | 126, 0, 0, 1, 2, 3, 4}
	binary.BigEndian.PutUint16(f[2:], uint16(n))
	key := f[4:8]
	for i := range n {
		f = append(f, byte('a'+i%26)^key[i%4])
	}
	return f
}

// TestForwardAllocations guards the allocations per forwarded message: one
// sender, ten receivers, 256-byte messages through a real server on
// loopback. Reading a message allocates its payload once, shared by every
// receiver; queueing and writing allocate nothing per receiver in the
// steady state.
func TestForwardAllocations(t *testing.T) {
	if testing.Short() {
		t.Skip("measures a few thousand messages")
	}
	ts := newTestServer(t, Config{PingInterval: -1})
	id := ts.register(t, "lobby")
	const receivers, size = 10, 256
	rs := make([]*rawMember, receivers)
	for i := range rs {
		rs[i] = dialRaw(t, ts, id)
		go rs[i].count()
	}
	sender := dialRaw(t, ts, id)
	go sender.count()
	frame := maskedTextFrame(size)
	delivered := int64(size + 4) // server frames: 4-byte header, unmasked

	send := func(n int) {
		var want []int64
		for _, r := range rs {
			want = append(want, r.got.Load()+int64(n)*delivered)
		}
		for range n {
			if _, err := sender.nc.Write(frame); err != nil {
				t.Fatal(err)
			}
		}
		deadline := time.After(testTimeout)
		for i, r := range rs {
			for r.got.Load() < want[i] {
				select {
				case <-r.more:
				case <-deadline:
					t.Fatalf("receiver %d got %d bytes, want %d", i, r.got.Load(), want[i])
				}
			}
		}
	}
	send(500) // warm up: queues, pools and writers reach their steady state
	const n = 3000
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	send(n)
	runtime.ReadMemStats(&after)
	perMsg := float64(after.Mallocs-before.Mallocs) / n
	t.Logf("%.2f allocations per message forwarded to %d receivers (%.3f per delivery)", perMsg, receivers, perMsg/receivers)
	limit := 1.5
	if raceEnabled {
		limit = 5
	}
	if perMsg > limit {
		t.Fatalf("got %.2f allocations per message, want at most %v", perMsg, limit)
	}
}
