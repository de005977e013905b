package registry

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

func TestCheckKeys(t *testing.T) {
	r := newTestRegistry(Config{})
	reg := mustCreate(t, r, "", HostClient)

	checkKey := (*Registration).CheckKey
	checkHostKey := (*Registration).CheckHostKey
	tests := []struct {
		name    string
		check   func(*Registration, context.Context, string, Gate) error
		key     string
		wantErr error
	}{
		{"key right", checkKey, testKey, nil},
		{"key wrong", checkKey, "nope", ErrForbidden},
		{"key empty", checkKey, "", ErrForbidden},
		{"key prefix", checkKey, testKey[:len(testKey)-1], ErrForbidden},
		{"key longer", checkKey, testKey + "x", ErrForbidden},
		{"key case", checkKey, "S3CRET-KEY", ErrForbidden},
		{"host key as key", checkKey, testHostKey, ErrForbidden},
		{"host key right", checkHostKey, testHostKey, nil},
		{"host key wrong", checkHostKey, "nope", ErrForbidden},
		{"host key empty", checkHostKey, "", ErrForbidden},
		{"key as host key", checkHostKey, testKey, ErrForbidden},
	}
	// Twice: the second round runs with both right keys remembered, which
	// must not change any answer.
	for round := 1; round <= 2; round++ {
		for _, tt := range tests {
			err := tt.check(reg, context.Background(), tt.key, nil)
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("round %d, %s: got %v, want %v", round, tt.name, err, tt.wantErr)
			}
		}
	}
}

func TestCheckKeyRemembered(t *testing.T) {
	var kc keyChecks
	r := newTestRegistry(Config{OnKeyCheck: kc.record})
	reg := mustCreate(t, r, "", HostClient)
	ctx := context.Background()

	steps := []struct {
		name    string
		check   func(context.Context, string, Gate) error
		key     string
		wantErr error
		wantHow KeyCheck
	}{
		{"first right key", reg.CheckKey, testKey, nil, KeyBcrypt},
		{"second right key", reg.CheckKey, testKey, nil, KeyRemembered},
		{"wrong key", reg.CheckKey, "wrong", ErrForbidden, KeyBcrypt},
		{"wrong key again", reg.CheckKey, "wrong", ErrForbidden, KeyBcrypt},
		{"right key after wrong", reg.CheckKey, testKey, nil, KeyRemembered},
		// The host key has its own memo: the remembered key does not open it.
		{"key as host key", reg.CheckHostKey, testKey, ErrForbidden, KeyBcrypt},
		{"first right host key", reg.CheckHostKey, testHostKey, nil, KeyBcrypt},
		{"second right host key", reg.CheckHostKey, testHostKey, nil, KeyRemembered},
		{"host key as key", reg.CheckKey, testHostKey, ErrForbidden, KeyBcrypt},
		{"right key still remembered", reg.CheckKey, testKey, nil, KeyRemembered},
	}
	var wantHows []KeyCheck
	for _, s := range steps {
		err := s.check(ctx, s.key, nil)
		if !errors.Is(err, s.wantErr) {
			t.Fatalf("%s: got %v, want %v", s.name, err, s.wantErr)
		}
		wantHows = append(wantHows, s.wantHow)
		if got, _ := kc.get(); !slices.Equal(got, wantHows) {
			t.Fatalf("%s: OnKeyCheck got %v, want %v", s.name, got, wantHows)
		}
	}

	// A second registration with the same keys remembers nothing yet.
	other := mustCreate(t, r, "", HostClient)
	if err := other.CheckKey(ctx, testKey, nil); err != nil {
		t.Fatalf("CheckKey on another registration: got %v, want nil", err)
	}
	hows, _ := kc.get()
	if got := hows[len(hows)-1]; got != KeyBcrypt {
		t.Fatalf("first check on another registration: got %v, want %v", got, KeyBcrypt)
	}
}

func TestCheckKeyErrorNamesRegistration(t *testing.T) {
	r := newTestRegistry(Config{})
	reg := mustCreate(t, r, "room-42", Lobby)
	err := reg.CheckKey(context.Background(), "wrong", nil)
	if !errors.Is(err, ErrForbidden) {
		t.Fatalf("CheckKey: got %v, want ErrForbidden", err)
	}
	if got, want := err.Error(), "check key for room-42: wrong key"; got != want {
		t.Fatalf("error text: got %q, want %q", got, want)
	}
}

// occupy takes the only hash worker of r, as a long bcrypt would, and
// returns the function that gives it back.
func occupy(r *Registry) (release func()) {
	r.hasher.sem <- struct{}{}
	return func() { <-r.hasher.sem }
}

