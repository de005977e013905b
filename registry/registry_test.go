package registry

import (
	"context"
	"errors"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/crypto/bcrypt"
)

var mintedID = regexp.MustCompile(`^[0-9a-f]{32}$`)

func TestParseType(t *testing.T) {
	tests := []struct {
		in     string
		want   Type
		wantOK bool
	}{
		{"hostclient", HostClient, true},
		{"lobby", Lobby, true},
		{"pubsub", PubSub, true},
		{"topics", 0, false},
		{"", 0, false},
		{"Lobby", 0, false},
		{"host", 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, ok := ParseType(tt.in)
			if got != tt.want || ok != tt.wantOK {
				t.Fatalf("ParseType(%q): got (%v, %v), want (%v, %v)", tt.in, got, ok, tt.want, tt.wantOK)
			}
			if ok && got.String() != tt.in {
				t.Fatalf("ParseType(%q).String(): got %q, want %q", tt.in, got.String(), tt.in)
			}
		})
	}
	if got := Type(0).String(); got != "unknown" {
		t.Fatalf("Type(0).String(): got %q, want %q", got, "unknown")
	}
}

func TestParseRole(t *testing.T) {
	tests := []struct {
		in     string
		want   Role
		wantOK bool
	}{
		{"host", RoleHost, true},
		{"client", RoleClient, true},
		{"member", 0, false}, // a lobby's role is not a sock_type
		{"", 0, false},
		{"Host", 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, ok := ParseRole(tt.in)
			if got != tt.want || ok != tt.wantOK {
				t.Fatalf("ParseRole(%q): got (%v, %v), want (%v, %v)", tt.in, got, ok, tt.want, tt.wantOK)
			}
			if ok && got.String() != tt.in {
				t.Fatalf("ParseRole(%q).String(): got %q, want %q", tt.in, got.String(), tt.in)
			}
		})
	}
	for _, tt := range []struct {
		r    Role
		want string
	}{{RoleMember, "member"}, {0, "unknown"}} {
		if got := tt.r.String(); got != tt.want {
			t.Fatalf("Role(%d).String(): got %q, want %q", tt.r, got, tt.want)
		}
	}
}

func TestCauseString(t *testing.T) {
	tests := []struct {
		c    Cause
		want string
	}{
		{CauseAdmin, "admin"},
		{CauseGC, "gc"},
		{CauseUnused, "ttl"},
		{CauseShutdown, "shutdown"},
		{Cause(99), "unknown"},
	}
	for _, tt := range tests {
		if got := tt.c.String(); got != tt.want {
			t.Errorf("Cause(%d).String(): got %q, want %q", int(tt.c), got, tt.want)
		}
	}
}

func TestNewID(t *testing.T) {
	seen := make(map[string]bool)
	for range 1000 {
		id := NewID()
		if !mintedID.MatchString(id) {
			t.Fatalf("NewID(): got %q, want 32 lowercase hex digits", id)
		}
		if seen[id] {
			t.Fatalf("NewID(): got %q twice, want unique ids", id)
		}
		seen[id] = true
	}
}

func TestCreateMintedID(t *testing.T) {
	r := newTestRegistry(Config{})
	seen := make(map[string]bool)
	const n = 20
	for i := range n {
		typ := Lobby
		if i%2 == 0 {
			typ = HostClient
		}
		reg := mustCreate(t, r, "", typ)
		if !mintedID.MatchString(reg.ID) {
			t.Fatalf("minted id: got %q, want 32 lowercase hex digits", reg.ID)
		}
		if seen[reg.ID] {
			t.Fatalf("minted id: got %q twice, want unique ids", reg.ID)
		}
		seen[reg.ID] = true
		if reg.Type != typ {
			t.Fatalf("Type: got %v, want %v", reg.Type, typ)
		}
		if reg.Created.IsZero() {
			t.Fatalf("Created: got zero time, want the creation time")
		}
		wantLive(t, r, reg)
		wantCounts(t, reg, 0, 0, 0)
	}
	if got := r.Len(); got != n {
		t.Fatalf("Len(): got %d, want %d", got, n)
	}
}

