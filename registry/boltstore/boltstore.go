// Package boltstore keeps registration records in one file with bbolt
// (go.etcd.io/bbolt: pure Go, transactions, no server), so that
// registrations outlive the process (docs/protocol.md §8.8 and
// docs/operations.md, "Registrations that survive restarts").
//
// The file holds a bucket "meta" with the schema version and secrets (the
// router's token key), and a bucket "registrations" with one JSON record per
// id. Members, messages and the remembered-key memo are never stored.
package boltstore

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"time"

	bolt "go.etcd.io/bbolt"

	"wsrouter/registry"
)

// Schema is the version of the file's layout that this package writes.
// Opening a file of an older version migrates it (migrations[v] takes
// version v to v+1); a newer one is refused.
const Schema = 1

// migrations[v] migrates a file from schema v to v+1, in the transaction
// that Open runs. Version 1 is the first: there is nothing to migrate yet.
var migrations = map[int]func(tx *bolt.Tx) error{}

var (
	bucketMeta = []byte("meta")
	bucketRegs = []byte("registrations")
	keySchema  = []byte("schema")
)

// ErrLocked means another process has the file open.
var ErrLocked = errors.New("another wsrouter holds the data file")

// Store is a registry.Store on a bbolt file.
type Store struct {
	db   *bolt.DB
	path string
}

var _ registry.Store = (*Store)(nil)

// lockWait is how long Open waits for the file's lock before it gives up.
const lockWait = time.Second

// Open opens (or creates) the store at path. It fails with ErrLocked when
// another process holds the file, and with a clear error when the file is
// not a store, is corrupt, or was written by a newer version.
func Open(path string) (s *Store, err error) {
	// bbolt panics on some corrupt files (a truncated one, a broken
	// freelist) rather than returning an error; a start must fail with a
	// message instead.
	defer func() {
		if p := recover(); p != nil {
			s, err = nil, fmt.Errorf("open %s: corrupt data file: %v", path, p)
		}
	}()
	// A read past the end of a truncated file's mapping is a SIGBUS, which
	// kills the process unless the goroutine asked for a panic instead.
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	if err := checkSize(path); err != nil {
		return nil, fmt.Errorf("open %s: corrupt data file: %w", path, err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: lockWait})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("open %s: %w (two routers in one directory need a -data each)", path, ErrLocked)
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	// Concurrent registers share a commit, and so an fsync: Batch waits
	// up to this long for company.
	db.MaxBatchDelay = 2 * time.Millisecond
	s = &Store{db: db, path: path}
	if err := s.prepare(); err != nil {
		db.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if err := s.check(); err != nil {
		db.Close()
		return nil, fmt.Errorf("open %s: corrupt data file: %w", path, err)
	}
	return s, nil
}

// checkSize refuses a file shorter than its own meta page says it is: bbolt
// would map it and fault reading past its end. An empty or missing file is a
// new store; a file without a valid meta page is left to bbolt to refuse.
func checkSize(path string) error {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || fi.Size() == 0 {
		return err
	}
	const (
		pageHeader = 16         // id, flags, count, overflow
		metaLen    = 64         // magic … checksum
		magic      = 0xED0CDAED // bbolt's
	)
	var best struct{ txid, end uint64 }
	found := false
	readMeta := func(off int64) (pageSize uint32, ok bool) {
		var b [pageHeader + metaLen]byte
		if _, err := f.ReadAt(b[:], off); err != nil {
			return 0, false
		}
		m := b[pageHeader:]
		le := binary.LittleEndian
		h := fnv.New64a()
		h.Write(m[:56])
		if le.Uint32(m[0:]) != magic || le.Uint64(m[56:]) != h.Sum64() {
			return 0, false
		}
		pageSize = le.Uint32(m[8:])
		if txid := le.Uint64(m[48:]); !found || txid > best.txid {
			best.txid, best.end = txid, le.Uint64(m[40:])*uint64(pageSize)
			found = true
		}
		return pageSize, true
	}
	pageSize, ok := readMeta(0)
	if !ok {
		pageSize = uint32(os.Getpagesize())
	}
	readMeta(int64(pageSize))
	if found && uint64(fi.Size()) < best.end {
		return fmt.Errorf("truncated: %d bytes where the file's meta page says %d", fi.Size(), best.end)
	}
	return nil
}

// check walks the whole file once, so that a damaged page is found at start
// rather than by a request later. It costs a few milliseconds for 100,000
// registrations.
func (s *Store) check() error {
	return s.db.View(func(tx *bolt.Tx) error {
		var first error
		for err := range tx.Check() { // drained: the checker sends them all
			first = cmp.Or(first, err)
		}
		return first
	})
}

// prepare creates the buckets of a new file, checks the schema of an old
// one and migrates it.
func (s *Store) prepare() error {
	return s.db.Update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if meta == nil {
			if tx.Bucket(bucketRegs) != nil {
				return errors.New("not a wsrouter data file: registrations without a schema")
			}
			if len(bucketNames(tx)) > 0 {
				return errors.New("not a wsrouter data file")
			}
			var err error
			if meta, err = tx.CreateBucket(bucketMeta); err != nil {
				return err
			}
			if _, err := tx.CreateBucket(bucketRegs); err != nil {
				return err
			}
			return meta.Put(keySchema, []byte(strconv.Itoa(Schema)))
		}
		v, err := strconv.Atoi(string(meta.Get(keySchema)))
		if err != nil || v < 1 {
			return fmt.Errorf("not a wsrouter data file: schema %q", meta.Get(keySchema))
		}
		if v > Schema {
			return fmt.Errorf("written by a newer wsrouter (schema %d, this one knows %d)", v, Schema)
		}
		for ; v < Schema; v++ {
			migrate, ok := migrations[v]
			if !ok {
				return fmt.Errorf("no migration from schema %d", v)
			}
			if err := migrate(tx); err != nil {
				return fmt.Errorf("migrate schema %d to %d: %w", v, v+1, err)
			}
		}
		if tx.Bucket(bucketRegs) == nil {
			return errors.New("not a wsrouter data file: no registrations bucket")
		}
		return meta.Put(keySchema, []byte(strconv.Itoa(Schema)))
	})
}

