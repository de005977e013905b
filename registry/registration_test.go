package registry

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

func TestJoinLeaveCounts(t *testing.T) {
	r := newTestRegistry(Config{GCGrace: time.Hour})
	reg := mustCreate(t, r, "", HostClient)
	h1, h2, c1 := newMember("h1"), newMember("h2"), newMember("c1")

	steps := []struct {
		name                    string
		do                      func()
		hosts, clients, members int
	}{
		{"join h1", func() { mustJoin(t, reg, h1, RoleHost) }, 1, 0, 0},
		{"join h2", func() { mustJoin(t, reg, h2, RoleHost) }, 2, 0, 0},
		{"join c1", func() { mustJoin(t, reg, c1, RoleClient) }, 2, 1, 0},
		{"leave h1", func() { reg.Leave(h1, Closure{}) }, 1, 1, 0},
		{"leave h1 again", func() { reg.Leave(h1, Closure{}) }, 1, 1, 0},
		{"leave a stranger", func() { reg.Leave(newMember("stranger"), Closure{}) }, 1, 1, 0},
		{"leave c1", func() { reg.Leave(c1, Closure{}) }, 1, 0, 0},
		{"leave h2", func() { reg.Leave(h2, Closure{}) }, 0, 0, 0},
		{"rejoin c1", func() { mustJoin(t, reg, c1, RoleClient) }, 0, 1, 0},
	}
	for _, s := range steps {
		s.do()
		h, c, m := reg.Counts()
		if h != s.hosts || c != s.clients || m != s.members {
			t.Fatalf("after %s: Counts() got (%d, %d, %d), want (%d, %d, %d)",
				s.name, h, c, m, s.hosts, s.clients, s.members)
		}
	}
	// Leaving is not closing: the registry never closes a member that left.
	for _, m := range []*fakeMember{h1, h2, c1} {
		wantCloses(t, m)
	}
	wantLive(t, r, reg)

	lobby := mustCreate(t, r, "", Lobby)
	for i := range 3 {
		mustJoin(t, lobby, newMember(fmt.Sprint("m", i)), RoleMember)
	}
	wantCounts(t, lobby, 0, 0, 3)
}

func TestJoinTooManyMembers(t *testing.T) {
	r := newTestRegistry(Config{MaxMembers: 2, GCGrace: time.Hour})
	reg := mustCreate(t, r, "full", HostClient)
	h, c, extra := newMember("h"), newMember("c"), newMember("extra")
	mustJoin(t, reg, h, RoleHost)
	mustJoin(t, reg, c, RoleClient)

	for _, role := range []Role{RoleHost, RoleClient} {
		if err := reg.Join(extra, role); !errors.Is(err, ErrTooManyMembers) {
			t.Fatalf("Join as %v at MaxMembers: got %v, want ErrTooManyMembers", role, err)
		}
	}
	wantCounts(t, reg, 1, 1, 0)
	if n := reg.Deliver(h, RoleHost, Message{Data: []byte("hi")}); n != 1 {
		t.Fatalf("Broadcast after a refused join: got %d receivers, want 1", n)
	}
	if got := extra.messages(); len(got) != 0 {
		t.Fatalf("refused member received %d messages, want 0", len(got))
	}

	reg.Leave(c, Closure{})
	mustJoin(t, reg, extra, RoleClient)
	wantCounts(t, reg, 1, 1, 0)

	// Each registration has its own cap.
	other := mustCreate(t, r, "", Lobby)
	mustJoin(t, other, newMember("o1"), RoleMember)
	mustJoin(t, other, newMember("o2"), RoleMember)
}

func TestJoinRemoved(t *testing.T) {
	r := newTestRegistry(Config{})
	reg := mustCreate(t, r, "", Lobby)
	reg.Remove(context.Background())
	m := newMember("late")
	if err := reg.Join(m, RoleMember); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Join on a removed registration: got %v, want ErrNotFound", err)
	}
	wantCounts(t, reg, 0, 0, 0)
	wantCloses(t, m)
}

