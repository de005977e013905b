package router

import (
	"sync"

	"wsrouter/registry"
)

// msgOverhead is what a queued message is charged beyond its payload, so that
// a flood of tiny messages is bounded as well as a few big ones.
const msgOverhead = 64

// sendQueue is a member's bounded send queue, bounded in bytes rather than
// messages: memory is what a slow consumer costs. It grows only while it
// holds messages, so an idle connection keeps no buffer. The writer takes
// everything queued at once, which lets it coalesce a burst into one write.
type sendQueue struct {
	max   int           // byte budget; immutable
	ready chan struct{} // capacity 1: a nudge for the writer

	mu    sync.Mutex
	msgs  []registry.Message // guarded by mu
	bytes int                // guarded by mu
}

func newSendQueue(max int) *sendQueue {
	return &sendQueue{max: max, ready: make(chan struct{}, 1)}
}

// push queues msg unless that would exceed the budget. An empty queue always
// takes one message, so a message up to -max-message always fits.
func (q *sendQueue) push(msg registry.Message) bool {
	cost := len(msg.Data) + msgOverhead
	q.mu.Lock()
	if len(q.msgs) > 0 && q.bytes+cost > q.max {
		q.mu.Unlock()
		return false
	}
	q.msgs = append(q.msgs, msg)
	q.bytes += cost
	q.mu.Unlock()
	select {
	case q.ready <- struct{}{}:
	default:
	}
	return true
}

// take returns every queued message, handing the queue spare (emptied by the
// caller) to reuse, so that a busy connection does not allocate per batch.
func (q *sendQueue) take(spare []registry.Message) []registry.Message {
	clear(spare[:cap(spare)]) // drop references to sent payloads
	q.mu.Lock()
	msgs := q.msgs
	q.msgs = spare[:0]
	q.bytes = 0
	q.mu.Unlock()
	return msgs
}