func bucketNames(tx *bolt.Tx) [][]byte {
	var names [][]byte
	tx.ForEach(func(name []byte, _ *bolt.Bucket) error {
		names = append(names, name)
		return nil
	})
	return names
}

// Put implements registry.Store. Concurrent Puts share one commit.
func (s *Store) Put(_ context.Context, rec registry.Record) error {
	b, err := registry.MarshalRecord(rec)
	if err != nil {
		return err
	}
	// Batch may run the function more than once: it only sets exists.
	var exists bool
	err = s.db.Batch(func(tx *bolt.Tx) error {
		regs := tx.Bucket(bucketRegs)
		if exists = regs.Get([]byte(rec.ID)) != nil; exists {
			return nil
		}
		return regs.Put([]byte(rec.ID), b)
	})
	if err != nil {
		return fmt.Errorf("store %s: %w", rec.ID, err)
	}
	if exists {
		return fmt.Errorf("store %s: %w", rec.ID, registry.ErrExists)
	}
	return nil
}

// Delete implements registry.Store.
func (s *Store) Delete(_ context.Context, ref registry.Ref) error {
	err := s.db.Batch(func(tx *bolt.Tx) error {
		regs := tx.Bucket(bucketRegs)
		v := regs.Get([]byte(ref.ID))
		if v == nil {
			return nil
		}
		if r, err := registry.UnmarshalRecord(v); err == nil && r.Generation != ref.Generation {
			return nil // a newer registration under the id
		}
		return regs.Delete([]byte(ref.ID))
	})
	if err != nil {
		return fmt.Errorf("delete %s: %w", ref.ID, err)
	}
	return nil
}

