// Package cluster makes several wsrouter nodes one router, over NATS: it is
// the registry's Store and Broker for a cluster (docs/protocol.md §15).
//
//   - Records live in a JetStream key-value bucket named after the cluster,
//     under r.{id}. Create-if-absent makes an id unique across nodes; a
//     delete is a tombstone that every node's watch turns into a removal.
//   - A node subscribes to a registration's message subject only while it
//     has members of it, and announces that with a presence key
//     p.{id}.{node}. A member's message goes to this node's receivers
//     directly and, when another node has members, once to NATS.
//   - Nodes beat a heartbeat key n.{node}; one silent for DeadAfter is dead
//     and its presence stops counting. Garbage collection deletes a record
//     only if no live node has members and nobody joined since it looked
//     (a compare-and-delete on the record's revision, which a node's first
//     join bumps), so exactly one node removes it.
//   - Requests about one registration (its members, a relay to its host)
//     go to the nodes that have members of it, on each node's own subject.
//
// Everything is keyed by the registration id encoded in base64url, since an
// id may hold dots, which separate NATS subject tokens.
package cluster

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/time/rate"

	"wsrouter/registry"
)

// Config configures a node.
type Config struct {
	// URLs is a comma-separated list of NATS servers.
	URLs string
	// Creds is a NATS credentials file; empty means none.
	Creds string
	// Name is the cluster's name: its bucket and the root of its subjects.
	// Empty means "wsrouter".
	Name string
	// Heartbeat is how often the node says it is alive; 0 means 3 s.
	Heartbeat time.Duration
	// DeadAfter is how long a silent node counts as alive; 0 means 12 s,
	// so that with the 3 s heartbeat a dead node stops counting within
	// 15 s.
	DeadAfter time.Duration
	// OpTimeout bounds each key-value operation; 0 means 5 s.
	OpTimeout time.Duration
	// Log is where the node logs; nil means slog.Default.
	Log *slog.Logger
}

var validName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// maxLookups is how many ids a node looks up in the bucket per second (and
// at once), beyond those it knows: a registration made on another node a
// moment ago is found at once, and a client guessing ids costs the bucket
// nothing more.
const maxLookups = 200

// ValidName reports whether s may name a cluster.
func ValidName(s string) bool { return validName.MatchString(s) }

// Node is this process in the cluster.
type Node struct {
	cfg    Config
	id     string // random per process
	log    *slog.Logger
	nc     *nats.Conn
	kv     jetstream.KeyValue
	prefix string // subject root: "wsr.{cluster}"

	registry atomic.Pointer[registry.Registry]
	synced   atomic.Bool // the watch has caught up since the last (re)connect
	deferred atomic.Uint64
	ownBeat  atomic.Int64 // unix ns when the watch last saw this node's heartbeat
	dropped  atomic.Uint64
	// followerCount is len(followers), read without the lock.
	followerCount atomic.Int32
	// relaying holds a token per relay request being answered.
	relaying chan struct{}
	// lookups bounds Lookup's reads of the bucket.
	lookups *rate.Limiter
	resync  chan struct{}
	serving chan struct{} // a token per request being answered (serveRequest)
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup

	// states are the registrations this node has members of, or knows
	// other nodes have; looked up without a lock by Publish.
	states sync.Map // id → *regState

	mu   sync.Mutex
	recs map[string]recEntry // guarded by mu; records as the watch last saw them
	// applyMu orders making registrations live and removing them, between
	// the watch and Lookup.
	applyMu  sync.Mutex
	presence map[string]map[string]struct{} // guarded by mu; id → other nodes with members
	// presenceRev is the bucket revision of the last presence change
	// applied, id → node → revision: a change older than it (a node's
	// direct word arriving after the watch saw it withdraw) is stale.
	presenceRev map[string]map[string]uint64 // guarded by mu
	nodes       map[string]time.Time         // guarded by mu; other nodes → when last heard
	nodeRev     map[string]uint64            // guarded by mu; other nodes → their heartbeat's revision
	handlers    map[string]Handler           // guarded by mu
	onChange    func()                       // guarded by mu
	followers   map[string]bool              // guarded by mu; other nodes that follow events
	followRev   map[string]uint64            // guarded by mu; their follow keys' last revisions
	nodeSub     *nats.Subscription
}

// recEntry is a record as the watch (or a write of this node's) last saw
// it; a tombstone (deleted) is kept a while so that an older copy arriving
// late is not taken for the current one.
type recEntry struct {
	rev     uint64
	gen     uint64
	value   []byte
	deleted time.Time // zero: live
}