func TestCreateWithIDReq(t *testing.T) {
	r := newTestRegistry(Config{})
	for _, id := range []string{"x", "my-room_1.A", strings.Repeat("z", 64)} {
		reg := mustCreate(t, r, id, Lobby)
		if reg.ID != id {
			t.Fatalf("ID: got %q, want %q", reg.ID, id)
		}
		wantLive(t, r, reg)
	}
	if got := r.Len(); got != 3 {
		t.Fatalf("Len(): got %d, want 3", got)
	}
}

func TestCreateExists(t *testing.T) {
	var rs removals
	r := newTestRegistry(Config{Observers: []Observer{rs.observe}})
	first := mustCreate(t, r, "room", HostClient)

	reg, err := r.Create(context.Background(), Spec{ID: "room", Type: Lobby, Key: "other", HostKey: "other"})
	if !errors.Is(err, ErrExists) || reg != nil {
		t.Fatalf("Create of a live id: got (%v, %v), want (nil, ErrExists)", reg, err)
	}
	wantLive(t, r, first)
	if got := r.Len(); got != 1 {
		t.Fatalf("Len(): got %d, want 1", got)
	}

	// Once removed, the id may be taken again, by a new registration.
	first.Remove(context.Background())
	second := mustCreate(t, r, "room", Lobby)
	if second == first {
		t.Fatalf("re-created registration: got the removed one, want a new one")
	}
	wantLive(t, r, second)
	if second.Type != Lobby {
		t.Fatalf("Type: got %v, want %v", second.Type, Lobby)
	}
}

func TestCreateTooManyRegistrations(t *testing.T) {
	r := newTestRegistry(Config{MaxRegistrations: 2})
	a := mustCreate(t, r, "", Lobby)
	mustCreate(t, r, "b", Lobby)

	for _, idReq := range []string{"", "c"} {
		reg, err := r.Create(context.Background(), Spec{ID: idReq, Type: Lobby, Key: testKey, HostKey: testHostKey})
		if !errors.Is(err, ErrTooManyRegistrations) || reg != nil {
			t.Fatalf("Create(%q) at the cap: got (%v, %v), want (nil, ErrTooManyRegistrations)", idReq, reg, err)
		}
	}
	// A taken id is reported as such even at the cap.
	if _, err := r.Create(context.Background(), Spec{ID: "b", Type: Lobby, Key: testKey, HostKey: testHostKey}); !errors.Is(err, ErrExists) {
		t.Fatalf("Create of a live id at the cap: got %v, want ErrExists", err)
	}
	if got := r.Len(); got != 2 {
		t.Fatalf("Len(): got %d, want 2", got)
	}

	a.Remove(context.Background())
	mustCreate(t, r, "c", Lobby)
	if got := r.Len(); got != 2 {
		t.Fatalf("Len(): got %d, want 2", got)
	}
}

func TestCreateKeyLength(t *testing.T) {
	r := newTestRegistry(Config{})
	long := strings.Repeat("k", MaxKeyLen)

	reg, err := r.Create(context.Background(), Spec{ID: "", Type: Lobby, Key: long, HostKey: long})
	if err != nil {
		t.Fatalf("Create with %d-byte keys: got %v, want nil", MaxKeyLen, err)
	}
	if err := reg.CheckKey(context.Background(), long, nil); err != nil {
		t.Fatalf("CheckKey of a %d-byte key: got %v, want nil", MaxKeyLen, err)
	}

	tests := []struct {
		name         string
		key, hostKey string
	}{
		{"key", long + "k", testHostKey},
		{"host key", testKey, long + "k"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reg, err := r.Create(context.Background(), Spec{ID: "too-long", Type: Lobby, Key: tt.key, HostKey: tt.hostKey})
			if !errors.Is(err, bcrypt.ErrPasswordTooLong) || reg != nil {
				t.Fatalf("Create with a %d-byte %s: got (%v, %v), want (nil, ErrPasswordTooLong)",
					MaxKeyLen+1, tt.name, reg, err)
			}
			if _, err := r.Get("too-long"); !errors.Is(err, ErrNotFound) {
				t.Fatalf("Get after a failed Create: got %v, want ErrNotFound", err)
			}
		})
	}
}

