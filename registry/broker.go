package registry

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
}

// LocalBroker is the broker of a single node: snapshot fan-out within the
// process.
type LocalBroker struct{}

// Publish implements Broker.
func (LocalBroker) Publish(reg *Registration, from Member, role Role, msg Message) int {
	return reg.Deliver(from, role, msg)
}
