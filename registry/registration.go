package registry

import (
	"context"
	"errors"
	"fmt"
	"slices"
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
	// PubSub forwards a publish to the members subscribed to its event.
	PubSub
)

// ParseType parses a reg_type parameter.
func ParseType(s string) (Type, bool) {
	switch s {
	case "hostclient":
		return HostClient, true
	case "lobby":
		return Lobby, true
	case "pubsub":
		return PubSub, true
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
	case PubSub:
		return "pubsub"
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
	// Event is a pub/sub publish's event: Deliver sends Data to the
	// members subscribed to it. Empty in other registrations.
	Event string
}

// Member is one participant of a registration: a WebSocket connection in the
// router, or anything else that can take messages.
type Member interface {
	// ID names the member uniquely and for good (the router's connection
	// id).
	ID() string
	// Send queues msg for delivery without blocking. A member whose queue is
	// full must close itself (as a slow consumer); Send never waits.
	Send(msg Message)
	// Close closes the member with a close code and a short reason. It must
	// not block on the network and may be called more than once.
	Close(code int, reason string)
}

// Selector chooses members for SendTo: the one with ID, or else the one
// named Name, or else every member with Role, or else (its zero value) every
// member.
type Selector struct {
	Role Role
	ID   string
	Name string
}

// snapshot is an immutable view of a registration's members, published on
// every join and leave so that fan-out reads it without a lock.
type snapshot struct {
	hosts   []Member // RoleHost
	clients []Member // RoleClient
	members []Member // RoleMember (lobby)
}

var emptySnapshot snapshot

// member is a member with its role, as a registration holds it.
type member struct {
	m    Member
	role Role
	name string   // "" when it has none
	subs []string // pub/sub subscriptions, in the order made
}

// MemberInfo is a live member as the registration holds it.
type MemberInfo struct {
	Member Member
	Role   Role
	// Name is the member's name within the registration; "" when it has
	// none.
	Name string
	// Subscriptions are a pub/sub member's subscriptions, in the order
	// made; nil when it has none.
	Subscriptions []string
}

// Registration is one room: its Record, which never changes, and its live
// members.
type Registration struct {
	Record

	registry *Registry

	snap       atomic.Pointer[snapshot]
	subs       atomic.Pointer[subNode] // pub/sub subscriptions; nil: none
	lastActive atomic.Int64            // unix nanoseconds of the last join, leave or message
	msgsIn     atomic.Uint64
	msgsOut    atomic.Uint64
	hostNext   atomic.Uint64 // round-robin cursor for PickHost

	mu         sync.Mutex
	members    map[string]member     // guarded by mu; by member ID
	names      map[string]string     // guarded by mu; member name → member ID
	removing   *removalOp            // guarded by mu; a removal being made durable
	removed    bool                  // guarded by mu
	joined     bool                  // guarded by mu; someone joined once
	timer      *time.Timer           // guarded by mu; GC or unused TTL
	timerEpoch uint64                // guarded by mu; bumped whenever timer is replaced or stopped
	keyMAC     []byte                // guarded by mu; HMAC of the key once bcrypt accepted it
	hostKeyMAC []byte                // guarded by mu; the same for the host key
	flights    map[flightKey]*flight // guarded by mu; bcrypts running, by key
	events     []Event               // guarded by mu; not yet delivered to observers
	seq        uint64                // guarded by mu; the last event's Seq
	notifying  bool                  // guarded by mu; a goroutine is delivering events
}

func (r *Registry) newRegistration(rec Record) *Registration {
	reg := &Registration{Record: rec, registry: r, members: make(map[string]member)}
	reg.snap.Store(&emptySnapshot)
	reg.lastActive.Store(rec.Created.UnixNano())
	return reg
}

// Ref names this registration among all that ever had its id.
func (reg *Registration) Ref() Ref { return Ref{reg.ID, reg.Generation} }

// Join adds m with role. Errors: ErrClosed once the registry closed,
// ErrNotFound once the registration was removed (or is being removed),
// ErrTooManyMembers at MaxMembers, ErrExists when a member with m's ID is
// already in.
func (reg *Registration) Join(m Member, role Role) error {
	return reg.JoinNamed(m, role, "")
}

// JoinNamed adds m with role and, unless name is empty, that name. A name
// belongs to one role within the registration: a live member of the same
// role holding it is replaced — it leaves at once (it receives nothing more)
// and is closed with 4001 "replaced" — and one of the other role makes the
// join fail with ErrNameTaken. Other errors as Join.
func (reg *Registration) JoinNamed(m Member, role Role, name string) error {
	if reg.registry.isClosed() {
		return ErrClosed
	}
	// Attached before the member is visible, so that it hears other
	// nodes' messages from its join on.
	broker := reg.registry.broker
	if err := broker.Attach(reg); err != nil {
		return fmt.Errorf("join %s: %w", reg.ID, err)
	}
	old, err := reg.join(m, role, name)
	if err != nil {
		broker.Detach(reg)
		return err
	}
	if old.m != nil {
		broker.Detach(reg)
		old.m.Close(CodeReplaced, "replaced")
	}
	return nil
}

// join adds m and returns the member it replaced, if any.
func (reg *Registration) join(m Member, role Role, name string) (member, error) {
	id := m.ID()
	reg.mu.Lock()
	switch {
	case reg.removed:
		reg.mu.Unlock()
		return member{}, fmt.Errorf("join %s: %w", reg.ID, ErrNotFound)
	case reg.removing != nil:
		// Not a 404 yet: the removal may fail and leave it live.
		reg.mu.Unlock()
		return member{}, fmt.Errorf("join %s: %w", reg.ID, ErrRemoving)
	}
	if _, dup := reg.members[id]; dup {
		reg.mu.Unlock()
		return member{}, fmt.Errorf("join %s: member %s: %w", reg.ID, id, ErrExists)
	}
	var old member
	if name != "" {
		if oldID, held := reg.names[name]; held {
			old = reg.members[oldID]
			if old.role != role {
				reg.mu.Unlock()
				return member{}, fmt.Errorf("join %s as %q: %w", reg.ID, name, ErrNameTaken)
			}
		}
	}
	// The member replaced makes room for its successor.
	if max := reg.registry.cfg.MaxMembers; max > 0 && len(reg.members) >= max && old.m == nil {
		reg.mu.Unlock()
		return member{}, fmt.Errorf("join %s: %w", reg.ID, ErrTooManyMembers)
	}
	if old.m != nil {
		delete(reg.members, old.m.ID())
		reg.dropSubsLocked(old)
		reg.eventLocked(Event{Kind: EventLeave, Member: old.m, Role: old.role, Name: name, Closure: Closure{Code: CodeReplaced, Reason: "replaced"}})
	}
	reg.members[id] = member{m: m, role: role, name: name}
	if name != "" {
		if reg.names == nil {
			reg.names = make(map[string]string)
		}
		reg.names[name] = id
	}
	reg.joined = true
	reg.stopTimerLocked()
	reg.publishLocked()
	reg.touch()
	reg.eventLocked(Event{Kind: EventJoin, Member: m, Role: role, Name: name})
	reg.mu.Unlock()
	reg.notify()
	return old, nil
}

// CodeReplaced is the close code of a member replaced by a newer one of the
// same name and role.
const CodeReplaced = 4001

// Leave removes m, whose connection ended as closure says. Leaving a removed
// registration, or leaving twice, does nothing, so a late leave can never
// touch a newer registration with the same id: it only ever sees its own
// Registration value.
func (reg *Registration) Leave(m Member, closure Closure) {
	reg.mu.Lock()
	e, ok := reg.members[m.ID()]
	if !ok || e.m != m || reg.removed {
		reg.mu.Unlock()
		return
	}
	delete(reg.members, m.ID())
	if e.name != "" && reg.names[e.name] == m.ID() {
		delete(reg.names, e.name)
	}
	reg.dropSubsLocked(e)
	reg.publishLocked()
	reg.touch()
	reg.eventLocked(Event{Kind: EventLeave, Member: m, Role: e.role, Name: e.name, Closure: closure})
	empty := len(reg.members) == 0
	grace := reg.registry.cfg.GCGrace
	if empty && grace > 0 {
		reg.armTimerLocked(grace, CauseGC)
	}
	reg.mu.Unlock()
	reg.registry.broker.Detach(reg)
	reg.notify()
	if empty && grace <= 0 {
		reg.removeIf(context.Background(), CauseGC, func() bool { return len(reg.members) == 0 })
	}
}

// Vacated tells the registration that it has no members on other nodes any
// more (they left, or their node died): if it has none here either, it is
// garbage-collected after the grace, as if its last member had just left.
// The removal is exactly once across nodes: the store's DeleteIdle lets one
// node remove it.
func (reg *Registration) Vacated() {
	reg.mu.Lock()
	idle := !reg.removed && reg.removing == nil && len(reg.members) == 0 && reg.timer == nil
	grace := reg.registry.cfg.GCGrace
	if idle && grace > 0 {
		reg.armTimerLocked(grace, CauseGC)
	}
	reg.mu.Unlock()
	if idle && grace <= 0 {
		go reg.removeIf(context.Background(), CauseGC, func() bool { return len(reg.members) == 0 })
	}
}

// Remove deletes the registration (durably, through the store, before
// anything else) and closes every member with 4000 "registration removed".
// It is idempotent.
func (reg *Registration) Remove(ctx context.Context) error {
	return reg.remove(ctx, CauseAdmin, 4000, "registration removed")
}

func (reg *Registration) remove(ctx context.Context, cause Cause, code int, reason string) error {
	return reg.removeWith(ctx, cause, code, reason, func() bool { return true })
}

// removeIf removes the registration for cause if cond (checked under its
// lock) holds; joins are refused while the removal is made durable, so cond
// cannot change meanwhile. A store failure is reported to OnStoreError and
// retried later.
func (reg *Registration) removeIf(ctx context.Context, cause Cause, cond func() bool) {
	if err := reg.removeWith(ctx, cause, 4000, "registration removed", cond); err != nil {
		reg.registry.storeFailed("remove", reg.ID, err)
	}
}

// removalOp is a removal being made durable: whoever else removes the
// registration meanwhile waits for it and shares its outcome.
type removalOp struct {
	done chan struct{}
	err  error // written before done is closed
}

// removeWith makes a removal durable in the store first, then visible: the
// registration is marked as being removed (joins are refused with
// ErrRemoving) while the store deletes it, then detached and its members
// closed. If the store fails, the registration stays as it was and the error
// is returned (wrapping ErrStore) to every caller that waited for it.
func (reg *Registration) removeWith(ctx context.Context, cause Cause, code int, reason string, cond func() bool) error {
	reg.mu.Lock()
	if op := reg.removing; op != nil {
		// Another removal is on its way to the store: its outcome is ours.
		reg.mu.Unlock()
		select {
		case <-op.done:
			return op.err
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if reg.removed || !cond() {
		reg.mu.Unlock()
		return nil
	}
	op := &removalOp{done: make(chan struct{})}
	reg.removing = op
	reg.stopTimerLocked()
	reg.mu.Unlock()

	var err error
	if idle, ok := reg.registry.store.(IdleDeleter); ok && (cause == CauseGC || cause == CauseUnused) {
		err = idle.DeleteIdle(context.WithoutCancel(ctx), reg.Ref())
	} else {
		err = reg.registry.store.Delete(context.WithoutCancel(ctx), reg.Ref())
	}

	reg.mu.Lock()
	reg.removing = nil
	switch {
	case errors.Is(err, ErrInUse):
		// Members on another node: it is theirs to remove once they leave.
		reg.mu.Unlock()
		err = nil
	case reg.removed:
		// The registry closed meanwhile: the removal is moot, its record
		// (if the delete failed) comes back with the next start.
		reg.mu.Unlock()
		if err != nil {
			err = fmt.Errorf("remove %s: %w", reg.ID, ErrClosed)
		}
	case err != nil:
		err = fmt.Errorf("remove %s: %w: %w", reg.ID, ErrStore, err)
		if len(reg.members) == 0 {
			// Try again later, as if it had just emptied.
			reg.armTimerLocked(max(reg.registry.cfg.GCGrace, time.Second), CauseGC)
		}
		reg.mu.Unlock()
	default:
		reg.detach(cause, code, reason) // unlocks
	}
	op.err = err
	close(op.done)
	return err
}

// detach ends the registration's live part, with reg.mu held (and released
// here): it is marked removed, leaves the registry, its observers hear of it
// and its members are closed with code and reason. The store is not
// touched: a shutdown detaches every registration and keeps their records.
func (reg *Registration) detach(cause Cause, code int, reason string) {
	reg.removed = true
	reg.stopTimerLocked()
	members := make([]Member, 0, len(reg.members))
	for _, e := range reg.members {
		members = append(members, e.m)
	}
	clear(reg.members)
	clear(reg.names)
	reg.publishLocked()
	reg.eventLocked(Event{Kind: EventRemove, Cause: cause})
	reg.mu.Unlock()

	reg.registry.forget(reg)
	reg.notify()
	for _, m := range members {
		reg.registry.broker.Detach(reg)
		m.Close(code, reason)
	}
}

// shutdown detaches the registration for the registry's Close, leaving its
// record in the store.
func (reg *Registration) shutdown(code int, reason string) {
	reg.mu.Lock()
	if reg.removed {
		reg.mu.Unlock()
		return
	}
	reg.detach(CauseShutdown, code, reason)
}

// Removed reports whether the registration has been removed.
func (reg *Registration) Removed() bool {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	return reg.removed
}

// Publish sends msg from a member with role through the registry's broker:
// the one path of every member's message. It returns the number of
// receivers on this node.
func (reg *Registration) Publish(from Member, role Role, msg Message) int {
	return reg.registry.broker.Publish(reg, from, role, msg)
}

// Deliver queues msg from a sender with role to every receiver its role
// reaches on this node: in a lobby every other member, in a hostclient
// registration the clients of a host and the hosts of a client. from may be
// nil (a message from another node). It returns the number of receivers. It
// takes no lock.
func (reg *Registration) Deliver(from Member, role Role, msg Message) int {
	if reg.Type == PubSub {
		return reg.deliverEvent(msg)
	}
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

// SendTo queues msg to the members sel chooses and returns how many. It is
// the path of messages that come from outside the registration (a backend).
func (reg *Registration) SendTo(sel Selector, msg Message) int {
	var to []Member
	switch s := reg.snap.Load(); {
	case sel.ID != "" || sel.Name != "":
		if m, _, ok := reg.lookup(sel); ok {
			to = []Member{m}
		}
	case sel.Role == RoleHost:
		to = s.hosts
	case sel.Role == RoleClient:
		to = s.clients
	case sel.Role == RoleMember:
		to = s.members
	default:
		to = slices.Concat(s.hosts, s.clients, s.members)
	}
	for _, m := range to {
		m.Send(msg)
	}
	reg.msgsOut.Add(uint64(len(to)))
	return len(to)
}

// Member returns the live member with id and its role.
func (reg *Registration) Member(id string) (Member, Role, bool) {
	return reg.lookup(Selector{ID: id})
}

// Lookup returns the live member sel names by ID or by name.
func (reg *Registration) Lookup(sel Selector) (Member, Role, bool) {
	return reg.lookup(sel)
}

func (reg *Registration) lookup(sel Selector) (Member, Role, bool) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	id := sel.ID
	if id == "" {
		var ok bool
		if id, ok = reg.names[sel.Name]; !ok {
			return nil, 0, false
		}
	}
	e, ok := reg.members[id]
	return e.m, e.role, ok
}

// Members returns the live members, in no particular order.
func (reg *Registration) Members() []MemberInfo {
	members, _ := reg.View()
	return members
}

// View returns the live members, as Members does, and the Seq of the last
// event they reflect: an observer that starts watching, then takes a View,
// drops the events numbered up to it and misses none after.
func (reg *Registration) View() ([]MemberInfo, uint64) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	out := make([]MemberInfo, 0, len(reg.members))
	for _, e := range reg.members {
		out = append(out, MemberInfo{e.m, e.role, e.name, slices.Clone(e.subs)})
	}
	return out, reg.seq
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
	for _, e := range reg.members {
		switch e.role {
		case RoleHost:
			s.hosts = append(s.hosts, e.m)
		case RoleClient:
			s.clients = append(s.clients, e.m)
		default:
			s.members = append(s.members, e.m)
		}
	}
	reg.snap.Store(s)
}

func (reg *Registration) touch() {
	reg.lastActive.Store(time.Now().UnixNano())
}

// eventLocked queues ev for the observers; notify delivers it once the lock
// is released. Queueing under the lock is what orders a registration's
// events as its state changed.
func (reg *Registration) eventLocked(ev Event) {
	if len(reg.registry.cfg.Observers) == 0 {
		return
	}
	reg.seq++
	ev.Seq = reg.seq
	ev.Reg = reg
	ev.Time = time.Now()
	reg.events = append(reg.events, ev)
}

// notify delivers queued events to the observers, outside the lock, one at
// a time and in order. Whoever finds nobody delivering does it; the others
// leave their events to it.
func (reg *Registration) notify() {
	reg.mu.Lock()
	if reg.notifying {
		reg.mu.Unlock()
		return
	}
	reg.notifying = true
	for len(reg.events) > 0 {
		ev := reg.events[0]
		reg.events[0] = Event{}
		reg.events = reg.events[1:]
		reg.mu.Unlock()
		for _, o := range reg.registry.cfg.Observers {
			o(ev)
		}
		reg.mu.Lock()
	}
	reg.events = nil
	reg.notifying = false
	reg.mu.Unlock()
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
	reg.removeIf(context.Background(), cause, func() bool {
		return reg.timerEpoch == epoch && len(reg.members) == 0 &&
			!(cause == CauseUnused && reg.joined)
	})
}