func TestBroadcastLobby(t *testing.T) {
	r := newTestRegistry(Config{})
	reg := mustCreate(t, r, "", Lobby)
	a, b, c := newMember("a"), newMember("b"), newMember("c")
	for _, m := range []*fakeMember{a, b, c} {
		mustJoin(t, reg, m, RoleMember)
	}

	text := Message{Data: []byte("hello")}
	bin := Message{Binary: true, Data: []byte{0, 1, 2, 0xff}}
	if n := reg.Deliver(a, RoleMember, text); n != 2 {
		t.Fatalf("Broadcast from a: got %d receivers, want 2", n)
	}
	if n := reg.Deliver(b, RoleMember, bin); n != 2 {
		t.Fatalf("Broadcast from b: got %d receivers, want 2", n)
	}

	want := map[*fakeMember][]Message{
		a: {bin},
		b: {text},
		c: {text, bin},
	}
	for m, msgs := range want {
		got := m.messages()
		if len(got) != len(msgs) {
			t.Fatalf("%s received %d messages, want %d", m, len(got), len(msgs))
		}
		for i := range msgs {
			if got[i].Binary != msgs[i].Binary || string(got[i].Data) != string(msgs[i].Data) {
				t.Fatalf("%s message %d: got %+v, want %+v", m, i, got[i], msgs[i])
			}
			// The bytes are shared, not copied per receiver.
			if &got[i].Data[0] != &msgs[i].Data[0] {
				t.Fatalf("%s message %d: got a copy of the bytes, want the sender's slice", m, i)
			}
		}
	}

	// A sender alone in the room reaches nobody.
	solo := mustCreate(t, r, "", Lobby)
	s := newMember("s")
	mustJoin(t, solo, s, RoleMember)
	if n := solo.Deliver(s, RoleMember, text); n != 0 {
		t.Fatalf("Broadcast alone: got %d receivers, want 0", n)
	}
	if got := s.messages(); len(got) != 0 {
		t.Fatalf("sender received %d of its own messages, want 0", len(got))
	}
}

func TestBroadcastHostClient(t *testing.T) {
	tests := []struct {
		name string
		from string
		role Role
		want []string
	}{
		{"host to clients", "h1", RoleHost, []string{"c1", "c2"}},
		{"other host to clients", "h2", RoleHost, []string{"c1", "c2"}},
		{"client to hosts", "c1", RoleClient, []string{"h1", "h2"}},
		{"other client to hosts", "c2", RoleClient, []string{"h1", "h2"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newTestRegistry(Config{})
			reg := mustCreate(t, r, "", HostClient)
			members := map[string]*fakeMember{}
			for _, name := range []string{"h1", "h2", "c1", "c2"} {
				members[name] = newMember(name)
				role := RoleClient
				if name[0] == 'h' {
					role = RoleHost
				}
				mustJoin(t, reg, members[name], role)
			}

			msg := Message{Data: []byte(tt.name)}
			if n := reg.Deliver(members[tt.from], tt.role, msg); n != len(tt.want) {
				t.Fatalf("Broadcast from %s: got %d receivers, want %d", tt.from, n, len(tt.want))
			}
			var got []string
			for name, m := range members {
				msgs := m.messages()
				switch len(msgs) {
				case 0:
				case 1:
					if string(msgs[0].Data) != tt.name {
						t.Fatalf("%s received %q, want %q", name, msgs[0].Data, tt.name)
					}
					got = append(got, name)
				default:
					t.Fatalf("%s received %d messages, want at most 1", name, len(msgs))
				}
			}
			slices.Sort(got)
			if !slices.Equal(got, tt.want) {
				t.Fatalf("receivers: got %v, want %v", got, tt.want)
			}
		})
	}
}