func TestCheckKeyBusy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var kc keyChecks
		const wait = 1500 * time.Millisecond
		r := newTestRegistry(Config{HashWorkers: 1, HashWait: wait, OnKeyCheck: kc.record})
		reg := mustCreate(t, r, "", Lobby)
		ctx := context.Background()

		release := occupy(r)
		for _, key := range []string{testKey, "wrong"} {
			start := time.Now()
			err := reg.CheckKey(ctx, key, nil)
			if !errors.Is(err, ErrBusy) {
				t.Fatalf("CheckKey(%q) with the pool busy: got %v, want ErrBusy", key, err)
			}
			if got := time.Since(start); got != wait {
				t.Fatalf("CheckKey(%q) gave up after %v, want %v", key, got, wait)
			}
		}
		if err := reg.CheckHostKey(ctx, testHostKey, nil); !errors.Is(err, ErrBusy) {
			t.Fatalf("CheckHostKey with the pool busy: got %v, want ErrBusy", err)
		}
		if hows, _ := kc.get(); len(hows) != 0 {
			t.Fatalf("OnKeyCheck after ErrBusy: got %v, want no calls", hows)
		}

		// A Create that cannot hash registers nothing.
		if got, err := r.Create(ctx, Spec{ID: "busy", Type: Lobby, Key: testKey, HostKey: testHostKey}); !errors.Is(err, ErrBusy) || got != nil {
			t.Fatalf("Create with the pool busy: got (%v, %v), want (nil, ErrBusy)", got, err)
		}
		if _, err := r.Get("busy"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Get after a busy Create: got %v, want ErrNotFound", err)
		}
		if got := r.Len(); got != 1 {
			t.Fatalf("Len(): got %d, want 1", got)
		}

		// A busy check remembered nothing: once the worker is free, the
		// right key still costs bcrypt the first time.
		release()
		if err := reg.CheckKey(ctx, testKey, nil); err != nil {
			t.Fatalf("CheckKey with the pool free: got %v, want nil", err)
		}
		if hows, _ := kc.get(); !slices.Equal(hows, []KeyCheck{KeyBcrypt}) {
			t.Fatalf("OnKeyCheck: got %v, want [%v]", hows, KeyBcrypt)
		}

		// A remembered key needs no worker at all; a wrong one still does.
		release = occupy(r)
		defer release()
		start := time.Now()
		if err := reg.CheckKey(ctx, testKey, nil); err != nil {
			t.Fatalf("remembered CheckKey with the pool busy: got %v, want nil", err)
		}
		if got := time.Since(start); got != 0 {
			t.Fatalf("remembered CheckKey took %v, want no wait", got)
		}
		if err := reg.CheckKey(ctx, "wrong", nil); !errors.Is(err, ErrBusy) {
			t.Fatalf("wrong CheckKey with the pool busy: got %v, want ErrBusy", err)
		}
		if hows, _ := kc.get(); !slices.Equal(hows, []KeyCheck{KeyBcrypt, KeyRemembered}) {
			t.Fatalf("OnKeyCheck: got %v, want [%v %v]", hows, KeyBcrypt, KeyRemembered)
		}
	})
}

func TestCheckKeyWaitsForWorker(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var kc keyChecks
		r := newTestRegistry(Config{HashWorkers: 1, HashWait: time.Second, OnKeyCheck: kc.record})
		reg := mustCreate(t, r, "", Lobby)

		release := occupy(r)
		done := make(chan error, 1)
		go func() { done <- reg.CheckKey(context.Background(), testKey, nil) }()

		// Just short of HashWait the check is still waiting.
		time.Sleep(time.Second - time.Millisecond)
		synctest.Wait()
		select {
		case err := <-done:
			t.Fatalf("CheckKey returned %v while the only worker was busy, want it to wait", err)
		default:
		}

		release()
		synctest.Wait()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("CheckKey after the worker freed: got %v, want nil", err)
			}
		default:
			t.Fatalf("CheckKey still waiting after the worker freed, want it done")
		}
		hows, durs := kc.get()
		if !slices.Equal(hows, []KeyCheck{KeyBcrypt}) {
			t.Fatalf("OnKeyCheck: got %v, want [%v]", hows, KeyBcrypt)
		}
		// The observed time includes the wait for a worker.
		if want := time.Second - time.Millisecond; durs[0] < want {
			t.Fatalf("OnKeyCheck duration: got %v, want at least %v", durs[0], want)
		}
	})
}