// Load implements registry.Store. A record that cannot be read fails the
// whole load: nothing is dropped silently.
func (s *Store) Load(context.Context) (recs []registry.Record, err error) {
	defer func() {
		if p := recover(); p != nil {
			recs, err = nil, fmt.Errorf("load %s: corrupt data file: %v", s.path, p)
		}
	}()
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	err = s.db.View(func(tx *bolt.Tx) error {
		regs := tx.Bucket(bucketRegs)
		recs = make([]registry.Record, 0, regs.Stats().KeyN)
		return regs.ForEach(func(k, v []byte) error {
			r, err := registry.UnmarshalRecord(v)
			if err != nil {
				return fmt.Errorf("record %q: %w", k, err)
			}
			if r.ID != string(k) {
				return fmt.Errorf("record %q: %w", k, registry.ErrMalformed)
			}
			recs = append(recs, r)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", s.path, err)
	}
	return recs, nil
}

// Secret returns the value kept in the file under name (such as the
// router's token key), first making it with create and keeping it if there
// is none. Secrets live in the meta bucket, under "secret." + name; a
// backup holds them too.
func (s *Store) Secret(name string, create func() ([]byte, error)) ([]byte, error) {
	key := []byte("secret." + name)
	var v []byte
	err := s.db.View(func(tx *bolt.Tx) error {
		v = bytes.Clone(tx.Bucket(bucketMeta).Get(key))
		return nil
	})
	if err != nil || v != nil {
		return v, err
	}
	made, err := create()
	if err != nil {
		return nil, err
	}
	err = s.db.Update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if v = bytes.Clone(meta.Get(key)); v != nil {
			return nil // made meanwhile: the first one stands
		}
		v = made
		return meta.Put(key, made)
	})
	if err != nil {
		return nil, fmt.Errorf("keep %s: %w", name, err)
	}
	return v, nil
}

// Backup writes a consistent copy of the file to w, from a read
// transaction: the router keeps serving meanwhile.
func (s *Store) Backup(w io.Writer) (int64, error) {
	var n int64
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		n, err = tx.WriteTo(w)
		return err
	})
	return n, err
}

// Snapshot writes a consistent copy of the file to a temporary file beside
// it and returns it, open at its start, with its size; the copy's name is
// already gone, so closing the file frees it. The read transaction lasts only
// as long as the copy to disk: a slow reader of the snapshot never holds up
// the store's writers (a long read transaction would block bbolt's remap).
func (s *Store) Snapshot() (*os.File, int64, error) {
	f, err := os.CreateTemp(filepath.Dir(s.path), ".wsrouter-backup-*")
	if err != nil {
		return nil, 0, fmt.Errorf("snapshot %s: %w", s.path, err)
	}
	os.Remove(f.Name()) // the open file lives on
	n, err := s.Backup(f)
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
	}
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("snapshot %s: %w", s.path, err)
	}
	return f, n, nil
}

// BackupFile copies the store at path to out (which must not exist), from a
// read transaction. The file must not be held by a router (ErrLocked): a
// running router is backed up through its GET /backup.
func BackupFile(path, out string) (int64, error) {
	if _, err := os.Stat(path); err != nil {
		return 0, err
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: lockWait})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return 0, fmt.Errorf("open %s: %w", path, ErrLocked)
		}
		return 0, fmt.Errorf("open %s: %w", path, err)
	}
	defer db.Close()
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, err
	}
	s := &Store{db: db, path: path}
	n, err := s.Backup(f)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(out)
		return 0, fmt.Errorf("backup %s to %s: %w", path, out, err)
	}
	return n, nil
}

// Close closes the file.
func (s *Store) Close() error { return s.db.Close() }

// Path returns the file's path.
func (s *Store) Path() string { return s.path }
