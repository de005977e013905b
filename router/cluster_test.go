package router

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"wsrouter/registry"
	"wsrouter/registry/cluster"
	"wsrouter/registry/cluster/clustertest"
	"wsrouter/router/relay"
)

// These tests run three routers in this process, each a node of one cluster
// with its own NATS connection, against an embedded NATS server with
// JetStream (docs/protocol.md §15).

// clusterNode is one router of a test cluster.
type clusterNode struct {
	*testServer
	node    *cluster.Node
	created chan string // ids of registrations that became live here
}

var clusterSeq struct {
	sync.Mutex
	n int
}

// newCluster starts n routers sharing a fresh cluster (a bucket of its own)
// on ns.
func newCluster(t *testing.T, ns *clustertest.NATS, n int, regCfg registry.Config) []*clusterNode {
	return newClusterConfig(t, ns, n, Config{Registry: regCfg})
}

// newClusterConfig is newCluster with a router configuration.
func newClusterConfig(t *testing.T, ns *clustertest.NATS, n int, base Config) []*clusterNode {
	t.Helper()
	clusterSeq.Lock()
	clusterSeq.n++
	name := fmt.Sprintf("test%d", clusterSeq.n)
	clusterSeq.Unlock()
	nodes := make([]*clusterNode, n)
	for i := range nodes {
		node, err := cluster.Dial(context.Background(), cluster.Config{
			URLs: ns.URL(), Name: name, OpTimeout: 2 * time.Second, Log: slog.New(slog.DiscardHandler),
			Heartbeat: 500 * time.Millisecond, DeadAfter: 3 * time.Second,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { node.Close() }) // after the router's shutdown
		cn := &clusterNode{node: node, created: make(chan string, 1024)}
		cfg := base
		cfg.Cluster = node
		cfg.Registry.Store, cfg.Registry.Broker = node, node
		cfg.Registry.Observers = []registry.Observer{func(ev registry.Event) {
			if ev.Kind == registry.EventCreate {
				offer(cn.created, ev.Reg.ID)
			}
		}}
		cn.testServer = newTestServer(t, cfg)
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		if err := node.Start(ctx, cn.rt.Registry()); err != nil {
			t.Fatal(err)
		}
		cancel()
		nodes[i] = cn
	}
	return nodes
}

// clusterWithReg starts a cluster of count nodes (registrations kept) and
// makes a registration of regType on node on, known to every node.
func clusterWithReg(t *testing.T, count, on int, regType string) (*clustertest.NATS, []*clusterNode, string) {
	t.Helper()
	ns := clustertest.Start(t)
	n := newCluster(t, ns, count, regCfgKeep())
	id := n[on].register(t, regType)
	knows(t, id, n...)
	return ns, n, id
}

// knows waits until the registration id is live on every node.
func knows(t *testing.T, id string, nodes ...*clusterNode) {
	t.Helper()
	for _, cn := range nodes {
		if _, err := cn.rt.Registry().Get(id); err == nil {
			continue
		}
		waitFor(t, cn.created, "registration "+id+" on another node", func(got string) bool {
			_, err := cn.rt.Registry().Get(id)
			return got == id || err == nil
		})
	}
}

// joined waits until each node's view counts want members of id on the
// other nodes; then a message reaches them all.
func joined(t *testing.T, id string, nodes ...*clusterNode) {
	t.Helper()
	for _, cn := range nodes {
		others := 0
		for _, o := range nodes {
			if o != cn {
				if reg, err := o.rt.Registry().Get(id); err == nil && len(reg.Members()) > 0 {
					others++
				}
			}
		}
		eventually(t, "presence of the other nodes", func() bool { return len(cn.node.Peers(id)) == others })
	}
}

func TestClusterLobby(t *testing.T) {
	_, n, id := clusterWithReg(t, 3, 0, "lobby")
	a, b, c := n[0].dial(t, id, ""), n[1].dial(t, id, ""), n[2].dial(t, id, "")
	for i, conn := range []*websocket.Conn{a, b, c} {
		write(t, conn, fmt.Sprintf("from %d", i))
	}
	for i, conn := range []*websocket.Conn{a, b, c} {
		var got []string
		for range 2 {
			_, m := read(t, conn)
			got = append(got, m)
		}
		slices.Sort(got)
		var want []string
		for j := range 3 {
			if j != i {
				want = append(want, fmt.Sprintf("from %d", j))
			}
		}
		if !slices.Equal(got, want) {
			t.Fatalf("member on node %d got %q, want %q", i, got, want)
		}
	}
	// Text and binary cross as they were sent.
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	if err := a.Write(ctx, websocket.MessageBinary, []byte{0, 0xff, 1}); err != nil {
		t.Fatal(err)
	}
	for _, conn := range []*websocket.Conn{b, c} {
		if typ, m := read(t, conn); typ != websocket.MessageBinary || m != "\x00\xff\x01" {
			t.Fatalf("got %v %q, want the binary message", typ, m)
		}
	}
}

func TestClusterHostClient(t *testing.T) {
	_, n, id := clusterWithReg(t, 3, 1, "hostclient")
	host := n[0].dial(t, id, "host")
	cb, cc := n[1].dial(t, id, "client"), n[2].dial(t, id, "client")
	write(t, host, "to clients")
	expectNext(t, cb, "to clients")
	expectNext(t, cc, "to clients")
	write(t, cb, "from b")
	expectNext(t, host, "from b")
	// A client's message reaches hosts only: c's next message is the
	// host's marker, not b's.
	write(t, host, "marker")
	expectNext(t, cc, "marker")
	expectNext(t, cb, "marker")
}

// TestClusterOrder: 2,000 messages from a member on one node arrive in order
// at members on the two others.
func TestClusterOrder(t *testing.T) {
	_, n, id := clusterWithReg(t, 3, 0, "lobby")
	a, b, c := n[0].dial(t, id, ""), n[1].dial(t, id, ""), n[2].dial(t, id, "")
	const count = 2000
	go func() {
		for i := range count {
			if a.Write(context.Background(), websocket.MessageText, []byte(fmt.Sprint(i))) != nil {
				return
			}
		}
	}()
	for _, conn := range []*websocket.Conn{b, c} {
		for i := range count {
			if _, m := read(t, conn); m != fmt.Sprint(i) {
				t.Fatalf("message %d: got %q (out of order)", i, m)
			}
		}
	}
}

// TestClusterJoinHearsAtOnce: a registration made on one node is joined on
// another at once, and a member joining on one node hears a message sent on
// another the moment its 101 arrives: nothing is waited for but the 101.
func TestClusterJoinHearsAtOnce(t *testing.T) {
	ns := clustertest.Start(t)
	n := newCluster(t, ns, 2, regCfgKeep())
	for i := range 20 {
		id := n[0].register(t, "lobby")
		b := n[1].dial(t, id, "") // before node B's watch may have it
		a := n[0].dial(t, id, "")
		write(t, a, fmt.Sprint("hello ", i))
		expectNext(t, b, fmt.Sprint("hello ", i))
		write(t, b, fmt.Sprint("back ", i))
		expectNext(t, a, fmt.Sprint("back ", i))
		a2 := n[0].dial(t, id, "") // a late joiner on the first node
		write(t, b, "again")
		expectNext(t, a2, "again")
	}
}

func TestClusterIDRace(t *testing.T) {
	ns := clustertest.Start(t)
	n := newCluster(t, ns, 2, regCfgKeep())
	for round := range 5 {
		id := fmt.Sprint("race-", round)
		q := url.Values{"key": {testKey}, "host_key": {testHostKey}, "reg_type": {"lobby"}, "id_req": {id}}
		codes := make(chan int, 2)
		for _, cn := range n {
			go func() {
				req, _ := http.NewRequest("GET", cn.URL+"/register?"+q.Encode(), nil)
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					codes <- 0
					return
				}
				resp.Body.Close()
				codes <- resp.StatusCode
			}()
		}
		got := []int{<-codes, <-codes}
		slices.Sort(got)
		if !slices.Equal(got, []int{200, 409}) {
			t.Fatalf("round %d: got %v, want one 200 and one 409", round, got)
		}
	}
}

