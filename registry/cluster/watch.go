package cluster

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"wsrouter/registry"
)

// This file keeps the node's view of the bucket current: records become
// live registrations and tombstones removals, presence keys count other
// nodes' members, heartbeats tell live nodes from dead ones.

// watch follows the whole bucket, from its current state on. Whenever NATS
// comes back it starts again: the new watch's first pass is the bucket as
// it is, and what this node holds that the bucket no longer has was
// removed meanwhile.
func (n *Node) watch(synced chan<- struct{}) {
	defer n.wg.Done()
	first := true
	wait := 100 * time.Millisecond
	for n.ctx.Err() == nil {
		switch n.watchOnce(&first, synced) {
		case watchResync:
			wait = 100 * time.Millisecond
			continue
		case watchEnded:
			wait = 100 * time.Millisecond
		}
		select {
		case <-n.ctx.Done():
			return
		case <-n.resync:
		case <-time.After(wait):
			wait = min(2*wait, 2*time.Second)
		}
	}
}

// How a watch ended.
const (
	watchFailed = iota // it never caught up
	watchEnded         // it caught up, then the watcher closed
	watchResync        // NATS came back: start again at once
)

// watchOnce runs one watch until it ends or a resync is asked for.
func (n *Node) watchOnce(first *bool, synced chan<- struct{}) int {
	w, err := n.kv.WatchAll(n.ctx)
	if err != nil {
		if n.ctx.Err() == nil {
			n.log.Warn("cluster: watch failed", "err", err)
		}
		return watchFailed
	}
	defer func() {
		w.Stop()
		for range w.Updates() { // until the watcher closes it
		}
	}()
	pass := &firstPass{recs: make(map[string]bool), presence: make(map[string]map[string]struct{}), own: make(map[string]bool)}
	for {
		select {
		case <-n.ctx.Done():
			return watchEnded
		case <-n.resync:
			// NATS came back: the watch may have missed what happened
			// meanwhile. Start again from the bucket's state.
			n.synced.Store(false)
			return watchResync
		case e, ok := <-w.Updates():
			if !ok {
				n.synced.Store(false)
				if pass == nil {
					return watchEnded
				}
				return watchFailed
			}
			if e == nil {
				if pass != nil {
					n.caughtUp(pass, *first)
					pass = nil
					if *first {
						*first = false
						close(synced)
					}
				}
				continue
			}
			n.apply(e, pass)
		}
	}
}

// firstPass is what a watch's first pass (the bucket as it is) saw.
type firstPass struct {
	recs     map[string]bool                // live record ids
	presence map[string]map[string]struct{} // id → other nodes with members
	own      map[string]bool                // ids with this node's presence key
	maxRev   uint64                         // the latest revision it saw
}

// apply takes one entry of the bucket into the node's view.
// pass is nil once the first pass is over.
func (n *Node) apply(e jetstream.KeyValueEntry, pass *firstPass) {
	key := e.Key()
	if pass != nil {
		pass.maxRev = max(pass.maxRev, e.Revision())
	}
	deleted := e.Operation() != jetstream.KeyValuePut
	switch {
	case strings.HasPrefix(key, "r."):
		id, ok := dec(key[2:])
		if !ok {
			return
		}
		if deleted {
			n.applyMu.Lock()
			n.recordGone(id, e.Revision())
			n.applyMu.Unlock()
			return
		}
		rec, err := registry.UnmarshalRecord(e.Value())
		if err != nil || rec.ID != id {
			n.log.Error("cluster: skipping a bad record", "key", key, "err", err)
			return
		}
		if pass != nil {
			pass.recs[id] = true
		}
		n.applyMu.Lock()
		if n.sawRecord(id, e.Revision(), rec.Generation, e.Value()) {
			n.recordLive(rec)
		}
		n.applyMu.Unlock()
	case strings.HasPrefix(key, "p."):
		encID, node, ok := strings.Cut(key[2:], ".")
		id, okID := dec(encID)
		if !ok || !okID {
			return
		}
		if node == n.id {
			switch {
			case pass != nil && !deleted:
				pass.own[id] = true
			case pass == nil && deleted:
				// Withdrawn by this node, or deleted by another that
				// took it for dead: written again if it still has
				// members.
				go n.reassert(id)
			}
			return
		}
		if pass != nil && !deleted {
			if pass.presence[id] == nil {
				pass.presence[id] = make(map[string]struct{})
			}
			pass.presence[id][node] = struct{}{}
		}
		n.setPresence(id, node, !deleted, e.Revision())
	case strings.HasPrefix(key, "i."):
		if node := key[2:]; node != n.id {
			n.setFollower(node, !deleted, e.Revision())
		}
	case strings.HasPrefix(key, "n."):
		node := key[2:]
		if node == n.id {
			if !deleted {
				n.ownBeat.Store(time.Now().UnixNano())
			}
			return
		}
		if deleted {
			n.nodeDied(node)
			return
		}
		n.mu.Lock()
		n.nodes[node] = time.Now()
		n.nodeRev[node] = e.Revision()
		n.mu.Unlock()
	}
}

