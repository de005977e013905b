package cluster

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"wsrouter/registry"
)

// This file is the node as the registry's Broker: interest by presence,
// and messages between nodes.

// regState is what the node keeps of one registration id: its members
// here, the other nodes that have members, and its subscription.
type regState struct {
	id      string
	subject string // "{prefix}.m.{enc(id)}"

	// remote counts the other live nodes with members; Publish reads it
	// without a lock.
	remote atomic.Int32
	// reg is the registration this node's members are in, for delivery
	// of other nodes' messages.
	reg atomic.Pointer[registry.Registration]

	// op serializes the network side: subscribing, unsubscribing and
	// writing presence.
	op sync.Mutex
	// sub and announced (this node's presence key is written, or will be
	// once NATS is back) change with op and Node.mu both held; either
	// lock suffices to read them.
	sub       *nats.Subscription
	announced bool

	local int // guarded by Node.mu; members here (Attach less Detach)
}

// stateLocked returns the state of id, made if need be, with n.mu held: a state
// is forgotten only under n.mu, so the caller may count on it.
func (n *Node) stateLocked(id string) *regState {
	if v, ok := n.states.Load(id); ok {
		return v.(*regState)
	}
	st := &regState{id: id, subject: n.prefix + ".m." + enc(id)}
	n.states.Store(id, st)
	return st
}

// forgetStateLocked drops st once nothing refers to it any more: no member
// here, no subscription or presence of this node, no other node's.
func (n *Node) forgetStateLocked(st *regState) {
	if st.local == 0 && st.sub == nil && !st.announced && len(n.presence[st.id]) == 0 {
		n.states.CompareAndDelete(st.id, st)
	}
}

// A message between nodes: a fixed header, the pub/sub event, the data.
//
//	0      kind (kindMessage)
//	1      the sender's role
//	2      flags (flagBinary)
//	3..10  the registration's generation, little-endian
//	11     length of the event
//	12..   the event, then the data
const (
	kindMessage = 1
	flagBinary  = 1
	headerLen   = 12
)

var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}

// Publish implements registry.Broker: this node's receivers directly, and
// once to NATS when another node has members of reg. Per sender, messages
// leave in order on the node's one connection, and each node's
// subscription delivers them in order.
func (n *Node) Publish(reg *registry.Registration, from registry.Member, role registry.Role, msg registry.Message) int {
	delivered := reg.Deliver(from, role, msg)
	v, ok := n.states.Load(reg.ID)
	if !ok || v.(*regState).remote.Load() == 0 {
		return delivered
	}
	st := v.(*regState)
	bp := bufPool.Get().(*[]byte)
	b := append((*bp)[:0], kindMessage, byte(role), 0)
	if msg.Binary {
		b[2] |= flagBinary
	}
	b = binary.LittleEndian.AppendUint64(b, reg.Generation)
	b = append(b, byte(len(msg.Event)))
	b = append(b, msg.Event...)
	b = append(b, msg.Data...)
	// Publish copies b into the connection's buffer, or into its
	// reconnect buffer while NATS is away (at most once, then); past that
	// buffer the message is lost to the other nodes, and counted.
	if err := n.nc.Publish(st.subject, b); err != nil {
		n.dropped.Add(1)
	}
	if cap(b) <= 1<<20 {
		*bp = b
		bufPool.Put(bp)
	}
	return delivered
}

// receive delivers another node's message to this node's members.
func (st *regState) receive(m *nats.Msg) {
	d := m.Data
	if len(d) < headerLen || d[0] != kindMessage {
		return
	}
	reg := st.reg.Load()
	if reg == nil || reg.Generation != binary.LittleEndian.Uint64(d[3:11]) {
		return // another generation of the id, or none here any more
	}
	el := int(d[11])
	if len(d) < headerLen+el {
		return
	}
	msg := registry.Message{Binary: d[2]&flagBinary != 0, Event: string(d[headerLen : headerLen+el]), Data: d[headerLen+el:]}
	reg.Deliver(nil, registry.Role(d[1]), msg)
}

