package registry

import (
	"context"
	"testing"
	"testing/synctest"
	"time"
)

// Every test here runs in a synctest bubble: time.Sleep advances the fake
// clock and synctest.Wait lets the registry's timer callbacks finish.

const grace = 30 * time.Second

func TestGCAfterGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var rs removals
		r := newTestRegistry(Config{GCGrace: grace, Observers: []Observer{rs.observe}})
		reg := mustCreate(t, r, "", Lobby)
		a, b := newMember("a"), newMember("b")
		mustJoin(t, reg, a, RoleMember)
		mustJoin(t, reg, b, RoleMember)

		// While a member remains, no timer runs.
		reg.Leave(a, Closure{})
		time.Sleep(10 * grace)
		synctest.Wait()
		wantLive(t, r, reg)

		reg.Leave(b, Closure{})
		time.Sleep(grace - time.Nanosecond)
		synctest.Wait()
		wantLive(t, r, reg)
		wantRemovals(t, &rs)

		time.Sleep(time.Nanosecond)
		synctest.Wait()
		wantGone(t, r, reg)
		wantRemovals(t, &rs, removal{reg, CauseGC})
		// The members had already left; nobody is closed.
		wantCloses(t, a)
		wantCloses(t, b)
	})
}

func TestGCRejoinWithinGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var rs removals
		r := newTestRegistry(Config{GCGrace: grace, Observers: []Observer{rs.observe}})
		reg := mustCreate(t, r, "", HostClient)
		h := newMember("h")
		mustJoin(t, reg, h, RoleHost)

		reg.Leave(h, Closure{})
		time.Sleep(grace - time.Second)
		synctest.Wait()
		wantLive(t, r, reg)

		// Rejoining keeps it, and the first grace's timer does no harm
		// when its time comes and goes.
		h2 := newMember("h2")
		mustJoin(t, reg, h2, RoleHost)
		time.Sleep(10 * grace)
		synctest.Wait()
		wantLive(t, r, reg)
		wantCounts(t, reg, 1, 0, 0)
		wantCloses(t, h2)

		// A new last leave starts a full grace of its own.
		reg.Leave(h2, Closure{})
		time.Sleep(grace - time.Second)
		synctest.Wait()
		wantLive(t, r, reg)
		time.Sleep(time.Second)
		synctest.Wait()
		wantGone(t, r, reg)
		wantRemovals(t, &rs, removal{reg, CauseGC})
	})
}

func TestGCGraceZero(t *testing.T) {
	// No bubble needed: with no grace, removal happens inside Leave.
	var rs removals
	r := newTestRegistry(Config{Observers: []Observer{rs.observe}})
	reg := mustCreate(t, r, "", HostClient)
	h, c := newMember("h"), newMember("c")
	mustJoin(t, reg, h, RoleHost)
	mustJoin(t, reg, c, RoleClient)

	reg.Leave(h, Closure{})
	wantLive(t, r, reg)
	wantRemovals(t, &rs)

	reg.Leave(c, Closure{})
	wantGone(t, r, reg)
	wantRemovals(t, &rs, removal{reg, CauseGC})
	wantCloses(t, h)
	wantCloses(t, c)

	// A second leave of the same member changes nothing.
	reg.Leave(c, Closure{})
	wantRemovals(t, &rs, removal{reg, CauseGC})
}

func TestRemoveDuringGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var rs removals
		r := newTestRegistry(Config{GCGrace: grace, Observers: []Observer{rs.observe}})
		reg := mustCreate(t, r, "", Lobby)
		m := newMember("m")
		mustJoin(t, reg, m, RoleMember)
		reg.Leave(m, Closure{})

		time.Sleep(grace / 3)
		reg.Remove(context.Background())
		wantGone(t, r, reg)
		wantRemovals(t, &rs, removal{reg, CauseAdmin})

		// The grace timer, had it survived, would fire here.
		time.Sleep(grace)
		synctest.Wait()
		wantRemovals(t, &rs, removal{reg, CauseAdmin})
	})
}

