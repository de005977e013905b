package router

import (
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"
	"wsrouter/router/relay"
)

// BenchmarkFanout forwards 256-byte messages from one sender to every other
// member of a lobby over loopback. The members are raw sockets that only
// count bytes, so the figures are the server's. Run with
// go test -run XXX -bench Fanout ./router.
func BenchmarkFanout(b *testing.B) {
	for _, members := range []int{10, 100, 1000} {
		b.Run(fmt.Sprintf("members=%d", members), func(b *testing.B) {
			ts := newTestServer(b, Config{PingInterval: -1, Registry: regCfgKeep()})
			id := ts.register(b, "lobby")
			rs := make([]*rawMember, members-1)
			for i := range rs {
				rs[i] = dialRaw(b, ts, id)
				go rs[i].count()
			}
			sender := dialRaw(b, ts, id)
			go sender.count()
			frame := maskedTextFrame(256)
			const delivered = 256 + 4

			// The sender keeps at most window messages in flight, as a
			// well-behaved client would: without flow control the
			// receivers' queues overflow and they are (rightly) closed as
			// slow consumers.
			const window = 128
			deadline := time.After(time.Minute)
			waitAll := func(n int) {
				for _, r := range rs {
					for r.got.Load() < int64(n)*delivered {
						select {
						case <-r.more:
						case <-deadline:
							b.Fatalf("got %d bytes, want %d", r.got.Load(), int64(n)*delivered)
						}
					}
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			start := time.Now()
			for sent := 0; sent < b.N; {
				n := min(window, b.N-sent)
				for range n {
					if _, err := sender.nc.Write(frame); err != nil {
						b.Fatal(err)
					}
				}
				sent += n
				waitAll(sent - window/2)
			}
			waitAll(b.N)
			elapsed := time.Since(start)
			b.ReportMetric(float64(b.N)*float64(len(rs))/elapsed.Seconds(), "deliveries/s")
		})
	}
}

// BenchmarkRelay measures HTTP round trips through /relay to a host that
// answers at once.
func BenchmarkRelay(b *testing.B) {
	ts := newTestServer(b, Config{PingInterval: -1, Registry: regCfgKeep()})
	id := ts.register(b, "hostclient")
	ts.device(b, id, func(f relay.Request) string {
		return reply(f, map[string]any{"type": "json", "content": map[string]any{"t": 21.5}})
	})
	url := ts.URL + relayURL(id, "/reading", nil)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := http.Get(url)
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				b.Errorf("got %d", resp.StatusCode)
				return
			}
		}
	})
}