func TestPickHost(t *testing.T) {
	r := newTestRegistry(Config{GCGrace: time.Hour})

	lobby := mustCreate(t, r, "", Lobby)
	mustJoin(t, lobby, newMember("m"), RoleMember)
	if got := lobby.PickHost(); got != nil {
		t.Fatalf("PickHost in a lobby: got %v, want nil", got)
	}

	reg := mustCreate(t, r, "", HostClient)
	if got := reg.PickHost(); got != nil {
		t.Fatalf("PickHost with nobody: got %v, want nil", got)
	}
	mustJoin(t, reg, newMember("c"), RoleClient)
	if got := reg.PickHost(); got != nil {
		t.Fatalf("PickHost with only a client: got %v, want nil", got)
	}

	hosts := []*fakeMember{newMember("h1"), newMember("h2"), newMember("h3")}
	for _, h := range hosts {
		mustJoin(t, reg, h, RoleHost)
	}
	const rounds = 4
	picks := make([]Member, 0, rounds*len(hosts))
	for range rounds * len(hosts) {
		picks = append(picks, reg.PickHost())
	}
	count := map[Member]int{}
	for i, p := range picks {
		count[p]++
		if i >= len(hosts) && p != picks[i-len(hosts)] {
			t.Fatalf("pick %d: got %v, want %v (the same as one round earlier)", i, p, picks[i-len(hosts)])
		}
	}
	for _, h := range hosts {
		if count[h] != rounds {
			t.Fatalf("%s picked %d times in %d picks, want %d", h, count[h], len(picks), rounds)
		}
	}

	// A host that left is never picked.
	reg.Leave(hosts[0], Closure{})
	for i := range 4 {
		if got := reg.PickHost(); got == hosts[0] || got == nil {
			t.Fatalf("pick %d after h1 left: got %v, want h2 or h3", i, got)
		}
	}
	reg.Leave(hosts[1], Closure{})
	reg.Leave(hosts[2], Closure{})
	if got := reg.PickHost(); got != nil {
		t.Fatalf("PickHost after every host left: got %v, want nil", got)
	}
}

func TestRemove(t *testing.T) {
	var rs removals
	r := newTestRegistry(Config{Observers: []Observer{rs.observe}})
	reg := mustCreate(t, r, "gone", HostClient)
	keep := mustCreate(t, r, "kept", Lobby)
	h, c1, c2 := newMember("h"), newMember("c1"), newMember("c2")
	mustJoin(t, reg, h, RoleHost)
	mustJoin(t, reg, c1, RoleClient)
	mustJoin(t, reg, c2, RoleClient)
	k := newMember("k")
	mustJoin(t, keep, k, RoleMember)

	reg.Remove(context.Background())

	for _, m := range []*fakeMember{h, c1, c2} {
		wantCloses(t, m, removedClose)
	}
	wantGone(t, r, reg)
	wantCounts(t, reg, 0, 0, 0)
	wantRemovals(t, &rs, removal{reg, CauseAdmin})
	if got := reg.PickHost(); got != nil {
		t.Fatalf("PickHost after Remove: got %v, want nil", got)
	}
	if n := reg.Deliver(c1, RoleClient, Message{Data: []byte("x")}); n != 0 {
		t.Fatalf("Broadcast after Remove: got %d receivers, want 0", n)
	}

	// Idempotent: nobody is closed twice, no second remove event.
	reg.Remove(context.Background())
	reg.Leave(h, Closure{})
	for _, m := range []*fakeMember{h, c1, c2} {
		wantCloses(t, m, removedClose)
	}
	wantRemovals(t, &rs, removal{reg, CauseAdmin})

	// Other registrations are untouched.
	wantLive(t, r, keep)
	wantCounts(t, keep, 0, 0, 1)
	wantCloses(t, k)
	if got := r.Len(); got != 1 {
		t.Fatalf("Len(): got %d, want 1", got)
	}
}

