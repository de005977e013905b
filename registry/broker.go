package registry

import (
	"context"
	"errors"
)

// Broker carries a member's message to the receivers its role reaches in
// its registration. It is the one publication path: every message a member
// sends goes through it. The local broker delivers to this process's
// members from the registration's snapshot, taking no lock; a broker for
// several nodes also hands the message to the other nodes, whose receiving
// side calls Deliver.
type Broker interface {
	// Publish sends msg from a member of reg with role and returns the
	// number of receivers it was queued to on this node.
	Publish(reg *Registration, from Member, role Role, msg Message) int
	// Attach is called before a member joins reg on this node, outside
	// every lock of the registry. Once it returns, what other nodes
	// publish to reg reaches this node, until the matching Detach. An
	// error refuses the join.
	Attach(reg *Registration) error
	// Detach undoes one Attach once its member has left (or failed to
	// join). It is called outside every lock of the registry.
	Detach(reg *Registration)
}

// IdleDeleter is a Store shared with other nodes, whose members this node
// cannot see. The registry removes an emptied or unused registration through
// DeleteIdle, which refuses with ErrInUse when a member is on another node
// (or joins there meanwhile) and deletes otherwise; an administrator's
// removal still uses Delete.
type IdleDeleter interface {
	DeleteIdle(ctx context.Context, ref Ref) error
}

// ErrInUse is DeleteIdle's refusal: the registration has members on
// another node.
var ErrInUse = errors.New("registration in use on another node")

// LocalBroker is the broker of a single node: snapshot fan-out within the
// process.
type LocalBroker struct{}

// Publish implements Broker.
func (LocalBroker) Publish(reg *Registration, from Member, role Role, msg Message) int {
	return reg.Deliver(from, role, msg)
}

// Attach implements Broker: a single node has nothing to attach.
func (LocalBroker) Attach(*Registration) error { return nil }

// Detach implements Broker.
func (LocalBroker) Detach(*Registration) {}
