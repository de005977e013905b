package cluster

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"github.com/nats-io/nats.go"

	"wsrouter/registry"
)

// This file carries requests about one registration to the nodes that have
// members of it: each node listens on its own subject, and the router
// registers what it answers (members, a relay to a host, …).

// Handler answers a request about reg from another node. Its error's text
// goes back to the asker; ErrNoOne means "nothing of that here".
type Handler func(ctx context.Context, reg *registry.Registration, body []byte) ([]byte, error)

// ErrNoOne is a handler's answer that it has nothing for the request (no
// host, no such member).
var ErrNoOne = errors.New("none here")

// ErrCut is Ask's error while the node is cut off from the cluster.
var ErrCut = errors.New("cut off from the cluster")

// Handle registers h for method. Call it before Start.
func (n *Node) Handle(method string, h Handler) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.handlers[method] = h
}

// Request and answer headers.
const (
	hdrMethod = "Wsr-Method"
	hdrReg    = "Wsr-Reg"
	hdrGen    = "Wsr-Gen"
	hdrError  = "Wsr-Error"
	hdrFrom   = "Wsr-From"
	hdrRev    = "Wsr-Rev"
	noOne     = "none"

	// methodInterest is a node's word that it has members of a
	// registration (tellInterest); the node answers it itself.
	methodInterest = "interest"
)

// serveRequest answers another node's request, each on a goroutine of its
// own: a relay waits for a device.
func (n *Node) serveRequest(m *nats.Msg) {
	if m.Header.Get(hdrMethod) == methodInterest {
		// Quick, and what a member's 101 waits for: never queued
		// behind relays.
		n.reply(m, nil, n.noteInterest(m))
		return
	}
	slots := n.serving
	if m.Header.Get(hdrMethod) == "relay" {
		slots = n.relaying // a relay may wait for a device for seconds
	}
	select {
	case slots <- struct{}{}:
	default:
		// Every slot is taken: this request is refused at once rather
		// than queued without bound.
		n.reply(m, nil, errors.New("busy"))
		return
	}
	go func() {
		defer func() { <-slots }()
		body, err := n.answer(m)
		n.reply(m, body, err)
	}()
}

// reply answers request m with body, or with err.
func (n *Node) reply(m *nats.Msg, body []byte, err error) {
	if m.Reply == "" {
		return
	}
	r := nats.NewMsg(m.Reply)
	switch {
	case errors.Is(err, ErrNoOne):
		r.Header.Set(hdrError, noOne)
	case err != nil:
		r.Header.Set(hdrError, err.Error())
	default:
		r.Data = body
	}
	if err := n.nc.PublishMsg(r); err != nil {
		// Too large for NATS, most likely: say so instead.
		r.Data = nil
		r.Header.Set(hdrError, "answer not sent: "+err.Error())
		n.nc.PublishMsg(r)
	}
}

// maxServing bounds the other nodes' requests this node answers at once,
// relays and the rest apart.
const maxServing = 1024

// noteInterest takes another node's word that it has members of a
// registration, or follows events (tellInterest, tellFollow).
func (n *Node) noteInterest(m *nats.Msg) error {
	rev, err := strconv.ParseUint(m.Header.Get(hdrRev), 10, 64)
	from := m.Header.Get(hdrFrom)
	if err != nil || from == "" || from == n.id {
		return errors.New("bad interest")
	}
	if m.Header.Get(hdrReg) == "" {
		n.setFollower(from, true, rev)
		return nil
	}
	if rev == 0 {
		return errors.New("bad interest")
	}
	n.setPresence(m.Header.Get(hdrReg), from, true, rev)
	return nil
}

func (n *Node) answer(m *nats.Msg) ([]byte, error) {
	n.mu.Lock()
	h := n.handlers[m.Header.Get(hdrMethod)]
	n.mu.Unlock()
	if h == nil {
		return nil, fmt.Errorf("no method %q", m.Header.Get(hdrMethod))
	}
	id := m.Header.Get(hdrReg)
	if id == "" {
		return h(n.ctx, nil, m.Data) // about the node, not one registration
	}
	gen, _ := strconv.ParseUint(m.Header.Get(hdrGen), 10, 64)
	reg, err := n.registry.Load().Get(id)
	if err != nil || reg.Generation != gen {
		return nil, ErrNoOne
	}
	return h(n.ctx, reg, m.Data)
}

// Answer is one node's answer to Ask.
type Answer struct {
	Node string
	Body []byte
	// Err is the node's error (ErrNoOne when it had nothing), or the
	// request's (a timeout, NATS away).
	Err error
}

// Ask sends a request about reg to every live other node with members of
// it, at once, and returns their answers when all have come or ctx ended.
func (n *Node) Ask(ctx context.Context, reg *registry.Registration, method string, body []byte) []Answer {
	return n.askNodes(ctx, n.Peers(reg.ID), reg, method, body)
}

func (n *Node) askNodes(ctx context.Context, peers []string, reg *registry.Registration, method string, body []byte) []Answer {
	out := make([]Answer, len(peers))
	var wg sync.WaitGroup
	for i, peer := range peers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b, err := n.AskNode(ctx, peer, reg, method, body)
			out[i] = Answer{Node: peer, Body: b, Err: err}
		}()
	}
	wg.Wait()
	return out
}

