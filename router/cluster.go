package router

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"

	"wsrouter/registry"
	"wsrouter/registry/cluster"
	"wsrouter/router/relay"
)

// This file is what the router does across the nodes of a cluster
// (docs/protocol.md §15) beyond the registry's Store and Broker, which carry
// registrations and members' messages: the requests that need another
// node's members — a relay to a host there, /members, /send and DELETE
// /member — and what a node cut off from the others refuses.

// errCut is a request this node cannot answer while it is cut off from the
// cluster: 503.
var errCut = errors.New("cut off from the cluster")

// askTimeout bounds the backend API's requests to other nodes.
const askTimeout = 3 * time.Second

// lookup returns the live registration id. On a cluster node, an id this
// node does not know yet is looked up in the cluster's bucket, so that a
// registration made on another node a moment ago is found here at once.
func (rt *Router) lookup(ctx context.Context, id string) (*registry.Registration, error) {
	reg, err := rt.registry.Get(id)
	if err == nil || rt.cfg.Cluster == nil || rt.cut() {
		return reg, err
	}
	return rt.cfg.Cluster.Lookup(ctx, id)
}

// cut reports whether this node is a cluster node cut off from the others.
func (rt *Router) cut() bool {
	return rt.cfg.Cluster != nil && rt.cfg.Cluster.Degraded()
}

// clusterUp registers what this node answers for the others, and the
// cluster's metrics.
func (rt *Router) clusterUp(c *cluster.Node) {
	c.Handle("relay", rt.answerRelay)
	c.Handle("members", rt.answerMembers)
	c.Handle("allmembers", rt.answerAllMembers)
	c.Handle("send", rt.answerSend)
	c.Handle("close", rt.answerClose)
	c.OnChange(rt.clusterChanged)
	rt.metrics.prom.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "wsrouter_cluster_gc_deferred_total",
		Help: "Garbage collections of a registration this node left to another node that has members of it.",
	}, func() float64 { return float64(c.Deferred()) }))
	rt.metrics.prom.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "wsrouter_cluster_dropped_total",
		Help: "Messages between nodes lost: not sent while NATS was away past the client's reconnect buffer, or not taken in by a subscription too far behind.",
	}, func() float64 { return float64(c.Dropped()) }))
	rt.metrics.prom.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "wsrouter_cluster_degraded",
		Help: "1 while this node is cut off from the cluster's NATS (or catching up after it), else 0.",
	}, func() float64 {
		if c.Degraded() {
			return 1
		}
		return 0
	}))
}

// remoteRelay is the Remote of a relay target with no host on this node:
// the request goes to the nodes with members of the registration, one at
// a time in random order, until one has a host.
func (rt *Router) remoteRelay(reg *registry.Registration) func(ctx context.Context, x *relay.Exchange) (*relay.Answer, error) {
	return func(ctx context.Context, x *relay.Exchange) (*relay.Answer, error) {
		c := rt.cfg.Cluster
		if c.Degraded() {
			return nil, errCut
		}
		body, err := x.Encode()
		if err != nil {
			return nil, err
		}
		peers := c.Peers(reg.ID)
		rand.Shuffle(len(peers), func(i, j int) { peers[i], peers[j] = peers[j], peers[i] })
		for _, peer := range peers {
			b, err := c.AskNode(ctx, peer, reg, "relay", body)
			switch {
			case errors.Is(err, cluster.ErrNoOne):
				continue // no host there: nothing was sent to a device
			case errors.Is(err, cluster.ErrTooLarge):
				return nil, relay.ErrTooLarge
			case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout):
				return nil, relay.ErrTimeout
			case errors.Is(err, cluster.ErrCut):
				return nil, errCut
			case err != nil:
				// The host's node failed (or went away) mid-request.
				return nil, fmt.Errorf("%w: %w", relay.ErrHostGone, err)
			}
			a, err := relay.DecodeAnswer(b)
			if err != nil {
				return nil, relay.ErrBadReply
			}
			if err := a.Err(); err != nil {
				return nil, err
			}
			return a, nil
		}
		return nil, relay.ErrNoHost
	}
}

// answerRelay makes another node's relay request with a host here.
func (rt *Router) answerRelay(ctx context.Context, reg *registry.Registration, body []byte) ([]byte, error) {
	host, _ := reg.PickHost().(relay.Host)
	if host == nil {
		return nil, cluster.ErrNoOne
	}
	x, err := relay.DecodeExchange(body)
	if err != nil {
		return nil, err
	}
	a := rt.relay.ServeRemote(ctx, reg, host, x)
	b, err := a.Encode()
	if err != nil {
		return nil, err
	}
	if int64(len(b))+1024 > rt.cfg.Cluster.MaxPayload() {
		// Larger than a NATS message: the caller gets a 502.
		return (&relay.Answer{Error: "bad_reply"}).Encode()
	}
	return b, nil
}

