package registry

import (
	"context"
	"fmt"
	"sync"
)

// Store keeps registration records beyond the live registry: on a file so
// that they outlive the process, or in a cluster's key-value store so that
// several nodes share them. The registry owns the live state (members,
// timers) and writes each creation and removal through to the store before
// it is visible; it reads the store once, at start, through Restore.
//
// Implementations must be safe for concurrent use. Put and Delete must be
// durable (as the store understands it) when they return.
type Store interface {
	// Put adds rec. It fails with ErrExists when a record with rec.ID is
	// stored already.
	Put(ctx context.Context, rec Record) error
	// Delete removes the record named ref, if the stored one has ref's
	// generation: a newer registration under the same id is left alone.
	// Deleting what is not stored is not an error.
	Delete(ctx context.Context, ref Ref) error
	// Load returns every stored record, in no particular order.
	Load(ctx context.Context) ([]Record, error)
}

// MemoryStore is a Store in memory: records live as long as the process. It
// is the store when nothing outlives the process, and a model for others.
// Its zero value is ready to use.
type MemoryStore struct {
	mu      sync.Mutex
	records map[string]Record // guarded by mu
}

// Put implements Store.
func (s *MemoryStore) Put(_ context.Context, rec Record) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.records[rec.ID]; ok {
		return fmt.Errorf("put %s: %w", rec.ID, ErrExists)
	}
	if s.records == nil {
		s.records = make(map[string]Record)
	}
	s.records[rec.ID] = rec
	return nil
}

// Delete implements Store.
func (s *MemoryStore) Delete(_ context.Context, ref Ref) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if rec, ok := s.records[ref.ID]; ok && rec.Generation == ref.Generation {
		delete(s.records, ref.ID)
	}
	return nil
}

// Load implements Store.
func (s *MemoryStore) Load(context.Context) ([]Record, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	recs := make([]Record, 0, len(s.records))
	for _, rec := range s.records {
		recs = append(recs, rec)
	}
	return recs, nil
}