func TestClusterRemove(t *testing.T) {
	_, n, id := clusterWithReg(t, 3, 0, "lobby")
	a, b := n[0].dial(t, id, ""), n[1].dial(t, id, "")
	q := url.Values{"id": {id}, "key": {testKey}, "host_key": {testHostKey}}
	if code, body, _ := n[2].do(t, "GET", "/remove?"+q.Encode(), nil, nil); code != 200 {
		t.Fatalf("remove on C: %d %q", code, body)
	}
	for i, conn := range []*websocket.Conn{a, b} {
		if code, _ := closeStatus(t, conn); code != 4000 {
			t.Fatalf("member on node %d: closed with %d, want 4000", i, code)
		}
	}
	// Gone everywhere: another connect is a 404 on every node.
	for i, cn := range n {
		eventually(t, "the removal on every node", func() bool {
			_, err := cn.rt.Registry().Get(id)
			return err != nil
		})
		if _, resp, err := cn.tryDial(t, id, testKey, "", nil); err == nil || resp == nil || resp.StatusCode != 404 {
			t.Fatalf("connect on node %d after remove: %v, want 404", i, err)
		}
	}
}

// TestClusterGC: a member on B keeps a registration alive that has none on
// A; once it leaves too, it is removed after the grace, once.
func TestClusterGC(t *testing.T) {
	ns := clustertest.Start(t)
	n := newCluster(t, ns, 2, registry.Config{GCGrace: 300 * time.Millisecond})
	id := n[0].register(t, "lobby")
	knows(t, id, n...)
	a, b := n[0].dial(t, id, ""), n[1].dial(t, id, "")
	a.Close(websocket.StatusNormalClosure, "")
	// A's grace passes with B's member still there: A's collection finds
	// it in use and leaves it.
	eventually(t, "A's garbage collection to try", func() bool { return n[0].node.Deferred() > 0 })
	for i, cn := range n {
		if _, err := cn.rt.Registry().Get(id); err != nil {
			t.Fatalf("removed on node %d while a member is on another node", i)
		}
	}
	write(t, b, "still here") // and it still works
	b.Close(websocket.StatusNormalClosure, "")
	causes := map[registry.Cause]int{}
	for _, cn := range n {
		select {
		case c := <-cn.removed:
			causes[c]++
		case <-time.After(testTimeout):
			t.Fatal("not removed after the last member left")
		}
	}
	if causes[registry.CauseGC] != 1 || causes[registry.CauseRemote] != 1 {
		t.Fatalf("removal causes %v: want one gc and one remote", causes)
	}
}