// nodeMembers is one node's members of a registration, with the number of
// the last of its events they reflect.
type nodeMembers struct {
	Node    string       `json:"node"`
	ID      string       `json:"id,omitempty"` // the registration, in a server-wide list
	Gen     uint64       `json:"gen,string"`
	Seq     uint64       `json:"seq"`
	Members []memberJSON `json:"members"`
}

func nodeMembersOf(node string, reg *registry.Registration) nodeMembers {
	members, seq := reg.View()
	return nodeMembers{Node: node, Gen: reg.Generation, Seq: seq, Members: membersJSON(members)}
}

// clusterMembers adds the members on other nodes to local, for /members
// and an info stream's snapshot; floor, if not nil, gets each node's last
// event number, from every live node (one whose members all left still
// has events). A node cut off lists its own.
func (rt *Router) clusterMembers(ctx context.Context, reg *registry.Registration, local []memberJSON, floor map[string]uint64) []memberJSON {
	answers, _ := rt.ask(ctx, reg, "members", nil, floor != nil)
	for _, b := range answers {
		var nm nodeMembers
		if json.Unmarshal(b, &nm) != nil {
			continue
		}
		local = append(local, nm.Members...)
		if floor != nil {
			floor[floorKey(reg.ID, nm.Node)] = nm.Seq
		}
	}
	slices.SortFunc(local, func(a, b memberJSON) int { return a.ConnectedAt.Compare(b.ConnectedAt) })
	return local
}

func (rt *Router) answerMembers(_ context.Context, reg *registry.Registration, _ []byte) ([]byte, error) {
	return json.Marshal(nodeMembersOf(rt.cfg.Cluster.ID(), reg))
}

// clusterAllMembers asks every other node for its members of every
// registration, for a server-wide snapshot: by registration id and
// generation (floorKey(id, gen)), with each node's event numbers in floor.
// A node whose answer does not fit in a NATS message is missing, and
// logged.
func (rt *Router) clusterAllMembers(ctx context.Context, floor map[string]uint64) map[string][]memberJSON {
	if rt.cut() {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, askTimeout)
	defer cancel()
	out := make(map[string][]memberJSON)
	for _, a := range rt.cfg.Cluster.AskEvery(ctx, "allmembers", nil) {
		var all []nodeMembers
		if a.Err != nil || json.Unmarshal(a.Body, &all) != nil {
			rt.logs.info("cluster", "a node's members are missing from a snapshot", "peer", a.Node, "err", a.Err)
			continue
		}
		for _, nm := range all {
			if len(nm.Members) == 0 {
				continue
			}
			id := nm.ID
			key := floorKey(id, strconv.FormatUint(nm.Gen, 10))
			out[key] = append(out[key], nm.Members...)
			floor[floorKey(id, a.Node)] = nm.Seq
		}
	}
	return out
}

// answerAllMembers lists this node's members of every registration that
// has some here.
func (rt *Router) answerAllMembers(context.Context, *registry.Registration, []byte) ([]byte, error) {
	var all []nodeMembers
	rt.registry.Each(func(reg *registry.Registration) {
		if h, c, m := reg.Counts(); h+c+m > 0 {
			nm := nodeMembersOf(rt.cfg.Cluster.ID(), reg)
			nm.ID = reg.ID
			all = append(all, nm)
		}
	})
	return json.Marshal(all)
}

// clusterChanged closes every info stream when this node's view of the
// other nodes' members jumped (it caught up after NATS came back, or a
// node died and its members are gone without a leave each): a stream
// promises every event, so its client starts again from a snapshot.
func (rt *Router) clusterChanged() {
	for _, w := range rt.watchers.every() {
		w.closeAfter(codeServiceRestart, "cluster changed: reconnect for a new snapshot")
	}
}

// clusterEvent is a member's lifecycle event on its way to the other nodes'
// info streams.
type clusterEvent struct {
	Node  string    `json:"node"`
	Gen   uint64    `json:"gen,string"`
	Seq   uint64    `json:"seq"`
	Event infoEvent `json:"event"` // without its member, which json cannot decode embedded
	// Member is the event's member.
	Member *memberJSON `json:"member"`
}

// shareEvent sends a member's event to the other nodes' watchers.
func (rt *Router) shareEvent(ev registry.Event, e infoEvent) {
	c := rt.cfg.Cluster
	if !c.EventsFollowed() {
		return
	}
	member := e.memberJSON
	e.memberJSON = nil
	if b, err := json.Marshal(clusterEvent{Node: c.ID(), Gen: ev.Reg.Generation, Seq: ev.Seq, Event: e, Member: member}); err == nil {
		c.PublishEvent(ev.Reg.ID, b)
	}
}

// onClusterEvent hands another node's event to this node's watchers.
func (rt *Router) onClusterEvent(id string, data []byte) {
	var ce clusterEvent
	if json.Unmarshal(data, &ce) != nil || ce.Node == "" || ce.Member == nil {
		return
	}
	ce.Event.memberJSON = ce.Member
	rt.deliverInfo(id, ce.Gen, infoFrame{reg: id, node: ce.Node, seq: ce.Seq}, ce.Event, registry.EventJoin)
}

