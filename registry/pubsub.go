package registry

import (
	"fmt"
	"slices"
	"strings"
	"time"
)

// Subscribe subscribes m, a member of this pub/sub registration, to pattern
// (a valid one: see ValidPattern). Subscribing twice is one subscription:
// added is then false. Errors: ErrNotMember once m has left,
// ErrTooManySubscriptions at MaxSubscriptions.
func (reg *Registration) Subscribe(m Member, pattern string) (added bool, err error) {
	reg.mu.Lock()
	e, ok := reg.members[m.ID()]
	switch {
	case !ok || e.m != m:
		reg.mu.Unlock()
		return false, fmt.Errorf("subscribe: %w", ErrNotMember)
	case slices.Contains(e.subs, pattern):
		reg.mu.Unlock()
		return false, nil
	}
	if max := reg.registry.cfg.MaxSubscriptions; max > 0 && len(e.subs) >= max {
		reg.mu.Unlock()
		return false, fmt.Errorf("subscribe: %w (%d)", ErrTooManySubscriptions, max)
	}
	e.subs = append(e.subs[:len(e.subs):len(e.subs)], pattern)
	reg.members[m.ID()] = e
	reg.subs.Store(reg.subs.Load().orEmpty().with(tokens(pattern), m))
	reg.eventLocked(Event{Kind: EventSubscribe, Member: m, Role: e.role, Name: e.name, Pattern: pattern})
	reg.mu.Unlock()
	reg.notify()
	return true, nil
}

// Unsubscribe drops m's subscription to pattern and reports whether it held
// one; dropping what it does not hold does nothing.
func (reg *Registration) Unsubscribe(m Member, pattern string) bool {
	reg.mu.Lock()
	e, ok := reg.members[m.ID()]
	i := slices.Index(e.subs, pattern)
	if !ok || e.m != m || i < 0 {
		reg.mu.Unlock()
		return false
	}
	e.subs = slices.Delete(slices.Clone(e.subs), i, i+1)
	reg.members[m.ID()] = e
	reg.subs.Store(reg.subs.Load().without(tokens(pattern), m))
	reg.eventLocked(Event{Kind: EventUnsubscribe, Member: m, Role: e.role, Name: e.name, Pattern: pattern})
	reg.mu.Unlock()
	reg.notify()
	return true
}

// UnsubscribeAll drops every subscription of m and returns how many it held.
// Observers hear one unsubscribe event for each.
func (reg *Registration) UnsubscribeAll(m Member) int {
	reg.mu.Lock()
	e, ok := reg.members[m.ID()]
	if !ok || e.m != m || len(e.subs) == 0 {
		reg.mu.Unlock()
		return 0
	}
	reg.dropSubsLocked(e)
	for _, p := range e.subs {
		reg.eventLocked(Event{Kind: EventUnsubscribe, Member: m, Role: e.role, Name: e.name, Pattern: p})
	}
	n := len(e.subs)
	e.subs = nil
	reg.members[m.ID()] = e
	reg.mu.Unlock()
	reg.notify()
	return n
}

// dropSubsLocked takes e's subscriptions out of the trie (not out of e).
func (reg *Registration) dropSubsLocked(e member) {
	if len(e.subs) == 0 {
		return
	}
	t := reg.subs.Load()
	for _, p := range e.subs {
		t = t.without(tokens(p), e.m)
	}
	reg.subs.Store(t)
}

// deliverEvent queues a publish to every member subscribed to its event,
// the publisher included if it subscribed, once each. It takes no lock.
func (reg *Registration) deliverEvent(msg Message) int {
	to := reg.subs.Load().match(msg.Event)
	for _, m := range to {
		m.Send(msg)
	}
	reg.msgsIn.Add(1)
	reg.msgsOut.Add(uint64(len(to)))
	reg.lastActive.Store(time.Now().UnixNano())
	return len(to)
}

func tokens(pattern string) []string { return strings.Split(pattern, ".") }