func TestClusterRelay(t *testing.T) {
	_, n, id := clusterWithReg(t, 3, 0, "hostclient")
	// No host anywhere: 503.
	if code, body, _ := n[2].do(t, "GET", relayURL(id, "/", nil), nil, nil); code != 503 {
		t.Fatalf("no host: got %d %q, want 503", code, body)
	}
	dev, _ := n[0].device(t, id, func(f relay.Request) string {
		return reply(f, map[string]any{"status": 201, "type": "text", "content": "hi from " + f.Path + " " + f.Method})
	})
	code, body, hdr := n[2].do(t, "POST", relayURL(id, "/led", nil), strings.NewReader("on"), nil)
	if code != 201 || body != "hi from /led POST" {
		t.Fatalf("relay from C to a host on A: got %d %q, want 201", code, body)
	}
	if hdr.Get("Content-Security-Policy") == "" {
		t.Fatal("the relay's sandbox header is missing")
	}
	// A wrong key is refused on the node the caller reached.
	if code, _, _ := n[2].do(t, "GET", relayURL(id, "/", url.Values{"key": {"wrong"}}), nil, nil); code != 403 {
		t.Fatalf("wrong key: got %d, want 403", code)
	}
	dev.Close(websocket.StatusNormalClosure, "")

	// The host leaves mid-request: 502.
	n[1].dial(t, id, "client") // keeps presence when the host goes
	held, frames := n[0].device(t, id, func(relay.Request) string { return "" })
	res := make(chan int, 1)
	go func() {
		code, _, _ := n[2].do(t, "GET", relayURL(id, "/slow", nil), nil, nil)
		res <- code
	}()
	select {
	case <-frames:
	case <-time.After(testTimeout):
		t.Fatal("the request never reached the device")
	}
	held.Close(websocket.StatusNormalClosure, "")
	if code := <-res; code != 502 {
		t.Fatalf("host left mid-request: got %d, want 502", code)
	}
	// No host again, members elsewhere: 503.
	eventually(t, "the host's leave", func() bool { return n[0].rt.relay.Pending() == 0 })
	if code, _, _ := n[2].do(t, "GET", relayURL(id, "/", nil), nil, nil); code != 503 {
		t.Fatalf("host gone: got %d, want 503", code)
	}
}