// Attach implements registry.Broker. The first member here subscribes to
// reg's subject, announces this node's presence, bumps the record's
// revision (so that a garbage collection decided elsewhere before it saw the
// presence fails) and tells the live nodes; the subscription is confirmed by
// the server before that returns. Cut from NATS, a node still admits
// members of the registrations it knows, and announces them when NATS is
// back. A failed write while connected refuses the join (ErrStore).
func (n *Node) Attach(reg *registry.Registration) error {
	n.mu.Lock()
	st := n.stateLocked(reg.ID)
	st.local++ // before waiting: st cannot be forgotten meanwhile
	n.mu.Unlock()
	st.op.Lock()
	defer st.op.Unlock()
	st.reg.Store(reg)
	if st.sub != nil && st.announced {
		return nil
	}
	err := n.announce(st, reg)
	if err != nil {
		n.mu.Lock()
		st.local--
		busy := st.local > 0
		if busy {
			// Another member is waiting to join: it announces again.
			st.announced = false
		}
		n.mu.Unlock()
		if !busy {
			n.withdrawLocked(st)
		}
	}
	return err
}

// announce subscribes st (if it is not) and writes this node's presence and
// the touch, with st.op held.
func (n *Node) announce(st *regState, reg *registry.Registration) error {
	if st.sub == nil {
		sub, err := n.nc.Subscribe(st.subject, st.receive)
		if err != nil {
			return fmt.Errorf("subscribe: %w: %w", registry.ErrStore, err)
		}
		n.mu.Lock()
		st.sub = sub
		n.mu.Unlock()
	}
	n.mu.Lock()
	st.announced = true
	n.mu.Unlock()
	if !n.nc.IsConnected() {
		return nil // the resync after the reconnect announces it
	}
	ctx, cancel := n.opCtx()
	defer cancel()
	rev, err := n.writePresence(ctx, st, reg)
	if err != nil {
		return err
	}
	n.tellInterest(st.id, rev)
	return nil
}

// writePresence writes this node's presence key of st, then bumps the
// record's revision; it returns the presence key's revision.
func (n *Node) writePresence(ctx context.Context, st *regState, reg *registry.Registration) (uint64, error) {
	rev, err := n.kv.Put(ctx, n.presenceKey(st.id), nil)
	if err != nil {
		return 0, fmt.Errorf("presence %s: %w: %w", st.id, registry.ErrStore, err)
	}
	return rev, n.touch(ctx, reg)
}

// touch bumps the record's revision, keeping its value. It fails with
// ErrNotFound if the record is gone (or is another generation's).
func (n *Node) touch(ctx context.Context, reg *registry.Registration) error {
	n.mu.Lock()
	cur, ok := n.liveRecordLocked(reg.ID)
	n.mu.Unlock()
	for range 5 {
		if !ok || cur.gen != reg.Generation {
			e, gen, found, err := n.current(ctx, reg.ID)
			if err != nil {
				return fmt.Errorf("touch %s: %w: %w", reg.ID, registry.ErrStore, err)
			}
			if !found || gen != reg.Generation {
				return fmt.Errorf("touch %s: %w", reg.ID, registry.ErrNotFound)
			}
			cur = recEntry{rev: e.Revision(), gen: gen, value: e.Value()}
		}
		rev, err := n.kv.Update(ctx, recKey(reg.ID), cur.value, cur.rev)
		if err == nil {
			n.sawRecord(reg.ID, rev, cur.gen, cur.value)
			return nil
		}
		if !errors.Is(err, jetstream.ErrKeyRevisionMismatch) && !errors.Is(err, jetstream.ErrKeyExists) {
			return fmt.Errorf("touch %s: %w: %w", reg.ID, registry.ErrStore, err)
		}
		ok = false // another node touched it: read it again
	}
	return fmt.Errorf("touch %s: %w: contended", reg.ID, registry.ErrStore)
}