func TestUnusedTTL(t *testing.T) {
	const ttl = 10 * time.Minute
	synctest.Test(t, func(t *testing.T) {
		var rs removals
		r := newTestRegistry(Config{GCGrace: grace, UnusedTTL: ttl, Observers: []Observer{rs.observe}})
		never := mustCreate(t, r, "never", Lobby)
		stays := mustCreate(t, r, "stays", HostClient)
		left := mustCreate(t, r, "left", HostClient)

		h := newMember("h")
		mustJoin(t, stays, h, RoleHost)
		// left is joined and emptied well before its TTL; the GC grace,
		// not the TTL, decides its end.
		time.Sleep(ttl - 2*grace)
		m := newMember("m")
		mustJoin(t, left, m, RoleClient)
		time.Sleep(grace / 2)
		left.Leave(m, Closure{})

		time.Sleep(2*grace - grace/2 - time.Nanosecond) // just short of the TTL
		synctest.Wait()
		wantLive(t, r, never)
		wantLive(t, r, stays)
		wantGone(t, r, left)
		wantRemovals(t, &rs, removal{left, CauseGC})

		time.Sleep(time.Nanosecond) // the TTL
		synctest.Wait()
		wantGone(t, r, never)
		wantLive(t, r, stays)
		wantRemovals(t, &rs, removal{left, CauseGC}, removal{never, CauseUnused})

		time.Sleep(24 * time.Hour)
		synctest.Wait()
		wantLive(t, r, stays)
		wantCloses(t, h)
	})
}

func TestUnusedTTLJoinedThenLeftAfterTTL(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const ttl = time.Minute
		var rs removals
		r := newTestRegistry(Config{GCGrace: time.Hour, UnusedTTL: ttl, Observers: []Observer{rs.observe}})
		reg := mustCreate(t, r, "", Lobby)
		m := newMember("m")
		mustJoin(t, reg, m, RoleMember)
		reg.Leave(m, Closure{})

		// Joined once, so the TTL no longer applies, however long the grace.
		time.Sleep(ttl)
		synctest.Wait()
		wantLive(t, r, reg)

		time.Sleep(time.Hour - ttl)
		synctest.Wait()
		wantGone(t, r, reg)
		wantRemovals(t, &rs, removal{reg, CauseGC})
	})
}

func TestNoTimersKeepForever(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var rs removals
		r := newTestRegistry(Config{Observers: []Observer{rs.observe}})
		reg := mustCreate(t, r, "", Lobby)
		time.Sleep(365 * 24 * time.Hour)
		synctest.Wait()
		wantLive(t, r, reg)
		wantRemovals(t, &rs)
	})
}

// TestIDReuse checks §6: a registration that reuses an id is a new one, and
// nothing of the old one — late leaves, a second Remove, timers — touches it.
func TestIDReuse(t *testing.T) {
	const ttl = 10 * time.Minute
	synctest.Test(t, func(t *testing.T) {
		var rs removals
		r := newTestRegistry(Config{GCGrace: grace, UnusedTTL: ttl, Observers: []Observer{rs.observe}})

		old := mustCreate(t, r, "x", HostClient)
		oldHost, oldClient := newMember("old-host"), newMember("old-client")
		mustJoin(t, old, oldHost, RoleHost)
		mustJoin(t, old, oldClient, RoleClient)
		old.Remove(context.Background())
		wantCloses(t, oldHost, removedClose)
		wantCloses(t, oldClient, removedClose)

		cur := mustCreate(t, r, "x", HostClient)
		if cur == old {
			t.Fatalf("Create(\"x\") after removal: got the old registration, want a new one")
		}
		host := newMember("host")
		mustJoin(t, cur, host, RoleHost)

		// The old connections' deferred leaves arrive late, and someone
		// removes the old registration again.
		old.Leave(oldHost, Closure{})
		old.Leave(oldClient, Closure{})
		old.Remove(context.Background())

		wantLive(t, r, cur)
		wantCounts(t, cur, 1, 0, 0)
		if got := cur.PickHost(); got != host {
			t.Fatalf("PickHost: got %v, want %v", got, host)
		}
		wantCloses(t, host)
		wantRemovals(t, &rs, removal{old, CauseAdmin})

		// Long past every timer the old one could have had.
		time.Sleep(ttl + grace + time.Hour)
		synctest.Wait()
		wantLive(t, r, cur)
		wantCounts(t, cur, 1, 0, 0)
		wantCloses(t, host)
		wantRemovals(t, &rs, removal{old, CauseAdmin})

		// The new one still lives by its own rules.
		cur.Leave(host, Closure{})
		time.Sleep(grace)
		synctest.Wait()
		wantGone(t, r, cur)
		wantRemovals(t, &rs, removal{old, CauseAdmin}, removal{cur, CauseGC})
	})
}

