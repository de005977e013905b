package registry

import (
	"crypto/rand"
	"encoding/binary"
	"time"
)

// Record is the lasting part of a registration: plain data that a Store
// saves and Restore brings back. Members, timers and counters are live state
// and are never part of it. A Record is immutable once made.
type Record struct {
	// ID names the registration.
	ID string
	// Type is hostclient or lobby.
	Type Type
	// Created is when the registration was made.
	Created time.Time
	// KeyHash and HostKeyHash are the bcrypt hashes of the key and the
	// host key; the keys themselves are never kept.
	KeyHash, HostKeyHash []byte
	// Generation is random, drawn when the registration is made. A later
	// registration under the same id has another, so nothing that belongs
	// to an earlier one (a late leave, a timer, a token) can touch it.
	// Never zero.
	Generation uint64
	// Webhook is where the registration's backend hears of its members;
	// its zero value means none.
	Webhook Webhook
}

// Webhook is a registration's webhook settings: plain data for the router's
// webhook client. The secret is kept (it must be, to sign) and never shown.
type Webhook struct {
	URL    string
	Secret []byte
	// Events is a set of the router's webhook event bits.
	Events uint8
}

// Spec is what Create is asked for.
type Spec struct {
	// ID asks for a chosen id; empty mints a random one.
	ID string
	// Type is the registration's type.
	Type Type
	// Key is what members present to join; HostKey what an admin presents
	// (with Key) to remove it. Only their bcrypt hashes are kept.
	Key, HostKey string
	// Webhook, if its URL is set, is the registration's webhook.
	Webhook Webhook
}

// Ref names one registration among all that ever had its id: the id and
// the generation. Its zero value names none.
type Ref struct {
	ID         string
	Generation uint64
}

// newGeneration draws a registration's generation: random, never zero.
func newGeneration() uint64 {
	var b [8]byte
	for {
		rand.Read(b[:])
		if g := binary.LittleEndian.Uint64(b[:]); g != 0 {
			return g
		}
	}
}