// recordLive makes rec's registration live here, replacing an older
// generation under its id.
func (n *Node) recordLive(rec registry.Record) {
	r := n.registry.Load()
	if cur, err := r.Get(rec.ID); err == nil {
		if cur.Generation == rec.Generation {
			return
		}
		r.Vanish(cur.Ref())
	}
	// ErrExists: this node is creating it right now.
	r.Restore([]registry.Record{rec})
}

// Lookup returns the registration id, live here or made live from the
// bucket: a registration made on another node is known here before this
// node's watch brings it. ErrNotFound if the bucket has none.
func (n *Node) Lookup(ctx context.Context, id string) (*registry.Registration, error) {
	r := n.registry.Load()
	if reg, err := r.Get(id); err == nil {
		return reg, nil
	}
	if !n.lookups.Allow() {
		// Many lookups of ids this node does not know: a client
		// guessing ids, most likely. The bucket is not asked.
		return nil, fmt.Errorf("lookup %s: %w", id, registry.ErrNotFound)
	}
	ctx, cancel := context.WithTimeout(ctx, n.cfg.OpTimeout)
	defer cancel()
	e, err := n.kv.Get(ctx, recKey(id))
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return nil, fmt.Errorf("lookup %s: %w", id, registry.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("lookup %s: %w: %w", id, registry.ErrStore, err)
	}
	rec, err := registry.UnmarshalRecord(e.Value())
	if err != nil || rec.ID != id {
		return nil, fmt.Errorf("lookup %s: %w", id, registry.ErrNotFound)
	}
	n.applyMu.Lock()
	if n.sawRecord(id, e.Revision(), rec.Generation, e.Value()) {
		n.recordLive(rec)
	}
	n.applyMu.Unlock()
	return r.Get(id)
}

// recordGone follows a tombstone: the registration is removed here too.
// With applyMu held.
func (n *Node) recordGone(id string, rev uint64) {
	n.mu.Lock()
	cur, ok := n.recs[id]
	if ok && cur.rev >= rev {
		n.mu.Unlock()
		return
	}
	n.recs[id] = recEntry{rev: rev, deleted: time.Now()}
	delete(n.presenceRev, id)
	n.mu.Unlock()
	if ok && cur.deleted.IsZero() {
		n.registry.Load().Vanish(registry.Ref{ID: id, Generation: cur.gen})
	}
}

// tombstoneTTL is how long a tombstone is remembered: longer than any
// lookup that may have read the record before it was deleted.
const tombstoneTTL = time.Minute

// forgetTombstones drops the tombstones older than tombstoneTTL.
func (n *Node) forgetTombstones() {
	n.mu.Lock()
	defer n.mu.Unlock()
	old := time.Now().Add(-tombstoneTTL)
	for id, e := range n.recs {
		if !e.deleted.IsZero() && e.deleted.Before(old) {
			delete(n.recs, id)
		}
	}
}