func TestStats(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newTestRegistry(Config{GCGrace: time.Hour})
		reg := mustCreate(t, r, "", HostClient)

		in, out, last := reg.Stats()
		if in != 0 || out != 0 || !last.Equal(reg.Created) {
			t.Fatalf("Stats() when new: got (%d, %d, %v), want (0, 0, %v)", in, out, last, reg.Created)
		}

		h, c1, c2 := newMember("h"), newMember("c1"), newMember("c2")
		time.Sleep(time.Minute)
		mustJoin(t, reg, h, RoleHost)
		if _, _, last := reg.Stats(); !last.Equal(time.Now()) {
			t.Fatalf("last active after a join: got %v, want %v", last, time.Now())
		}
		mustJoin(t, reg, c1, RoleClient)
		mustJoin(t, reg, c2, RoleClient)

		time.Sleep(time.Minute)
		reg.Deliver(h, RoleHost, Message{Data: []byte("1")})    // 2 out
		reg.Deliver(c1, RoleClient, Message{Data: []byte("2")}) // 1 out
		reg.Deliver(c2, RoleClient, Message{Data: []byte("3")}) // 1 out
		in, out, last = reg.Stats()
		if in != 3 || out != 4 || !last.Equal(time.Now()) {
			t.Fatalf("Stats() after 3 messages: got (%d, %d, %v), want (3, 4, %v)", in, out, last, time.Now())
		}

		time.Sleep(time.Minute)
		reg.Leave(c2, Closure{})
		if _, _, last := reg.Stats(); !last.Equal(time.Now()) {
			t.Fatalf("last active after a leave: got %v, want %v", last, time.Now())
		}
		reg.Deliver(c1, RoleClient, Message{Data: []byte("4")}) // 1 out
		if in, out, _ := reg.Stats(); in != 4 || out != 5 {
			t.Fatalf("Stats() after 4 messages: got (%d, %d), want (4, 5)", in, out)
		}
	})
}

// TestConcurrentUse runs joins, leaves, broadcasts, picks, key checks and a
// removal at once, for the race detector; it then checks that every member
// still joined at the removal was closed exactly once.
func TestConcurrentUse(t *testing.T) {
	var rs removals
	r := newTestRegistry(Config{GCGrace: time.Hour, Observers: []Observer{rs.observe}})
	reg := mustCreate(t, r, "", HostClient)
	anchor := newMember("anchor")
	mustJoin(t, reg, anchor, RoleHost)

	const workers = 8
	var wg sync.WaitGroup
	start := make(chan struct{})
	members := make([]*fakeMember, workers)
	for i := range workers {
		m := newMember(fmt.Sprint("w", i))
		members[i] = m
		role := RoleClient
		if i%2 == 0 {
			role = RoleHost
		}
		wg.Go(func() {
			<-start
			for j := range 50 {
				if err := reg.Join(m, role); err != nil {
					// A join that meets the removal while it is made
					// durable is refused as ErrRemoving, after it as
					// ErrNotFound.
					if !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrRemoving) {
						t.Errorf("Join: got %v, want nil, ErrRemoving or ErrNotFound", err)
					}
					return
				}
				reg.Deliver(m, role, Message{Data: []byte{byte(j)}})
				reg.PickHost()
				reg.Counts()
				reg.Stats()
				if j%10 == 0 {
					if err := reg.CheckKey(t.Context(), testKey, nil); err != nil {
						t.Errorf("CheckKey: got %v, want nil", err)
					}
				}
				if j < 49 {
					reg.Leave(m, Closure{})
				}
			}
		})
	}
	close(start)
	wg.Go(func() { reg.Remove(context.Background()) })
	wg.Wait()

	wantGone(t, r, reg)
	wantRemovals(t, &rs, removal{reg, CauseAdmin})
	wantCloses(t, anchor, removedClose)
	for _, m := range members {
		if got := m.closeCalls(); len(got) > 1 {
			t.Fatalf("%s closed %d times, want at most once", m, len(got))
		}
	}
}
