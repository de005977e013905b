package registry

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// Type is a registration's type; it decides who receives whose messages.
type Type uint8

const (
	// HostClient forwards hosts' messages to clients and clients' to hosts.
	HostClient Type = iota + 1
	// Lobby forwards every member's messages to every other member.
	Lobby
)

// ParseType parses a reg_type parameter.
func ParseType(s string) (Type, bool) {
	switch s {
	case "hostclient":
		return HostClient, true
	case "lobby":
		return Lobby, true
	}
	return 0, false
}

// String returns the wire name of the type.
func (t Type) String() string {
	switch t {
	case HostClient:
		return "hostclient"
	case Lobby:
		return "lobby"
	}
	return "unknown"
}

// Role is a member's role within its registration.
type Role uint8

const (
	// RoleMember is the only role in a lobby.
	RoleMember Role = iota + 1
	// RoleHost is a host of a hostclient registration.
	RoleHost
	// RoleClient is a client of a hostclient registration.
	RoleClient
)

// ParseRole parses a sock_type parameter (host or client).
func ParseRole(s string) (Role, bool) {
	switch s {
	case "host":
		return RoleHost, true
	case "client":
		return RoleClient, true
	}
	return 0, false
}

// String returns the wire name of the role.
func (r Role) String() string {
	switch r {
	case RoleMember:
		return "member"
	case RoleHost:
		return "host"
	case RoleClient:
		return "client"
	}
	return "unknown"
}

// Message is one data message. Its bytes are shared by every receiver and
// must not be modified once sent.
type Message struct {
	// Binary is false for a text message.
	Binary bool
	// Data is the payload, unchanged from the sender.
	Data []byte
}

// Member is one participant of a registration: a WebSocket connection in the
// router, or anything else that can take messages.
type Member interface {
	// Send queues msg for delivery without blocking. A member whose queue is
	// full must close itself (as a slow consumer); Send never waits.
	Send(msg Message)
	// Close closes the member with a close code and a short reason. It must
	// not block on the network and may be called more than once.
	Close(code int, reason string)
}

// snapshot is an immutable view of a registration's members, published on
// every join and leave so that fan-out reads it without a lock.
type snapshot struct {
	hosts   []Member // RoleHost
	clients []Member // RoleClient
	members []Member // RoleMember (lobby)
}

var emptySnapshot snapshot

// Registration is one room.
type Registration struct {
	// ID names the registration. Immutable.
	ID string
	// Type is hostclient or lobby. Immutable.
	Type Type
	// Created is when the registration was made. Immutable.
	Created time.Time

	registry    *Registry
	keyHash     []byte // bcrypt; immutable
	hostKeyHash []byte // bcrypt; immutable

	snap       atomic.Pointer[snapshot]
	lastActive atomic.Int64 // unix nanoseconds of the last join, leave or message
	msgsIn     atomic.Uint64
	msgsOut    atomic.Uint64
	hostNext   atomic.Uint64 // round-robin cursor for PickHost

	mu         sync.Mutex
	members    map[Member]Role       // guarded by mu
	removed    bool                  // guarded by mu
	joined     bool                  // guarded by mu; someone joined once
	timer      *time.Timer           // guarded by mu; GC or unused TTL
	timerEpoch uint64                // guarded by mu; bumped whenever timer is replaced or stopped
	keyMAC     []byte                // guarded by mu; HMAC of the key once bcrypt accepted it
	hostKeyMAC []byte                // guarded by mu; the same for the host key
	flights    map[flightKey]*flight // guarded by mu; bcrypts running, by key
}

// Join adds m with role. Errors: ErrClosed once the registry closed,
// ErrNotFound once the registration was removed, ErrTooManyMembers at
// MaxMembers.
func (reg *Registration) Join(m Member, role Role) error {
	if reg.registry.isClosed() {
		return ErrClosed
	}
	reg.mu.Lock()
	defer reg.mu.Unlock()
	if reg.removed {
		return fmt.Errorf("join %s: %w", reg.ID, ErrNotFound)
	}
	if max := reg.registry.cfg.MaxMembers; max > 0 && len(reg.members) >= max {
		return fmt.Errorf("join %s: %w", reg.ID, ErrTooManyMembers)
	}
	reg.members[m] = role
	reg.joined = true
	reg.stopTimerLocked()
	reg.publishLocked()
	reg.touch()
	return nil
}