func TestCheckKeyCanceled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var kc keyChecks
		r := newTestRegistry(Config{HashWorkers: 1, HashWait: time.Hour, OnKeyCheck: kc.record})
		reg := mustCreate(t, r, "", Lobby)
		release := occupy(r)
		defer release()

		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- reg.CheckKey(ctx, testKey, nil) }()
		time.Sleep(time.Second)
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("CheckKey canceled while waiting for a worker: got %v, want context.Canceled", err)
		}
		// A canceled check reached no decision: it is not observed.
		if hows, _ := kc.get(); len(hows) != 0 {
			t.Fatalf("OnKeyCheck after cancel: got %v, want no calls", hows)
		}

		ctx, cancel = context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		got, err := r.Create(ctx, Spec{ID: "canceled", Type: Lobby, Key: testKey, HostKey: testHostKey})
		if !errors.Is(err, context.DeadlineExceeded) || got != nil {
			t.Fatalf("Create past its deadline: got (%v, %v), want (nil, DeadlineExceeded)", got, err)
		}
		if _, err := r.Get("canceled"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Get after a canceled Create: got %v, want ErrNotFound", err)
		}
	})
}

// TestCheckKeySharesOneBcrypt: concurrent checks of the same key for the same
// registration run one bcrypt between them, pass the gate once, and all get
// its answer; a different key is a bcrypt of its own.
func TestCheckKeySharesOneBcrypt(t *testing.T) {
	for _, tt := range []struct {
		name    string
		key     string
		wantErr error
	}{
		{"right key", testKey, nil},
		{"wrong key", "wrong", ErrForbidden},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				var kc keyChecks
				r := newTestRegistry(Config{OnKeyCheck: kc.record, HashWorkers: 1})
				reg := mustCreate(t, r, "", HostClient)

				var mu sync.Mutex
				var gates, ends, failed int
				gate := func() (func(bool), error) {
					mu.Lock()
					defer mu.Unlock()
					gates++
					return func(f bool) {
						mu.Lock()
						defer mu.Unlock()
						ends++
						if f {
							failed++
						}
					}, nil
				}

				r.hasher.sem <- struct{}{} // hold the only worker
				const n = 20
				errs := make(chan error, n)
				for range n {
					go func() { errs <- reg.CheckKey(context.Background(), tt.key, gate) }()
				}
				synctest.Wait() // all waiting: one for the worker, the rest for it
				<-r.hasher.sem
				for range n {
					if err := <-errs; !errors.Is(err, tt.wantErr) {
						t.Errorf("CheckKey: got %v, want %v", err, tt.wantErr)
					}
				}
				wantFailed := 0
				if tt.wantErr != nil {
					wantFailed = 1
				}
				if gates != 1 || ends != 1 || failed != wantFailed {
					t.Errorf("gate: got %d calls, %d ends, %d failed; want 1, 1, %d", gates, ends, failed, wantFailed)
				}
				hows, _ := kc.get()
				var bcrypts, shared int
				for _, h := range hows {
					switch h {
					case KeyBcrypt:
						bcrypts++
					case KeyShared:
						shared++
					}
				}
				if bcrypts != 1 || shared != n-1 {
					t.Errorf("key checks: got %d bcrypt and %d shared, want 1 and %d", bcrypts, shared, n-1)
				}
			})
		})
	}
}

// TestCheckKeysSameWork: /remove's check of both keys runs two bcrypts
// whichever key is wrong, ignores and leaves the remembered keys alone.
func TestCheckKeysSameWork(t *testing.T) {
	var kc keyChecks
	r := newTestRegistry(Config{OnKeyCheck: kc.record})
	reg := mustCreate(t, r, "", HostClient)
	ctx := context.Background()
	for _, tt := range []struct {
		name         string
		key, hostKey string
		wantWrong    int
	}{
		{"both wrong", "x", "y", 2},
		{"key wrong", "x", testHostKey, 1},
		{"host key wrong", testKey, "y", 1},
		{"both right", testKey, testHostKey, 0},
	} {
		before := r.hasher.compares.Load()
		wrong, err := reg.CheckKeys(ctx, tt.key, tt.hostKey, nil)
		if n := r.hasher.compares.Load() - before; n != 2 {
			t.Errorf("%s: %d bcrypt comparisons, want 2 whichever key is wrong", tt.name, n)
		}
		if wrong != tt.wantWrong || (tt.wantWrong > 0) != errors.Is(err, ErrForbidden) {
			t.Errorf("%s: got %d wrong, %v; want %d wrong", tt.name, wrong, err, tt.wantWrong)
		}
	}
	// Nothing was remembered: a later check of the key still runs bcrypt.
	if err := reg.CheckKey(ctx, testKey, nil); err != nil {
		t.Fatalf("CheckKey: %v", err)
	}
	hows, _ := kc.get()
	if got := hows[len(hows)-1]; got != KeyBcrypt {
		t.Errorf("key check after CheckKeys: got %v, want %v (nothing remembered)", got, KeyBcrypt)
	}
}
