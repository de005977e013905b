package cluster

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"

	"wsrouter/registry"
)

// This file is the node as the registry's Store: records in the bucket.

// recKey is the key of the record of id, kept as the data file keeps it
// (registry.MarshalRecord).
func recKey(id string) string { return "r." + enc(id) }

// Put implements registry.Store: create-if-absent, so that of two nodes
// creating one id, one wins and the other gets ErrExists.
func (n *Node) Put(ctx context.Context, rec registry.Record) error {
	b, err := registry.MarshalRecord(rec)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, n.cfg.OpTimeout)
	defer cancel()
	rev, err := n.kv.Create(ctx, recKey(rec.ID), b)
	if errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		return fmt.Errorf("put %s: %w", rec.ID, registry.ErrExists)
	}
	if err != nil {
		return err
	}
	n.sawRecord(rec.ID, rev, rec.Generation, b)
	return nil
}

// sawRecord notes a record's revision, unless a later one was seen.
// It reports whether rec is now the current one.
func (n *Node) sawRecord(id string, rev, gen uint64, value []byte) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if cur, ok := n.recs[id]; ok && cur.rev >= rev {
		return cur.rev == rev && cur.deleted.IsZero()
	}
	n.recs[id] = recEntry{rev: rev, gen: gen, value: value}
	return true
}

// liveRecordLocked returns the record under id as last seen, if live.
func (n *Node) liveRecordLocked(id string) (recEntry, bool) {
	e, ok := n.recs[id]
	return e, ok && e.deleted.IsZero()
}

// current reads the record under id from the bucket: its entry, or
// ok false when there is none (or a tombstone).
func (n *Node) current(ctx context.Context, id string) (e jetstream.KeyValueEntry, gen uint64, ok bool, err error) {
	e, err = n.kv.Get(ctx, recKey(id))
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return nil, 0, false, nil
	}
	if err != nil {
		return nil, 0, false, err
	}
	rec, err := registry.UnmarshalRecord(e.Value())
	if err != nil {
		return nil, 0, false, fmt.Errorf("record %s: %w", id, err)
	}
	return e, rec.Generation, true, nil
}

// Delete implements registry.Store: the record goes if it is ref's
// generation, whoever touched it meanwhile.
func (n *Node) Delete(ctx context.Context, ref registry.Ref) error {
	ctx, cancel := context.WithTimeout(ctx, n.cfg.OpTimeout)
	defer cancel()
	for {
		e, gen, ok, err := n.current(ctx, ref.ID)
		if err != nil {
			return err
		}
		if !ok || gen != ref.Generation {
			return nil
		}
		err = n.kv.Delete(ctx, recKey(ref.ID), jetstream.LastRevision(e.Revision()))
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyExists) {
			continue // a node joined meanwhile: it goes all the same
		}
		return err
	}
}

// DeleteIdle implements registry.IdleDeleter. It takes the record's
// revision as this node last saw it before it looks at presence: a node
// announces its presence before it bumps the revision, and the watch sees
// both in the bucket's order, so either the presence is seen here or the
// delete, conditional on the revision, fails.
func (n *Node) DeleteIdle(ctx context.Context, ref registry.Ref) error {
	n.mu.Lock()
	rec, known := n.liveRecordLocked(ref.ID)
	busy := n.liveElsewhereLocked(ref.ID) > 0
	n.mu.Unlock()
	if !known || rec.gen != ref.Generation || busy {
		// Unknown here means deleted (its tombstone is on its way), or
		// not yet seen: either way not this node's to remove now.
		n.deferred.Add(1)
		return registry.ErrInUse
	}
	ctx, cancel := context.WithTimeout(ctx, n.cfg.OpTimeout)
	defer cancel()
	err := n.kv.Delete(ctx, recKey(ref.ID), jetstream.LastRevision(rec.rev))
	if errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyExists) {
		n.deferred.Add(1)
		return registry.ErrInUse
	}
	return err
}

// Deferred counts the garbage collections this node left alone because
// the registration had members on another node (or gained one meanwhile).
func (n *Node) Deferred() uint64 { return n.deferred.Load() }

// Load implements registry.Store.
func (n *Node) Load(ctx context.Context) ([]registry.Record, error) {
	ctx, cancel := context.WithTimeout(ctx, 4*n.cfg.OpTimeout)
	defer cancel()
	keys, err := n.kv.ListKeysFiltered(ctx, "r.*")
	if err != nil {
		return nil, err
	}
	var recs []registry.Record
	for k := range keys.Keys() {
		e, err := n.kv.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
			continue
		}
		if err != nil {
			return nil, err
		}
		rec, err := registry.UnmarshalRecord(e.Value())
		if err != nil {
			n.log.Error("cluster: skipping a bad record", "key", k, "err", err)
			continue
		}
		recs = append(recs, rec)
	}
	return recs, ctx.Err()
}

// Secret returns the cluster's secret called name (the token key), making
// it with create the first time: of two nodes making it at once, the first
// one kept stands and both use it.
func (n *Node) Secret(name string, create func() ([]byte, error)) ([]byte, error) {
	ctx, cancel := n.opCtx()
	defer cancel()
	key := "s." + name
	e, err := n.kv.Get(ctx, key)
	if err == nil {
		return e.Value(), nil
	}
	if !errors.Is(err, jetstream.ErrKeyNotFound) && !errors.Is(err, jetstream.ErrKeyDeleted) {
		return nil, err
	}
	made, err := create()
	if err != nil {
		return nil, err
	}
	if _, err := n.kv.Create(ctx, key, made); err != nil {
		if !errors.Is(err, jetstream.ErrKeyExists) {
			return nil, fmt.Errorf("keep %s: %w", name, err)
		}
		if e, err = n.kv.Get(ctx, key); err != nil {
			return nil, err
		}
		return e.Value(), nil
	}
	return made, nil
}