// AskLive is Ask to every live other node, members of reg or not.
func (n *Node) AskLive(ctx context.Context, reg *registry.Registration, method string, body []byte) []Answer {
	return n.askNodes(ctx, n.livePeers(), reg, method, body)
}

// AskEvery sends a request about no registration in particular (reg nil
// for its handlers) to every live other node, at once, and returns their
// answers when all have come or ctx ended.
func (n *Node) AskEvery(ctx context.Context, method string, body []byte) []Answer {
	return n.askNodes(ctx, n.livePeers(), nil, method, body)
}

// AskNode sends a request about reg (nil: about none) to one node and
// waits for its answer until ctx ends.
func (n *Node) AskNode(ctx context.Context, node string, reg *registry.Registration, method string, body []byte) ([]byte, error) {
	if n.Degraded() {
		return nil, ErrCut
	}
	m := nats.NewMsg(n.prefix + ".n." + node)
	m.Header.Set(hdrMethod, method)
	if reg != nil {
		m.Header.Set(hdrReg, reg.ID)
		m.Header.Set(hdrGen, strconv.FormatUint(reg.Generation, 10))
	}
	m.Data = body
	if int64(len(body))+1024 > n.nc.MaxPayload() {
		return nil, ErrTooLarge
	}
	r, err := n.nc.RequestMsgWithContext(ctx, m)
	if err != nil {
		if errors.Is(err, nats.ErrNoResponders) {
			return nil, ErrNoOne // the node is gone
		}
		return nil, err
	}
	switch e := r.Header.Get(hdrError); e {
	case "":
		return r.Data, nil
	case noOne:
		return nil, ErrNoOne
	default:
		return nil, errors.New(e)
	}
}

// ErrTooLarge means a request does not fit in one NATS message.
var ErrTooLarge = errors.New("too large for the cluster's NATS messages")

// Pack writes a request or answer body for another node: meta's JSON,
// prefixed by its length (4 bytes, big-endian), then body's raw bytes.
// meta must not marshal the body itself.
func Pack(meta any, body []byte) ([]byte, error) {
	m, err := json.Marshal(meta)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 4, 4+len(m)+len(body))
	binary.BigEndian.PutUint32(out, uint32(len(m)))
	out = append(out, m...)
	return append(out, body...), nil
}

// Unpack reads what Pack wrote into meta and returns the body.
func Unpack(b []byte, meta any) ([]byte, error) {
	if len(b) < 4 {
		return nil, errors.New("short message")
	}
	n := binary.BigEndian.Uint32(b)
	if uint64(n) > uint64(len(b)-4) {
		return nil, errors.New("bad length")
	}
	if err := json.Unmarshal(b[4:4+n], meta); err != nil {
		return nil, err
	}
	return b[4+n:], nil
}

// PublishEvent sends one of this node's lifecycle events of registration
// id, already encoded, to the nodes that follow events (FollowEvents). At
// most once: an event nobody follows, or sent while NATS is away past the
// reconnect buffer, is gone.
func (n *Node) PublishEvent(id string, data []byte) {
	if !n.EventsFollowed() {
		return
	}
	if err := n.nc.Publish(n.prefix+".e."+enc(id), data); err != nil {
		n.dropped.Add(1)
	}
}

// FollowEvents calls f with every other node's lifecycle events until the
// returned stop is called. Nodes send events only while some node
// follows: this one says so with its follow key i.{node} and tells the
// live nodes directly, and returns once they have heard it, so that no
// event after that is missed.
func (n *Node) FollowEvents(f func(id string, data []byte)) (stop func(), err error) {
	prefix := n.prefix + ".e."
	sub, err := n.nc.Subscribe(prefix+"*", func(m *nats.Msg) {
		if id, ok := dec(strings.TrimPrefix(m.Subject, prefix)); ok {
			f(id, m.Data)
		}
	})
	if err != nil {
		return nil, err
	}
	ctx, cancel := n.opCtx()
	defer cancel()
	rev, err := n.kv.Put(ctx, "i."+n.id, nil)
	if err != nil {
		sub.Unsubscribe()
		return nil, err
	}
	n.tellInterest("", rev)
	return func() {
		sub.Unsubscribe()
		ctx, cancel := n.opCtx()
		defer cancel()
		n.kv.Delete(ctx, "i."+n.id)
	}, nil
}

// setFollower records that node follows events (or no longer does), as of
// the bucket's revision rev.
func (n *Node) setFollower(node string, on bool, rev uint64) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if rev != 0 && rev <= n.followRev[node] {
		return // stale
	}
	if rev != 0 {
		n.followRev[node] = rev
	}
	if on {
		n.followers[node] = true
	} else {
		delete(n.followers, node)
	}
	n.followerCount.Store(int32(len(n.followers)))
}

// EventsFollowed reports whether another node follows events: if none
// does, PublishEvent has no one to send to.
func (n *Node) EventsFollowed() bool { return n.followerCount.Load() > 0 }