// TestClusterBackendAPI: /members lists every node's members, /send reaches
// them and DELETE /member closes one on another node.
func TestClusterBackendAPI(t *testing.T) {
	_, n, id := clusterWithReg(t, 3, 0, "hostclient")
	n[0].dial(t, id, "host")
	c1 := n[1].dial(t, id, "client")
	q := url.Values{"id": {id}, "host_key": {testHostKey}}
	code, body, _ := n[2].do(t, "GET", "/members?"+q.Encode(), nil, nil)
	if code != 200 || strings.Count(body, `"conn"`) != 2 || !strings.Contains(body, `"host"`) || !strings.Contains(body, `"client"`) {
		t.Fatalf("/members on C: %d %s", code, body)
	}
	q.Set("to", "client")
	code, body, _ = n[2].do(t, "POST", "/send?"+q.Encode(), strings.NewReader("pushed"), http.Header{"Content-Type": {"text/plain"}})
	if code != 200 || !strings.Contains(body, `"delivered":1`) {
		t.Fatalf("/send on C: %d %s", code, body)
	}
	expectNext(t, c1, "pushed")
	// A body near 1 MiB crosses whole (not base64, which would not fit
	// in a NATS message).
	big := strings.Repeat("x", 900<<10)
	code, body, _ = n[2].do(t, "POST", "/send?"+q.Encode(), strings.NewReader(big), http.Header{"Content-Type": {"text/plain"}})
	if code != 200 || !strings.Contains(body, `"delivered":1`) {
		t.Fatalf("/send of 900 KiB on C: %d %s", code, body)
	}
	expectNext(t, c1, big)
	q.Del("to")
	q.Set("conn", n[1].memberID(t, id))
	if code, body, _ := n[2].do(t, "DELETE", "/member?"+q.Encode(), nil, nil); code != 200 {
		t.Fatalf("DELETE /member on C: %d %s", code, body)
	}
	if code, _ := closeStatus(t, c1); code != 4002 {
		t.Fatalf("closed with %d, want 4002", code)
	}
}

func (cn *clusterNode) memberID(t *testing.T, id string) string {
	t.Helper()
	reg, err := cn.rt.Registry().Get(id)
	if err != nil || len(reg.Members()) != 1 {
		t.Fatalf("want one member of %s on the node", id)
	}
	return reg.Members()[0].Member.ID()
}