// caughtUp ends a watch's first pass: what this node holds that the bucket
// does not was removed while it was not watching, and presence it counted
// that the bucket no longer has is gone.
//
// A registration made (here, or looked up) after the pass began is not in
// it, and stays: its record's revision is later than any the pass saw.
func (n *Node) caughtUp(pass *firstPass, first bool) {
	n.applyMu.Lock()
	r := n.registry.Load()
	var gone []registry.Ref
	n.mu.Lock()
	r.Each(func(reg *registry.Registration) {
		if e, ok := n.recs[reg.ID]; !pass.recs[reg.ID] && (!ok || e.rev <= pass.maxRev) {
			gone = append(gone, reg.Ref())
		}
	})
	now := time.Now()
	for id, e := range n.recs {
		if !pass.recs[id] && e.rev <= pass.maxRev && e.deleted.IsZero() {
			// Removed while this node was not watching: remembered as
			// a tombstone, so that a lookup that read it before cannot
			// bring it back.
			n.recs[id] = recEntry{rev: pass.maxRev, deleted: now}
		}
	}
	var stale [][2]string
	for id, nodes := range n.presence {
		for node := range nodes {
			// A presence newer than the pass (a node's direct word)
			// stays.
			if _, ok := pass.presence[id][node]; !ok && n.presenceRev[id][node] <= pass.maxRev {
				stale = append(stale, [2]string{id, node})
			}
		}
	}
	// Every node gets a full DeadAfter to be heard again: while this one
	// was away it heard nobody.
	for node := range n.nodes {
		n.nodes[node] = now
	}
	n.mu.Unlock()
	for _, ref := range gone {
		r.Vanish(ref)
	}
	for _, s := range stale {
		n.setPresence(s[0], s[1], false, 0)
	}
	n.applyMu.Unlock()
	// Announcing again takes two writes per registration with members
	// here: off the watch, which goes on meanwhile (at start there is
	// nothing to announce). The node is in sync once they are done.
	done := func() {
		n.reannounce(pass.own)
		n.synced.Store(true)
		n.log.Info("cluster: in sync", "registrations", r.Len())
		n.changed()
	}
	if first {
		done()
		return
	}
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		done()
	}()
}

// changed tells OnChange that the view of other nodes' members may have
// jumped (a resync, a node gone).
func (n *Node) changed() {
	n.mu.Lock()
	f := n.onChange
	n.mu.Unlock()
	if f != nil {
		f()
	}
}

// OnChange sets f to be called whenever this node's view of the other
// nodes' members may have jumped rather than changed event by event: after
// it caught up with the bucket again, or when another node died. Info
// streams, which promise every event, start again from a snapshot then.
func (n *Node) OnChange(f func()) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.onChange = f
}

// setPresence records that node has (or no longer has) members of id, as
// of the bucket's revision rev (0: whatever came before), and tells the
// registration when the last other node leaves it.
func (n *Node) setPresence(id, node string, here bool, rev uint64) {
	n.mu.Lock()
	revs := n.presenceRev[id]
	if rev != 0 {
		if rev <= revs[node] {
			n.mu.Unlock()
			return // stale
		}
		if revs == nil {
			revs = make(map[string]uint64)
			n.presenceRev[id] = revs
		}
		revs[node] = rev
	}
	nodes := n.presence[id]
	_, had := nodes[node]
	if here == had {
		n.mu.Unlock()
		return
	}
	if here {
		if nodes == nil {
			nodes = make(map[string]struct{})
			n.presence[id] = nodes
		}
		nodes[node] = struct{}{}
		if _, known := n.nodes[node]; !known {
			// Heard of before its heartbeat: it has DeadAfter to beat.
			n.nodes[node] = time.Now()
		}
	} else {
		delete(nodes, node)
		if len(nodes) == 0 {
			delete(n.presence, id)
		}
	}
	st := n.stateLocked(id)
	live := n.liveElsewhereLocked(id)
	st.remote.Store(int32(live))
	if live == 0 {
		n.forgetStateLocked(st)
	}
	n.mu.Unlock()
	if live == 0 {
		n.vacated(id)
	}
}

// liveElsewhereLocked counts the live other nodes with members of id.
//
// A node counts until it is declared dead (nodeDied, which recounts), not
// by the age of its last heartbeat: a count taken from the clock would go
// stale without anything to recompute it.
func (n *Node) liveElsewhereLocked(id string) int {
	live := 0
	for node := range n.presence[id] {
		if _, ok := n.nodes[node]; ok {
			live++
		}
	}
	return live
}

// vacated tells the registration id that no other node has members of it.
func (n *Node) vacated(id string) {
	if reg, err := n.registry.Load().Get(id); err == nil {
		reg.Vacated()
	}
}