// Dial connects to NATS and opens (or makes) the cluster's bucket. The
// node does nothing more until Start.
func Dial(ctx context.Context, cfg Config) (*Node, error) {
	if cfg.Name == "" {
		cfg.Name = "wsrouter"
	}
	if !ValidName(cfg.Name) {
		return nil, fmt.Errorf("cluster name %q: want 1 to 64 of A-Z a-z 0-9 _ -", cfg.Name)
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = 3 * time.Second
	}
	if cfg.DeadAfter <= 0 {
		cfg.DeadAfter = 12 * time.Second
	}
	if cfg.OpTimeout <= 0 {
		cfg.OpTimeout = 5 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	var b [8]byte
	rand.Read(b[:])
	n := &Node{
		cfg:         cfg,
		id:          hex.EncodeToString(b[:]),
		prefix:      "wsr." + cfg.Name,
		resync:      make(chan struct{}, 1),
		serving:     make(chan struct{}, maxServing),
		relaying:    make(chan struct{}, maxServing),
		lookups:     rate.NewLimiter(maxLookups, maxLookups),
		recs:        make(map[string]recEntry),
		presence:    make(map[string]map[string]struct{}),
		presenceRev: make(map[string]map[string]uint64),
		nodes:       make(map[string]time.Time),
		nodeRev:     make(map[string]uint64),
		followers:   make(map[string]bool),
		followRev:   make(map[string]uint64),
		handlers:    make(map[string]Handler),
	}
	n.log = cfg.Log.With("node", n.id)
	n.ctx, n.cancel = context.WithCancel(context.Background())
	opts := []nats.Option{
		nats.Name("wsrouter " + n.id),
		nats.NoEcho(), // a node's own messages are delivered locally
		nats.MaxReconnects(-1),
		nats.ReconnectWait(500 * time.Millisecond),
		nats.ReconnectBufSize(8 << 20),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			n.synced.Store(false)
			if n.ctx.Err() == nil { // not Close's doing
				n.log.Warn("cluster: NATS disconnected; members here keep talking, the rest waits for it", "err", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			n.log.Info("cluster: NATS reconnected", "server", nc.ConnectedUrlRedacted())
			select {
			case n.resync <- struct{}{}:
			default:
			}
		}),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if errors.Is(err, nats.ErrSlowConsumer) {
				// The subscription's pending messages are bounded
				// (nats.go's defaults: 512k messages, 64 MB); NATS
				// dropped this one.
				n.dropped.Add(1)
				return
			}
			n.log.Warn("cluster: NATS error", "err", err)
		}),
	}
	if cfg.Creds != "" {
		opts = append(opts, nats.UserCredentials(cfg.Creds))
	}
	nc, err := nats.Connect(cfg.URLs, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to NATS %s: %w", redact(cfg.URLs), err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	octx, cancel := context.WithTimeout(ctx, cfg.OpTimeout)
	defer cancel()
	kv, err := js.CreateOrUpdateKeyValue(octx, jetstream.KeyValueConfig{
		Bucket:      cfg.Name,
		Description: "wsrouter cluster " + cfg.Name + ": registrations, presence, heartbeats",
		History:     1,
		Storage:     jetstream.FileStorage,
	})
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("key-value bucket %s: %w", cfg.Name, err)
	}
	n.nc, n.kv = nc, kv
	return n, nil
}

// redact drops the user information of NATS URLs for a log line.
func redact(urls string) string {
	parts := strings.Split(urls, ",")
	for i, u := range parts {
		if at := strings.LastIndex(u, "@"); at >= 0 {
			if s := strings.Index(u, "://"); s >= 0 && s < at {
				parts[i] = u[:s+3] + "…@" + u[at+1:]
			}
		}
	}
	return strings.Join(parts, ",")
}

// Dropped counts messages between nodes that were lost: not sent (the
// reconnect buffer full while NATS was away) or not taken in (a
// subscription too far behind).
func (n *Node) Dropped() uint64 { return n.dropped.Load() }

// ID returns the node's id, random per process.
func (n *Node) ID() string { return n.id }

// MaxPayload is the largest NATS message the servers take.
func (n *Node) MaxPayload() int64 { return n.nc.MaxPayload() }

// Start makes r this node's registry (r must use n as its Store and
// Broker), brings it up to date with the cluster's registrations and keeps
// it so: it returns once the first sync is done, or with ctx's error.
func (n *Node) Start(ctx context.Context, r *registry.Registry) error {
	n.registry.Store(r)
	sub, err := n.nc.Subscribe(n.prefix+".n."+n.id, n.serveRequest)
	if err != nil {
		return fmt.Errorf("subscribe: %w", err)
	}
	n.mu.Lock()
	n.nodeSub = sub
	n.mu.Unlock()
	synced := make(chan struct{})
	n.wg.Add(2)
	go n.watch(synced)
	go n.beat()
	select {
	case <-synced:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Degraded reports whether the node is cut off from the cluster: not
// connected to NATS, or not caught up with the bucket since it reconnected.
func (n *Node) Degraded() bool { return !n.nc.IsConnected() || !n.synced.Load() }

// Close leaves the cluster: this node's heartbeat and presence keys are
// deleted, so that the others stop counting its members at once, and the
// connection is drained. Call it after the registry closed.
func (n *Node) Close() error {
	n.cancel()
	n.wg.Wait()
	if n.nc.IsConnected() {
		ctx, cancel := context.WithTimeout(context.Background(), n.cfg.OpTimeout)
		defer cancel()
		keys, err := n.kv.ListKeysFiltered(ctx, "p.*."+n.id)
		if err == nil {
			for k := range keys.Keys() {
				n.kv.Delete(ctx, k)
			}
		}
		n.kv.Delete(ctx, "n."+n.id)
		n.kv.Delete(ctx, "i."+n.id)
	}
	n.nc.Close()
	return nil
}

// enc encodes a registration id as a NATS subject token and key part.
func enc(id string) string { return base64.RawURLEncoding.EncodeToString([]byte(id)) }

func dec(s string) (string, bool) {
	b, err := base64.RawURLEncoding.DecodeString(s)
	return string(b), err == nil
}

func (n *Node) opCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(n.ctx, n.cfg.OpTimeout)
}