func TestGetUnknown(t *testing.T) {
	r := newTestRegistry(Config{})
	for _, id := range []string{"", "nope", NewID()} {
		if reg, err := r.Get(id); !errors.Is(err, ErrNotFound) || reg != nil {
			t.Fatalf("Get(%q): got (%v, %v), want (nil, ErrNotFound)", id, reg, err)
		}
	}
}

func TestEach(t *testing.T) {
	r := newTestRegistry(Config{})
	want := map[*Registration]bool{
		mustCreate(t, r, "a", Lobby):      true,
		mustCreate(t, r, "b", HostClient): true,
		mustCreate(t, r, "", Lobby):       true,
	}
	got := make(map[*Registration]bool)
	r.Each(func(reg *Registration) {
		if got[reg] {
			t.Fatalf("Each: got %q twice, want each once", reg.ID)
		}
		got[reg] = true
		// f may take any lock, even remove the registration.
		if reg.ID == "a" {
			reg.Remove(context.Background())
		}
	})
	if len(got) != len(want) {
		t.Fatalf("Each visited %d registrations, want %d", len(got), len(want))
	}
	for reg := range want {
		if !got[reg] {
			t.Fatalf("Each: did not visit %q", reg.ID)
		}
	}
	if n := r.Len(); n != 2 {
		t.Fatalf("Len() after removing one inside Each: got %d, want 2", n)
	}
}

func TestRegistryClose(t *testing.T) {
	var rs removals
	r := newTestRegistry(Config{Observers: []Observer{rs.observe}})
	lobby := mustCreate(t, r, "lobby", Lobby)
	hc := mustCreate(t, r, "", HostClient)
	m1, m2 := newMember("m1"), newMember("m2")
	h, c := newMember("h"), newMember("c")
	mustJoin(t, lobby, m1, RoleMember)
	mustJoin(t, lobby, m2, RoleMember)
	mustJoin(t, hc, h, RoleHost)
	mustJoin(t, hc, c, RoleClient)

	r.Close(1001, "server shutting down")

	shutdown := closeCall{1001, "server shutting down"}
	for _, m := range []*fakeMember{m1, m2, h, c} {
		wantCloses(t, m, shutdown)
	}
	for _, reg := range []*Registration{lobby, hc} {
		wantGone(t, r, reg)
		wantCounts(t, reg, 0, 0, 0)
	}
	if got := r.Len(); got != 0 {
		t.Fatalf("Len() after Close: got %d, want 0", got)
	}
	got := rs.get()
	if len(got) != 2 {
		t.Fatalf("remove events: got %d, want 2", len(got))
	}
	for _, rm := range got {
		if rm.cause != CauseShutdown {
			t.Fatalf("remove cause for %q: got %v, want %v", rm.reg.ID, rm.cause, CauseShutdown)
		}
	}

	for _, idReq := range []string{"", "new", "lobby"} {
		reg, err := r.Create(context.Background(), Spec{ID: idReq, Type: Lobby, Key: testKey, HostKey: testHostKey})
		if !errors.Is(err, ErrClosed) || reg != nil {
			t.Fatalf("Create(%q) after Close: got (%v, %v), want (nil, ErrClosed)", idReq, reg, err)
		}
	}
	if err := lobby.Join(newMember("late"), RoleMember); !errors.Is(err, ErrClosed) {
		t.Fatalf("Join after Close: got %v, want ErrClosed", err)
	}

	// Closing again and late leaves change nothing.
	r.Close(1001, "server shutting down")
	lobby.Leave(m1, Closure{})
	hc.Leave(h, Closure{})
	for _, m := range []*fakeMember{m1, m2, h, c} {
		wantCloses(t, m, shutdown)
	}
	if got := len(rs.get()); got != 2 {
		t.Fatalf("remove events after a second Close: got %d, want 2", got)
	}
}