// nodeDied forgets node: its members stop counting, and its keys are
// deleted (by every node that notices; deleting twice is harmless).
func (n *Node) nodeDied(node string) {
	n.mu.Lock()
	if _, ok := n.nodes[node]; !ok {
		n.mu.Unlock()
		return
	}
	delete(n.nodes, node)
	delete(n.followers, node)
	n.followerCount.Store(int32(len(n.followers)))
	followRev := n.followRev[node]
	delete(n.followRev, node)
	beatRev := n.nodeRev[node]
	delete(n.nodeRev, node)
	var ids []string
	revs := make(map[string]uint64)
	for id, nodes := range n.presence {
		if _, ok := nodes[node]; ok {
			ids = append(ids, id)
			revs[id] = n.presenceRev[id][node]
		}
	}
	n.mu.Unlock()
	n.log.Info("cluster: node gone", "peer", node, "registrations", len(ids))
	for _, id := range ids {
		n.setPresence(id, node, false, 0)
	}
	n.mu.Lock()
	for _, r := range n.presenceRev {
		delete(r, node)
	}
	n.mu.Unlock()
	// Its keys go, but only as this node saw them: a node that was only
	// slow and has written them again since keeps them (and its watch
	// writes again what it finds deleted).
	n.changed()
	go func() {
		del := func(key string, rev uint64) {
			ctx, cancel := n.opCtx()
			defer cancel()
			if rev == 0 {
				return
			}
			n.kv.Delete(ctx, key, jetstream.LastRevision(rev))
		}
		for _, id := range ids {
			del("p."+enc(id)+"."+node, revs[id])
		}
		del("n."+node, beatRev)
		del("i."+node, followRev)
	}()
}

// beat writes the node's heartbeat every Heartbeat and declares dead the
// nodes not heard of for DeadAfter.
//
// It looks for silent nodes every second (or every Heartbeat if shorter), so
// that a node is declared dead soon after DeadAfter, not up to a heartbeat
// later.
func (n *Node) beat() {
	defer n.wg.Done()
	t := time.NewTicker(min(n.cfg.Heartbeat, time.Second))
	defer t.Stop()
	lastPurge := time.Now()
	var lastBeat time.Time
	for {
		if n.nc.IsConnected() && time.Since(lastBeat) >= n.cfg.Heartbeat {
			lastBeat = time.Now()
			ctx, cancel := n.opCtx()
			if _, err := n.kv.Put(ctx, "n."+n.id, []byte(time.Now().UTC().Format(time.RFC3339))); err != nil && n.ctx.Err() == nil {
				n.log.Warn("cluster: heartbeat not written", "err", err)
			}
			cancel()
		}
		n.forgetTombstones()
		if time.Since(lastPurge) > purgeEvery {
			// Delete markers (of removed registrations, withdrawn
			// presence, nodes gone) older than half an hour go; every
			// node does it, which is harmless.
			lastPurge = time.Now()
			ctx, cancel := context.WithTimeout(n.ctx, time.Minute)
			if err := n.kv.PurgeDeletes(ctx); err != nil && n.ctx.Err() == nil {
				n.log.Warn("cluster: purging old delete markers failed", "err", err)
			}
			cancel()
		}
		// Only a node that hears the cluster, and whose watch is not
		// behind (it has seen its own latest heartbeat), may judge
		// others silent.
		if fresh := time.Since(time.Unix(0, n.ownBeat.Load())) < n.cfg.DeadAfter/2; fresh && !n.Degraded() {
			deadline := time.Now().Add(-n.cfg.DeadAfter)
			var dead []string
			n.mu.Lock()
			for node, seen := range n.nodes {
				if seen.Before(deadline) {
					dead = append(dead, node)
				}
			}
			n.mu.Unlock()
			for _, node := range dead {
				n.nodeDied(node)
			}
		}
		select {
		case <-n.ctx.Done():
			return
		case <-t.C:
		}
	}
}

// purgeEvery is how often a node purges old delete markers from the bucket.
const purgeEvery = 10 * time.Minute

// Elsewhere reports whether a live other node has members of id.
func (n *Node) Elsewhere(id string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.liveElsewhereLocked(id) > 0
}

// livePeers returns the live other nodes.
//
// Live means not declared dead, as liveElsewhereLocked counts.
func (n *Node) livePeers() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make([]string, 0, len(n.nodes))
	for node := range n.nodes {
		out = append(out, node)
	}
	return out
}

// Peers returns the live other nodes with members of id.
func (n *Node) Peers(id string) []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []string
	for node := range n.presence[id] {
		if _, ok := n.nodes[node]; ok {
			out = append(out, node)
		}
	}
	return out
}

var _ interface {
	registry.Store
	registry.IdleDeleter
	registry.Broker
} = (*Node)(nil)
