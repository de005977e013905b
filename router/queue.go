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
// holds messages, so an idle connection keeps no buffer.
//
// The queue also decides when a writer goroutine runs: one is started when
// work arrives (a message or a close request) and none is running, and it
// exits when it finds the queue empty. An idle connection so has no writer
// goroutine and no stack for it. Deciding under the queue's own lock means a
// wake-up can never be lost between "queue empty" and "writer gone".
type sendQueue struct {
	max int // byte budget; immutable

	mu       sync.Mutex
	msgs     []registry.Message // guarded by mu
	bytes    int                // guarded by mu
	open     bool               // guarded by mu; writers may run (the socket is up)
	draining bool               // guarded by mu; a writer is running
	closeReq bool               // guarded by mu; a close frame is to be sent
	writers  sync.WaitGroup     // Add under mu while open
}

func newSendQueue(max int) *sendQueue {
	return &sendQueue{max: max}
}

// startLocked reports whether the caller must start a writer, and counts it.
func (q *sendQueue) startLocked() bool {
	if !q.open || q.draining || (len(q.msgs) == 0 && !q.closeReq) {
		return false
	}
	q.draining = true
	q.writers.Add(1)
	return true
}

// push queues msg unless that would exceed the budget; an empty queue always
// takes one message, so a message up to -max-message always fits. start
// says the caller must start a writer.
func (q *sendQueue) push(msg registry.Message) (ok, start bool) {
	cost := len(msg.Data) + msgOverhead
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.msgs) > 0 && q.bytes+cost > q.max {
		return false, false
	}
	q.msgs = append(q.msgs, msg)
	q.bytes += cost
	return true, q.startLocked()
}

// requestClose asks the writer to send a close frame ahead of any backlog.
func (q *sendQueue) requestClose() (start bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closeReq = true
	return q.startLocked()
}

// openWriters allows writers from now on: the socket is up.
func (q *sendQueue) openWriters() (start bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.open = true
	return q.startLocked()
}

// closeWriters stops new writers and waits for a running one to return.
func (q *sendQueue) closeWriters() {
	q.mu.Lock()
	q.open = false
	q.mu.Unlock()
	q.writers.Wait()
}

// next is the writer's step: a close request first, then every queued
// message at once (spare, emptied by the caller, becomes the new backing
// array so a busy connection does not allocate per batch). When there is
// nothing left it ends the writer's turn, and the writer must return.
func (q *sendQueue) next(spare []registry.Message) (msgs []registry.Message, closeReq bool) {
	clear(spare[:cap(spare)]) // drop references to sent payloads
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closeReq {
		// The writer sends the close and returns; draining stays set so
		// no other writer starts after it.
		return nil, true
	}
	if len(q.msgs) == 0 {
		q.draining = false
		return nil, false
	}
	msgs = q.msgs
	q.msgs = spare[:0]
	q.bytes = 0
	return msgs, false
}

// writerDone accounts for a writer that returned.
func (q *sendQueue) writerDone() { q.writers.Done() }