// Leave removes m. Leaving a removed registration, or leaving twice, does
// nothing, so a late leave can never touch a newer registration with the same
// id: it only ever sees its own Registration value.
func (reg *Registration) Leave(m Member) {
	reg.mu.Lock()
	if _, ok := reg.members[m]; !ok || reg.removed {
		reg.mu.Unlock()
		return
	}
	delete(reg.members, m)
	reg.publishLocked()
	reg.touch()
	if len(reg.members) > 0 {
		reg.mu.Unlock()
		return
	}
	if grace := reg.registry.cfg.GCGrace; grace > 0 {
		reg.armTimerLocked(grace, CauseGC)
		reg.mu.Unlock()
		return
	}
	members := reg.detachLocked()
	reg.mu.Unlock()
	reg.finish(members, CauseGC, 4000, "registration removed")
}

// Remove deletes the registration and closes every member with 4000
// "registration removed". It is idempotent.
func (reg *Registration) Remove() {
	reg.remove(CauseAdmin, 4000, "registration removed")
}

func (reg *Registration) remove(cause Cause, code int, reason string) {
	reg.mu.Lock()
	if reg.removed {
		reg.mu.Unlock()
		return
	}
	members := reg.detachLocked()
	reg.mu.Unlock()
	reg.finish(members, cause, code, reason)
}

// detachLocked marks the registration removed and returns its members, so
// that the caller can close them after unlocking.
func (reg *Registration) detachLocked() []Member {
	reg.removed = true
	reg.stopTimerLocked()
	members := make([]Member, 0, len(reg.members))
	for m := range reg.members {
		members = append(members, m)
	}
	clear(reg.members)
	reg.publishLocked()
	return members
}

// finish runs the part of a removal that must not hold reg.mu: the registry
// lock, the OnRemove hook and closing members.
func (reg *Registration) finish(members []Member, cause Cause, code int, reason string) {
	reg.registry.forget(reg, cause)
	for _, m := range members {
		m.Close(code, reason)
	}
}

// Removed reports whether the registration has been removed.
func (reg *Registration) Removed() bool {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	return reg.removed
}

// Broadcast forwards msg from a sender with role to every receiver its role
// reaches: in a lobby every other member, in a hostclient registration the
// clients of a host and the hosts of a client. It returns the number of
// receivers. It takes no lock.
func (reg *Registration) Broadcast(from Member, role Role, msg Message) int {
	s := reg.snap.Load()
	var to []Member
	switch role {
	case RoleMember:
		to = s.members
	case RoleHost:
		to = s.clients
	case RoleClient:
		to = s.hosts
	}
	n := 0
	for _, m := range to {
		if m != from {
			m.Send(msg)
			n++
		}
	}
	reg.msgsIn.Add(1)
	reg.msgsOut.Add(uint64(n))
	reg.lastActive.Store(time.Now().UnixNano())
	return n
}

// PickHost returns one host, round-robin among the registration's hosts, or
// nil when none is connected.
func (reg *Registration) PickHost() Member {
	hosts := reg.snap.Load().hosts
	if len(hosts) == 0 {
		return nil
	}
	i := reg.hostNext.Add(1) - 1
	return hosts[i%uint64(len(hosts))]
}

// Counts returns the number of members by role.
func (reg *Registration) Counts() (hosts, clients, members int) {
	s := reg.snap.Load()
	return len(s.hosts), len(s.clients), len(s.members)
}

// Stats returns the registration's message counters and last activity.
func (reg *Registration) Stats() (msgsIn, msgsOut uint64, lastActive time.Time) {
	return reg.msgsIn.Load(), reg.msgsOut.Load(), time.Unix(0, reg.lastActive.Load())
}

func (reg *Registration) publishLocked() {
	s := &snapshot{}
	for m, role := range reg.members {
		switch role {
		case RoleHost:
			s.hosts = append(s.hosts, m)
		case RoleClient:
			s.clients = append(s.clients, m)
		default:
			s.members = append(s.members, m)
		}
	}
	reg.snap.Store(s)
}

func (reg *Registration) touch() {
	reg.lastActive.Store(time.Now().UnixNano())
}

// armTimerLocked (re)starts the removal timer. The epoch lets a timer that
// fires while being replaced see that it is stale.
func (reg *Registration) armTimerLocked(d time.Duration, cause Cause) {
	reg.stopTimerLocked()
	epoch := reg.timerEpoch
	reg.timer = time.AfterFunc(d, func() { reg.expire(epoch, cause) })
}

func (reg *Registration) stopTimerLocked() {
	reg.timerEpoch++
	if reg.timer != nil {
		reg.timer.Stop()
		reg.timer = nil
	}
}

func (reg *Registration) expire(epoch uint64, cause Cause) {
	reg.mu.Lock()
	if reg.timerEpoch != epoch || reg.removed || len(reg.members) > 0 ||
		(cause == CauseUnused && reg.joined) {
		reg.mu.Unlock()
		return
	}
	members := reg.detachLocked()
	reg.mu.Unlock()
	reg.finish(members, cause, 4000, "registration removed")
}
