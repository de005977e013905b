package main

import (
	"context"
	"errors"
	"flag"
	"io"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/coder/websocket"
)

// refServerMode is the hidden first argument that runs the reference server
// instead of a benchmark.
const refServerMode = "refserver"

// refServer is the reference the benchmarks compare wsrouter with: the
// obvious coder/websocket broadcaster, as one would write it in 50 lines
// after reading the library's chat example. Rooms are keyed by the id query
// parameter (so that pairs do not cross); every other parameter, keys
// included, is ignored. Each member has a buffered channel and one writer
// goroutine doing one Write per message; the reader sends every message to
// the channel of each other member of its room and drops a member whose
// channel is full. One mutex guards all rooms, as in the chat example. It
// has no registrations, no pings, no limits beyond the read limit.
type refServer struct {
	queue      int   // channel capacity per member, in messages
	maxMessage int64 // read limit

	mu    sync.Mutex
	rooms map[string]map[*refConn]struct{} // guarded by mu
}

type refConn struct {
	ws   *websocket.Conn
	send chan refMsg
}

type refMsg struct {
	typ  websocket.MessageType
	data []byte
}

func (s *refServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/healthz":
		w.Write([]byte("ok"))
		return
	case "/connect":
	default:
		http.NotFound(w, r)
		return
	}
	id := r.URL.Query().Get("id")
	ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
	if err != nil {
		return
	}
	defer ws.CloseNow()
	ws.SetReadLimit(s.maxMessage)
	c := &refConn{ws: ws, send: make(chan refMsg, s.queue)}
	s.join(id, c)
	defer s.leave(id, c)

	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	go func() {
		defer cancel()
		for {
			select {
			case m := <-c.send:
				if err := ws.Write(ctx, m.typ, m.data); err != nil {
					return
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	for {
		typ, data, err := ws.Read(ctx)
		if err != nil {
			return
		}
		s.broadcast(id, c, refMsg{typ, data})
	}
}

func (s *refServer) join(id string, c *refConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.rooms[id] == nil {
		s.rooms[id] = map[*refConn]struct{}{}
	}
	s.rooms[id][c] = struct{}{}
}

func (s *refServer) leave(id string, c *refConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.rooms[id], c)
	if len(s.rooms[id]) == 0 {
		delete(s.rooms, id)
	}
}

func (s *refServer) broadcast(id string, from *refConn, m refMsg) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.rooms[id] {
		if c == from {
			continue
		}
		select {
		case c.send <- m:
		default:
			delete(s.rooms[id], c)
			go c.ws.Close(4008, "slow consumer")
		}
	}
}

// runRefServer serves the reference until ctx is done (SIGINT or SIGTERM),
// then exits 0.
func runRefServer(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet(refServerMode, flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:0", "listen address")
	s := &refServer{rooms: map[string]map[*refConn]struct{}{}}
	fs.IntVar(&s.queue, "queue", 1024, "channel capacity per member, in messages")
	fs.Int64Var(&s.maxMessage, "max-message", 1<<20, "largest message read")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	// Hijacked connections are not closed by Close; exiting ends them.
	if err := srv.Close(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
