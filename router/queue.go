package router

import (
	"slices"
	"sync"

	"wsrouter/registry"
	"wsrouter/router/relay"
)

// maxKeptBatch is the most message slots a queue keeps for reuse between
// batches (24 bytes each): enough for a busy room's steady state.
const maxKeptBatch = 256

// msgOverhead is what a queued message is charged beyond its payload, so that
// a flood of tiny messages is bounded as well as a few big ones.
const msgOverhead = 64

// sendQueue is a member's bounded send queue, bounded in bytes rather than
// messages: memory is what a slow consumer costs. It grows only while it
// holds messages, so an idle connection keeps no buffer.
//
// The queue also decides when a writer goroutine runs: one is started when
// work arrives (a message or a close request) and none is running. When it
// finds the queue empty it parks for writerLinger, is woken by new work, and
// exits if none comes. A connection idle for longer so has no writer
// goroutine and no stack for it, while a busy one keeps its writer (and its
// grown stack) instead of starting one per message. Deciding under the
// queue's own lock means a wake-up can never be lost between "queue empty"
// and "writer gone".
type sendQueue struct {
	max      int   // byte budget; immutable
	relayMax int64 // byte budget of relay frames; immutable

	mu       sync.Mutex
	msgs     []registry.Message // guarded by mu
	bytes    int                // guarded by mu
	open     bool               // guarded by mu; writers may run (the socket is up)
	writing  bool               // guarded by mu; a writer is running (or parked)
	parked   bool               // guarded by mu; the writer waits on wake
	closeReq bool               // guarded by mu; a close frame is to be sent
	// Relay request frames wait apart from messages, on a budget of their
	// own, and leave the queue when their request ends unwritten.
	relay      []*relay.Frame // guarded by mu
	relayBytes int64          // guarded by mu
	writers    sync.WaitGroup // Add under mu while open

	wake chan struct{} // capacity 1: new work for a parked writer
}

func newSendQueue(max int, relayMax int64) *sendQueue {
	return &sendQueue{max: max, relayMax: relayMax, wake: make(chan struct{}, 1)}
}

// pushRelay queues a relay frame unless the relay budget is spent (an empty
// relay queue always takes one). start says the caller must start a writer.
func (q *sendQueue) pushRelay(f *relay.Frame) (ok, start bool) {
	n := int64(len(f.Data))
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.relay) > 0 && q.relayBytes+n > q.relayMax {
		return false, false
	}
	q.relay = append(q.relay, f)
	q.relayBytes += n
	return true, q.startLocked()
}

// dropRelay takes f out of the queue if the writer has not taken it yet,
// and lets it go: its request has ended and nobody waits for the answer. A
// frame the writer took is the writer's to let go.
func (q *sendQueue) dropRelay(f *relay.Frame) {
	q.mu.Lock()
	i := slices.Index(q.relay, f)
	if i >= 0 {
		q.relay = slices.Delete(q.relay, i, i+1)
		q.relayBytes -= int64(len(f.Data))
		if len(q.relay) == 0 {
			q.relay = nil
		}
	}
	q.mu.Unlock()
	if i >= 0 {
		f.Done()
	}
}

// startLocked reports whether the caller must start a writer, and counts it;
// a parked writer is woken instead.
func (q *sendQueue) startLocked() bool {
	if !q.open || (len(q.msgs) == 0 && len(q.relay) == 0 && !q.closeReq) {
		return false
	}
	if q.writing {
		q.wakeLocked()
		return false
	}
	q.writing = true
	q.writers.Add(1)
	return true
}

// push queues msg unless that would exceed the budget; an empty queue always
// takes one message, so a message up to -max-message always fits. start says
// the caller must start a writer.
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

func (q *sendQueue) wakeLocked() {
	if q.parked {
		q.parked = false
		select {
		case q.wake <- struct{}{}:
		default:
		}
	}
}

// closeWriters stops new writers and waits for a running one to return.
func (q *sendQueue) closeWriters() {
	q.mu.Lock()
	q.open = false
	q.wakeLocked()
	q.mu.Unlock()
	q.writers.Wait()
}

// writerStep is what the writer does next.
type writerStep int

const (
	stepWrite writerStep = iota // write the returned batch
	stepClose                   // send the close frame, then return
	stepPark                    // wait for wake or the linger to run out
	stepExit                    // return: the connection has ended
)

// next is the writer's step: a close request first, then every queued
// message at once (spare, emptied by the caller, becomes the new backing
// array so a busy connection does not allocate per batch) and every queued
// relay frame, else park. The writer owns the frames it takes: it writes
// each whose request has not ended, and calls done on every one.
func (q *sendQueue) next(spare []registry.Message) ([]registry.Message, []*relay.Frame, writerStep) {
	if cap(spare) > maxKeptBatch {
		// A burst's backing array goes: an idle connection must not keep
		// the capacity of its largest past batch.
		spare = nil
	}
	clear(spare[:cap(spare)]) // drop references to sent payloads
	q.mu.Lock()
	defer q.mu.Unlock()
	switch {
	case !q.open:
		return nil, nil, stepExit
	case q.closeReq:
		// writing stays set, so no other writer starts after this one.
		return nil, nil, stepClose
	case len(q.msgs) == 0 && len(q.relay) == 0:
		q.parked = true
		return nil, nil, stepPark
	}
	msgs, relays := q.msgs, q.relay
	q.relay, q.relayBytes = nil, 0
	q.msgs = spare[:0]
	q.bytes = 0
	return msgs, relays, stepWrite
}

// retire ends a parked writer's turn when its linger ran out, unless work
// arrived meanwhile (then it was woken and must go on).
func (q *sendQueue) retire() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.parked {
		return false
	}
	q.parked = false
	q.writing = false
	return true
}

// writerDone accounts for a writer that returned.
func (q *sendQueue) writerDone() { q.writers.Done() }