// tellInterest tells every live node at once that this node now has
// members of id (its presence key at revision rev), or with id "" that it
// follows events (its follow key), and waits for them to have heard it, 2 s
// at most: their watch would tell them a moment later, but a member hears
// the others from its 101 on, so their next message must come here.
func (n *Node) tellInterest(id string, rev uint64) {
	peers := n.livePeers()
	ctx, cancel := context.WithTimeout(n.ctx, min(n.cfg.OpTimeout, 2*time.Second))
	defer cancel()
	var wg sync.WaitGroup
	for _, peer := range peers {
		wg.Go(func() {
			m := nats.NewMsg(n.prefix + ".n." + peer)
			m.Header.Set(hdrMethod, methodInterest)
			m.Header.Set(hdrReg, id)
			m.Header.Set(hdrFrom, n.id)
			m.Header.Set(hdrRev, strconv.FormatUint(rev, 10))
			// A node that does not answer is dead or cut off; its watch
			// catches up when it is back.
			n.nc.RequestMsgWithContext(ctx, m)
		})
	}
	wg.Wait()
}

// Detach implements registry.Broker. It never waits for the network: the
// last member here leaving withdraws the node's interest in the background.
func (n *Node) Detach(reg *registry.Registration) {
	v, ok := n.states.Load(reg.ID)
	if !ok {
		return
	}
	st := v.(*regState)
	n.mu.Lock()
	st.local--
	idle := st.local == 0
	n.mu.Unlock()
	if idle {
		go func() {
			st.op.Lock()
			defer st.op.Unlock()
			n.withdrawLocked(st)
		}()
	}
}

// withdrawLocked, with st.op held, unsubscribes and deletes this node's
// presence if st has no members here (any more), then forgets st if
// nothing else refers to it.
func (n *Node) withdrawLocked(st *regState) {
	n.mu.Lock()
	busy := st.local > 0
	n.mu.Unlock()
	if busy {
		return
	}
	if st.sub != nil {
		st.sub.Unsubscribe()
	}
	if st.announced && n.nc.IsConnected() {
		ctx, cancel := n.opCtx()
		n.kv.Delete(ctx, n.presenceKey(st.id))
		cancel()
	}
	// A presence key not deleted now (NATS away) is deleted by the
	// resync, which finds it without a member here.
	n.mu.Lock()
	st.sub, st.announced = nil, false
	n.forgetStateLocked(st)
	n.mu.Unlock()
}

func (n *Node) presenceKey(id string) string { return "p." + enc(id) + "." + n.id }

// reannounce, after a reconnect, writes the presence of every registration
// with members here (and touches its record, as a first join does: a node
// cut off may have admitted members the others did not hear of), then
// deletes this node's presence keys (in own) that it withdrew while it
// could not write. Each write has its own timeout.
func (n *Node) reannounce(own map[string]bool) {
	var states []*regState
	n.states.Range(func(_, v any) bool {
		states = append(states, v.(*regState))
		return true
	})
	for _, st := range states {
		st.op.Lock()
		if reg := st.reg.Load(); st.announced && reg != nil {
			delete(own, st.id)
			ctx, cancel := n.opCtx()
			if _, err := n.writePresence(ctx, st, reg); err != nil && n.ctx.Err() == nil {
				n.log.Warn("cluster: presence not written after the reconnect", "reg", st.id, "err", err)
			}
			cancel()
		}
		st.op.Unlock()
	}
	for id := range own {
		n.mu.Lock()
		st := n.stateLocked(id)
		n.mu.Unlock()
		st.op.Lock()
		if !st.announced {
			ctx, cancel := n.opCtx()
			n.kv.Delete(ctx, n.presenceKey(id))
			cancel()
		}
		n.mu.Lock()
		n.forgetStateLocked(st)
		n.mu.Unlock()
		st.op.Unlock()
	}
}

// reassert writes this node's presence of id again after another node
// deleted it (taking this node for dead while it was not), if it still has
// members of id.
func (n *Node) reassert(id string) {
	v, ok := n.states.Load(id)
	if !ok {
		return
	}
	st := v.(*regState)
	st.op.Lock()
	defer st.op.Unlock()
	reg := st.reg.Load()
	n.mu.Lock()
	busy := st.local > 0 && st.announced
	n.mu.Unlock()
	if !busy || reg == nil || !n.nc.IsConnected() {
		return
	}
	ctx, cancel := n.opCtx()
	defer cancel()
	if rev, err := n.writePresence(ctx, st, reg); err == nil {
		n.tellInterest(id, rev)
	}
}