// TestClusterNATSRestart: NATS goes away and comes back mid-test. Members
// on one node keep talking, the node says it is degraded and refuses what
// needs the cluster, and once NATS is back cross-node traffic resumes.
func TestClusterNATSRestart(t *testing.T) {
	ns, n, id := clusterWithReg(t, 2, 0, "lobby")
	a1, a2, b := n[0].dial(t, id, ""), n[0].dial(t, id, ""), n[1].dial(t, id, "")
	joined(t, id, n...)

	ns.Stop()
	eventually(t, "degraded", func() bool {
		code, body, _ := n[0].do(t, "GET", "/healthz", nil, nil)
		return code == 200 && strings.HasPrefix(body, "degraded")
	})
	write(t, a1, "local")
	expectNext(t, a2, "local")
	q := url.Values{"key": {testKey}, "host_key": {testHostKey}, "reg_type": {"lobby"}}
	if code, _, _ := n[0].do(t, "GET", "/register?"+q.Encode(), nil, nil); code != 503 {
		t.Fatalf("register while cut: got %d, want 503", code)
	}
	if _, resp, _ := n[0].tryDial(t, "unknown-id", testKey, "", nil); resp == nil || resp.StatusCode != 503 {
		t.Fatalf("connect to an unknown id while cut: want 503")
	}
	// A known registration still admits members.
	a3 := n[0].dial(t, id, "")
	q.Set("id", id)
	if code, _, _ := n[0].do(t, "GET", "/remove?"+q.Encode(), nil, nil); code != 503 {
		t.Fatalf("remove while cut: got %d, want 503", code)
	}
	if got := scrape(t, n[0].testServer)["wsrouter_cluster_degraded"].GetMetric()[0].GetGauge().GetValue(); got != 1 {
		t.Fatalf("wsrouter_cluster_degraded while cut: %v, want 1", got)
	}

	ns.Restart()
	for _, cn := range n {
		eventually(t, "back in sync", func() bool {
			code, body, _ := cn.do(t, "GET", "/healthz", nil, nil)
			return code == 200 && body == "ok"
		})
	}
	joined(t, id, n...)
	write(t, b, "across again")
	for _, conn := range []*websocket.Conn{a1, a2, a3} {
		expectNext(t, conn, "across again")
	}
	write(t, a3, "and back")
	// Between nodes a message is delivered at most once during an
	// outage: "local" may have waited in the NATS client's reconnect
	// buffer and crossed when NATS came back, or been lost.
	if _, m := read(t, b); m != "and back" && m != "local" {
		t.Fatalf("got %q, want \"and back\" (perhaps after \"local\")", m)
	} else if m == "local" {
		expectNext(t, b, "and back")
	}
}

// TestClusterInfo: an info stream on one node sees the members of every
// node, in its snapshot and as they come and go, nothing missed or doubled.
func TestClusterInfo(t *testing.T) {
	ns := clustertest.Start(t)
	n := newClusterConfig(t, ns, 2, Config{Registry: regCfgKeep(), AdminToken: "adm"})
	id := n[0].register(t, "lobby")
	m1 := n[1].dial(t, id, "") // on B, before the streams open
	one := n[0].watch(t, url.Values{"id": {id}, "host_key": {testHostKey}}, nil)
	all := n[0].watch(t, nil, http.Header{"Authorization": {"Bearer adm"}})

	snap := readInfo(t, one)
	if snap.Type != "snapshot" || len(snap.Members) != 1 {
		t.Fatalf("snapshot on A: %+v, want B's member", snap)
	}
	snapAll := readInfo(t, all)
	if snapAll.Type != "snapshot" || len(snapAll.Registrations) != 1 || len(snapAll.Registrations[0].Members) != 1 {
		t.Fatalf("server-wide snapshot on A: %+v, want the registration with B's member", snapAll)
	}

	n[1].dial(t, id, "")
	for _, c := range []*websocket.Conn{one, all} {
		if f := readInfo(t, c); f.Type != "join" || f.Conn == snap.Members[0].Conn {
			t.Fatalf("after a join on B: %+v, want the new member's join", f)
		}
	}
	m1.Close(websocket.StatusNormalClosure, "")
	for _, c := range []*websocket.Conn{one, all} {
		if f := readInfo(t, c); f.Type != "leave" || f.Conn != snap.Members[0].Conn || f.Code != 1000 {
			t.Fatalf("after a leave on B: %+v, want its leave with 1000", f)
		}
	}
	// A's own member comes in order too, then a removal ends the stream.
	n[0].dial(t, id, "")
	if f := readInfo(t, one); f.Type != "join" {
		t.Fatalf("after a join on A: %+v", f)
	}
	q := url.Values{"id": {id}, "key": {testKey}, "host_key": {testHostKey}}
	if code, _, _ := n[1].do(t, "GET", "/remove?"+q.Encode(), nil, nil); code != 200 {
		t.Fatal("remove on B failed")
	}
	for {
		f := readInfo(t, one)
		if f.Type == "remove" {
			break
		}
		if f.Type != "leave" { // the members' leaves may come first
			t.Fatalf("before the removal: %+v", f)
		}
	}
	if code, _ := closeStatus(t, one); code != 4000 {
		t.Fatalf("stream closed with %d, want 4000", code)
	}
}