// followEvents makes this node hear the other nodes' events while it has
// watchers: the first one subscribes (confirmed before its snapshot is
// taken); dropWatcher undoes it.
func (rt *Router) followEvents() error {
	if rt.cfg.Cluster == nil {
		return nil
	}
	rt.followMu.Lock()
	defer rt.followMu.Unlock()
	if rt.following == 0 {
		stop, err := rt.cfg.Cluster.FollowEvents(rt.onClusterEvent)
		if err != nil {
			return fmt.Errorf("%w: %w", registry.ErrStore, err)
		}
		rt.unfollow = stop
	}
	rt.following++
	return nil
}

// dropWatcher removes a watcher and, on a cluster node, stops following
// the other nodes' events with the last one.
func (rt *Router) dropWatcher(w *watcher) {
	rt.watchers.remove(w)
	if rt.cfg.Cluster == nil {
		return
	}
	rt.followMu.Lock()
	defer rt.followMu.Unlock()
	if rt.following--; rt.following == 0 {
		rt.unfollow()
		rt.unfollow = nil
	}
}

// sendRequest is /send or DELETE /member on its way to another node; a
// message's data follows it raw (cluster.Pack).
type sendRequest struct {
	Role   registry.Role `json:"role,omitempty"`
	ID     string        `json:"conn,omitempty"`
	Name   string        `json:"name,omitempty"`
	Binary bool          `json:"binary,omitempty"`
	Code   int           `json:"code,omitempty"`
	Reason string        `json:"reason,omitempty"`
}

func (s *sendRequest) selector() registry.Selector {
	return registry.Selector{Role: s.Role, ID: s.ID, Name: s.Name}
}

// ask sends a request to every other node with members of reg (with live,
// to every live node, members of reg or not) and returns the bodies of
// those that answered. A node with nothing to say (ErrNoOne) is skipped;
// one that failed is logged. Cut off, it fails with errCut; a body too
// large for NATS with errTooLarge.
func (rt *Router) ask(ctx context.Context, reg *registry.Registration, method string, body []byte, live bool) ([][]byte, error) {
	if rt.cut() {
		return nil, errCut
	}
	ctx, cancel := context.WithTimeout(ctx, askTimeout)
	defer cancel()
	ask := rt.cfg.Cluster.Ask
	if live {
		ask = rt.cfg.Cluster.AskLive
	}
	var out [][]byte
	for _, a := range ask(ctx, reg, method, body) {
		switch {
		case a.Err == nil:
			out = append(out, a.Body)
		case errors.Is(a.Err, cluster.ErrTooLarge):
			return nil, errTooLarge
		case !errors.Is(a.Err, cluster.ErrNoOne):
			rt.logs.info("cluster", "a node did not answer", "reg", reg.ID, "method", method, "peer", a.Node, "err", a.Err)
		}
	}
	return out, nil
}

// clusterSend sends msg to the members sel chooses on the other nodes and
// returns how many took it.
func (rt *Router) clusterSend(ctx context.Context, reg *registry.Registration, sel registry.Selector, msg registry.Message) (int, error) {
	body, err := cluster.Pack(sendRequest{Role: sel.Role, ID: sel.ID, Name: sel.Name, Binary: msg.Binary}, msg.Data)
	if err != nil {
		return 0, err
	}
	answers, err := rt.ask(ctx, reg, "send", body, false)
	n := 0
	for _, b := range answers {
		var got int
		if json.Unmarshal(b, &got) == nil {
			n += got
		}
	}
	return n, err
}

func (rt *Router) answerSend(_ context.Context, reg *registry.Registration, body []byte) ([]byte, error) {
	var s sendRequest
	data, err := cluster.Unpack(body, &s)
	if err != nil {
		return nil, err
	}
	msg := registry.Message{Binary: s.Binary, Data: data}
	n := reg.SendTo(s.selector(), msg)
	rt.metrics.messagesOut(msg, n)
	return json.Marshal(n)
}

// clusterClose closes the member sel names on another node; false when no
// node has it.
func (rt *Router) clusterClose(ctx context.Context, reg *registry.Registration, sel registry.Selector, code int, reason string) (bool, error) {
	body, err := cluster.Pack(sendRequest{ID: sel.ID, Name: sel.Name, Code: code, Reason: reason}, nil)
	if err != nil {
		return false, err
	}
	answers, err := rt.ask(ctx, reg, "close", body, false)
	return len(answers) > 0, err
}

func (rt *Router) answerClose(_ context.Context, reg *registry.Registration, body []byte) ([]byte, error) {
	var s sendRequest
	if _, err := cluster.Unpack(body, &s); err != nil {
		return nil, err
	}
	m, _, ok := reg.Lookup(s.selector())
	if !ok {
		return nil, cluster.ErrNoOne
	}
	m.Close(s.Code, s.Reason)
	return nil, nil
}

// serveDegraded is /healthz's answer on a cluster node cut off from the
// others: still 200, so that a load balancer keeps sending it the members
// it can serve, but saying so.
func serveDegraded(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Write([]byte("degraded: cut off from the cluster"))
}