// TestIDReuseAfterGC has the old registration end by its own GC timer and the
// new one, never joined, live by its own TTL.
func TestIDReuseAfterGC(t *testing.T) {
	const ttl = 10 * time.Minute
	synctest.Test(t, func(t *testing.T) {
		var rs removals
		r := newTestRegistry(Config{GCGrace: grace, UnusedTTL: ttl, Observers: []Observer{rs.observe}})

		old := mustCreate(t, r, "y", Lobby)
		m := newMember("m")
		mustJoin(t, old, m, RoleMember)
		old.Leave(m, Closure{})
		time.Sleep(grace)
		synctest.Wait()
		wantGone(t, r, old)

		time.Sleep(time.Minute)
		cur := mustCreate(t, r, "y", Lobby)
		old.Leave(m, Closure{})
		old.Remove(context.Background())
		wantRemovals(t, &rs, removal{old, CauseGC})

		time.Sleep(ttl - time.Nanosecond)
		synctest.Wait()
		wantLive(t, r, cur)

		time.Sleep(time.Nanosecond)
		synctest.Wait()
		wantGone(t, r, cur)
		wantRemovals(t, &rs, removal{old, CauseGC}, removal{cur, CauseUnused})
	})
}

// TestStaleTimerCallback covers the race the epoch guards against: a timer
// callback that was already running when Join stopped its timer must do
// nothing. The callback is called by hand since timer.Stop cannot be made to
// lose that race on purpose.
func TestStaleTimerCallback(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var rs removals
		r := newTestRegistry(Config{GCGrace: grace, UnusedTTL: time.Hour, Observers: []Observer{rs.observe}})

		unused := mustCreate(t, r, "", Lobby)
		unused.mu.Lock()
		unusedEpoch := unused.timerEpoch
		unused.mu.Unlock()

		reg := mustCreate(t, r, "", Lobby)
		m := newMember("m")
		mustJoin(t, reg, m, RoleMember)
		reg.Leave(m, Closure{})
		reg.mu.Lock()
		gcEpoch := reg.timerEpoch
		reg.mu.Unlock()
		mustJoin(t, reg, m, RoleMember) // stops the GC timer
		reg.Leave(m, Closure{})         // arms a new one

		reg.expire(gcEpoch, CauseGC)
		wantLive(t, r, reg)

		// An unused-TTL callback never removes a joined registration, even
		// with a current epoch.
		reg.mu.Lock()
		cur := reg.timerEpoch
		reg.mu.Unlock()
		reg.expire(cur, CauseUnused)
		wantLive(t, r, reg)

		// The same callback with the current epoch does remove an unused one.
		unused.expire(unusedEpoch, CauseUnused)
		wantGone(t, r, unused)
		wantRemovals(t, &rs, removal{unused, CauseUnused})

		// Nor does a stale callback of a removed registration reach a new
		// one under its id.
		old := mustCreate(t, r, "z", Lobby)
		old.mu.Lock()
		oldEpoch := old.timerEpoch
		old.mu.Unlock()
		old.Remove(context.Background())
		newer := mustCreate(t, r, "z", Lobby)
		old.expire(oldEpoch, CauseUnused)
		r.forget(old) // even forget itself leaves the newer one
		wantLive(t, r, newer)

		time.Sleep(grace)
		synctest.Wait()
		wantGone(t, r, reg)
	})
}
