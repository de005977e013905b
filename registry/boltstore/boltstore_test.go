package boltstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	bolt "go.etcd.io/bbolt"

	"wsrouter/registry"
	"wsrouter/registry/storetest"
)

var rec, equal = storetest.Record, storetest.Equal

func openTemp(t *testing.T) *Store {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "wsrouter.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// TestStoreContract runs the conformance suite against the memory store
// and the file store.
func TestStoreContract(t *testing.T) {
	t.Run("memory", func(t *testing.T) {
		storetest.Run(t, func(*testing.T) registry.Store { return &registry.MemoryStore{} })
	})
	t.Run("bolt", func(t *testing.T) {
		storetest.Run(t, func(t *testing.T) registry.Store { return openTemp(t) })
	})
}

func TestReopenKeeps(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "x.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Put(ctx, rec("kept", 7)); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got, _ := s.Load(ctx); len(got) != 1 || !equal(got[0], rec("kept", 7)) {
		t.Fatalf("after reopening: got %+v", got)
	}
}

func TestOpenRefuses(t *testing.T) {
	dir := t.TempDir()
	held := filepath.Join(dir, "held.db")
	s, err := Open(held)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	garbage := filepath.Join(dir, "garbage.db")
	os.WriteFile(garbage, []byte(strings.Repeat("not a database ", 1000)), 0o600)

	truncated := filepath.Join(dir, "truncated.db")
	{
		path := filepath.Join(dir, "full.db")
		full, err := Open(path)
		if err != nil {
			t.Fatal(err)
		}
		for i := range 100 {
			full.Put(context.Background(), rec(strings.Repeat("x", 10)+string(rune('a'+i%26))+string(rune('a'+i/26)), uint64(i+1)))
		}
		full.Close()
		b, _ := os.ReadFile(path)
		os.WriteFile(truncated, b[:len(b)/3], 0o600)
	}

	newer := filepath.Join(dir, "newer.db")
	{
		db, err := bolt.Open(newer, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		db.Update(func(tx *bolt.Tx) error {
			m, _ := tx.CreateBucket(bucketMeta)
			tx.CreateBucket(bucketRegs)
			return m.Put(keySchema, []byte("99"))
		})
		db.Close()
	}
	foreign := filepath.Join(dir, "foreign.db")
	{
		db, err := bolt.Open(foreign, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		db.Update(func(tx *bolt.Tx) error { _, err := tx.CreateBucket([]byte("other")); return err })
		db.Close()
	}

	for _, tt := range []struct {
		name, path, want string
	}{
		{"held by another process", held, "another wsrouter holds the data file"},
		{"not a database", garbage, "garbage.db"},
		{"truncated", truncated, "truncated.db"},
		{"newer schema", newer, "newer wsrouter"},
		{"another program's bolt file", foreign, "not a wsrouter data file"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Open(tt.path)
			if err == nil {
				s.Close()
				t.Fatalf("Open: got nil, want an error")
			}
			if !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), filepath.Base(tt.path)) {
				t.Fatalf("Open: got %q, want it to name the file and say %q", err, tt.want)
			}
		})
	}
}

func TestBackup(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "live.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	s.Put(ctx, rec("a", 1))
	s.Close()
	out := filepath.Join(dir, "copy.db")
	if _, err := BackupFile(path, out); err != nil {
		t.Fatal(err)
	}
	if _, err := BackupFile(path, out); err == nil {
		t.Fatal("BackupFile over an existing file: got nil, want an error")
	}
	c, err := Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, _ := c.Load(ctx); len(got) != 1 || !equal(got[0], rec("a", 1)) {
		t.Fatalf("copy holds %+v", got)
	}
	// A file a router holds is refused, with what to do instead.
	held, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if _, err := BackupFile(path, filepath.Join(dir, "copy2.db")); !errors.Is(err, ErrLocked) {
		t.Fatalf("BackupFile of a held file: got %v, want ErrLocked", err)
	}
}

// TestTruncatedAnywhere: a data file cut at any point fails Open with an
// error; none crashes the process (bbolt faults reading past the end of a
// mapped file that is shorter than it says).
func TestTruncatedAnywhere(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "full.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for i := range 2000 {
		s.Put(ctx, storetest.Record(fmt.Sprintf("reg-%05d", i), uint64(i+1)))
	}
	s.Close()
	full, _ := os.ReadFile(path)
	for cut := int64(4096); cut < int64(len(full)); cut += int64(len(full)) / 40 {
		p := filepath.Join(dir, fmt.Sprintf("cut-%d.db", cut))
		os.WriteFile(p, full[:cut], 0o600)
		s, err := Open(p)
		if err == nil {
			// A cut that leaves a consistent file is no error; its load
			// must then work too.
			_, err = s.Load(ctx)
			s.Close()
			if err != nil && !strings.Contains(err.Error(), p) {
				t.Fatalf("cut at %d: load error %q does not name the file", cut, err)
			}
			continue
		}
		if !strings.Contains(err.Error(), p) {
			t.Fatalf("cut at %d: error %q does not name the file", cut, err)
		}
	}
}

// TestSecretKept: a secret is made once, kept across a reopen, and never
// remade, also when two callers race to make it.
func TestSecretKept(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	var made atomic.Int32
	create := func() ([]byte, error) { return []byte(fmt.Sprintf("secret-%d", made.Add(1))), nil }
	got := make([][]byte, 8)
	var wg sync.WaitGroup
	for i := range got {
		wg.Go(func() {
			v, err := s.Secret("token-key", create)
			if err != nil {
				t.Error(err)
			}
			got[i] = v
		})
	}
	wg.Wait()
	for _, v := range got[1:] {
		if !bytes.Equal(v, got[0]) {
			t.Fatalf("callers got different secrets: %q and %q", got[0], v)
		}
	}
	s.Close()
	if s, err = Open(path); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	again, err := s.Secret("token-key", func() ([]byte, error) { return nil, errors.New("must not be made again") })
	if err != nil || !bytes.Equal(again, got[0]) {
		t.Fatalf("after reopening: %q, %v; want %q", again, err, got[0])
	}
}
