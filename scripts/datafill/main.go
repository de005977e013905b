// Command datafill writes a wsrouter data file holding -n registrations, to
// measure a start with many stored registrations and the file's size:
//
//	go run ./scripts/datafill -n 100000 -out /tmp/big.db
//	time wsrouter -data /tmp/big.db   # until the "listening" line
//
// Every registration gets the same key hashes (of the keys "key" and
// "host-key", bcrypt cost 4): hashing 200,000 keys would take minutes and
// tells nothing about the store.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"

	"wsrouter/registry"
	"wsrouter/registry/boltstore"
)

func main() {
	n := flag.Int("n", 100000, "registrations to store")
	out := flag.String("out", "", "data file to create (must not exist)")
	flag.Parse()
	if *out == "" {
		fmt.Fprintln(os.Stderr, "datafill: -out is required")
		os.Exit(2)
	}
	if _, err := os.Stat(*out); err == nil {
		fmt.Fprintf(os.Stderr, "datafill: %s exists\n", *out)
		os.Exit(2)
	}
	if err := fill(*n, *out); err != nil {
		fmt.Fprintln(os.Stderr, "datafill:", err)
		os.Exit(1)
	}
}

func fill(n int, out string) error {
	key, _ := bcrypt.GenerateFromPassword([]byte("key"), 4)
	host, _ := bcrypt.GenerateFromPassword([]byte("host-key"), 4)
	s, err := boltstore.Open(out)
	if err != nil {
		return err
	}
	defer s.Close()
	start := time.Now()
	ids := make(chan int)
	errs := make(chan error, 1)
	var wg sync.WaitGroup
	// Concurrent Puts share commits, as concurrent /register calls do.
	for range 256 {
		wg.Go(func() {
			for i := range ids {
				rec := registry.Record{
					ID: registry.NewID(), Type: registry.HostClient, Created: time.Now(),
					KeyHash: key, HostKeyHash: host, Generation: uint64(i + 1),
				}
				if err := s.Put(context.Background(), rec); err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}
		})
	}
	for i := range n {
		ids <- i
	}
	close(ids)
	wg.Wait()
	select {
	case err := <-errs:
		return err
	default:
	}
	fi, err := os.Stat(out)
	if err != nil {
		return err
	}
	fmt.Printf("%d registrations in %s: %d bytes, %.0f bytes each, written in %v\n",
		n, out, fi.Size(), float64(fi.Size())/float64(n), time.Since(start).Round(time.Millisecond))
	return nil
}