// TestClusterNodeDies: a node goes away; its members reconnect to another
// node and carry on in the same registration.
func TestClusterNodeDies(t *testing.T) {
	ns := clustertest.Start(t)
	n := newCluster(t, ns, 2, regCfgKeep())
	id := n[0].register(t, "lobby")
	a := n[0].dial(t, id, "")
	b := n[1].dial(t, id, "")
	write(t, b, "before")
	expectNext(t, a, "before")

	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	closed := make(chan websocket.StatusCode, 1)
	go func() { // reading, so that the close handshake completes
		code, _ := closeStatus(t, b)
		closed <- code
	}()
	n[1].rt.Shutdown(ctx)
	n[1].node.Close()
	if code := <-closed; code != 1001 {
		t.Fatalf("member of the node that went: closed with %d, want 1001", code)
	}
	b2 := n[0].dial(t, id, "") // back, through the other node
	write(t, b2, "after")
	expectNext(t, a, "after")
}

// TestClusterPubSub: a publish on one node reaches the subscribers on the
// others, from a member's socket and from POST /publish.
func TestClusterPubSub(t *testing.T) {
	ns := clustertest.Start(t)
	n := newCluster(t, ns, 3, regCfgKeep())
	id := n[0].register(t, "pubsub")
	sub := n[0].dial(t, id, "")
	n[0].subscribe(t, sub, "alerts.>")
	pub := n[1].dial(t, id, "")
	write(t, pub, `{"action":"publish","event":"alerts.fire","data":{"room":3}}`)
	if e := readEvent(t, sub); e.Event != "alerts.fire" || string(e.Data) != `{"room":3}` {
		t.Fatalf("from a member on B: %+v", e)
	}
	q := url.Values{"id": {id}}
	code, body, _ := n[2].do(t, http.MethodPost, "/publish?"+q.Encode(), strings.NewReader(`{"event":"alerts.flood","data":"basement"}`), http.Header{"X-Key": {testKey}})
	if code != 200 {
		t.Fatalf("POST /publish on C: %d %s", code, body)
	}
	if e := readEvent(t, sub); e.Event != "alerts.flood" || string(e.Data) != `"basement"` {
		t.Fatalf("from POST /publish on C: %+v", e)
	}
}

// TestClusterInfoRestartsOnNodeGone: when a node goes, its members are gone
// without a leave each; an info stream is closed with 1012 so that its
// client starts again from a snapshot.
func TestClusterInfoRestartsOnNodeGone(t *testing.T) {
	ns := clustertest.Start(t)
	n := newClusterConfig(t, ns, 2, Config{Registry: regCfgKeep(), AdminToken: "adm"})
	all := n[0].watch(t, nil, http.Header{"Authorization": {"Bearer adm"}})
	if f := readInfo(t, all); f.Type != "snapshot" {
		t.Fatalf("first frame %+v", f)
	}
	n[1].node.Close()
	if code, _ := closeStatus(t, all); code != 1012 {
		t.Fatalf("stream closed with %d, want 1012", code)
	}
}
