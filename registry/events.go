package registry

import "time"

// EventKind says what happened to a registration.
type EventKind uint8

const (
	// EventCreate: the registration was made (or restored).
	EventCreate EventKind = iota + 1
	// EventJoin: a member joined.
	EventJoin
	// EventLeave: a member left; Event.Closure says how it ended.
	EventLeave
	// EventRemove: the registration was removed; Event.Cause says why.
	EventRemove
	// EventSubscribe: a pub/sub member subscribed to Event.Pattern.
	EventSubscribe
	// EventUnsubscribe: a pub/sub member dropped its subscription to
	// Event.Pattern (not sent when it leaves: leaving drops them all).
	EventUnsubscribe
)

// String returns the event's name, as used in logs.
func (k EventKind) String() string {
	switch k {
	case EventCreate:
		return "create"
	case EventJoin:
		return "join"
	case EventLeave:
		return "leave"
	case EventRemove:
		return "remove"
	case EventSubscribe:
		return "subscribe"
	case EventUnsubscribe:
		return "unsubscribe"
	}
	return "unknown"
}

// Closure is how a member's connection ended: the WebSocket close code (sent
// or received; 1006 when there was no close frame) and its reason.
type Closure struct {
	Code   int
	Reason string
}

// Event is one thing that happened to a registration. Observers receive
// them outside every lock of the registry, in order per registration, one at
// a time per registration.
type Event struct {
	Kind EventKind
	// Time is when it happened.
	Time time.Time
	// Reg is the registration.
	Reg *Registration
	// Member, Role and Name are the member that joined or left (Name ""
	// when it has none).
	Member Member
	Role   Role
	Name   string
	// Closure is how a leaving member's connection ended.
	Closure Closure
	// Cause is why the registration was removed.
	Cause Cause
	// Restored marks the create event of a registration brought back
	// from the store at start rather than made by /register.
	Restored bool
	// Pattern is the subscription of a subscribe or unsubscribe event.
	Pattern string
	// Seq numbers the registration's events from 1, in order; a View
	// tells which of them it already reflects.
	Seq uint64
}

// Observer receives lifecycle events. It must not block for long: the next
// event of the same registration waits for it. It may call back into the
// registry.
type Observer func(Event)
