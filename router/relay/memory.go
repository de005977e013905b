package relay

import (
	"io"
	"sync"
)

// memory counts the bytes of relayed requests in memory (bodies as
// they arrive, then frames until written or dropped) against a limit for
// the process and a share of it for each client address (an eighth, or four
// bodies' worth if that is more), so that one address cannot take it all.
type memory struct {
	max, maxPerClient int64

	mu       sync.Mutex
	total    int64            // guarded by mu
	byClient map[string]int64 // guarded by mu; only addresses holding some
}

func newMemory(limit, maxBody int64) *memory {
	return &memory{
		max:          limit,
		maxPerClient: max(limit/8, 4*maxBody),
		byClient:     map[string]int64{},
	}
}

// charge counts n more bytes for client, or refuses them (ErrMemory).
func (m *memory) charge(client string, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.total+n > m.max || m.byClient[client]+n > m.maxPerClient {
		return ErrMemory
	}
	m.total += n
	m.byClient[client] += n
	return nil
}

// release gives back n bytes charged for client.
func (m *memory) release(client string, n int64) {
	if n == 0 {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.total -= n
	if m.byClient[client] -= n; m.byClient[client] <= 0 {
		delete(m.byClient, client)
	}
}

// inUse returns the bytes charged.
func (m *memory) inUse() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.total
}

// chargedReader charges what it reads to client; n is what it charged.
type chargedReader struct {
	r      io.Reader
	mem    *memory
	client string
	n      int64
}

func (cr *chargedReader) Read(p []byte) (int, error) {
	k, err := cr.r.Read(p)
	if k > 0 {
		if e := cr.mem.charge(cr.client, int64(k)); e != nil {
			return 0, e
		}
		cr.n += int64(k)
	}
	return k, err
}
