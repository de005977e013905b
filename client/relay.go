package client

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
)

// relayRequest is a relay frame from the router (docs/protocol.md §7.1).
type relayRequest struct {
	RID          string                     `json:"rid"`
	Method       string                     `json:"method"`
	Path         string                     `json:"path"`
	Query        map[string]json.RawMessage `json:"query"`
	Headers      map[string]string          `json:"headers"`
	Body         *string                    `json:"body"`
	BodyEncoding string                     `json:"body_encoding"`
}

// relayReply is the device's answer (§7.3).
type relayReply struct {
	RID      string            `json:"rid"`
	Status   int               `json:"status"`
	Type     string            `json:"type,omitempty"`
	Headers  map[string]string `json:"headers,omitempty"`
	Content  string            `json:"content"`
	Encoding string            `json:"encoding,omitempty"`
}

// RelayOptions tune ServeRelay.
type RelayOptions struct {
	// Concurrency bounds the requests handled at once; 0 means 16.
	Concurrency int
	// Queue bounds the requests waiting for a slot; 0 means 256, more than
	// the router lets wait on a registration by default
	// (-relay-max-pending 100). Beyond it a request is answered 503 at
	// once, so that the connection never stops reading.
	Queue int
	// MaxReply bounds a reply frame, in bytes; 0 means 1 MiB, the router's
	// default -max-message. A larger reply (a body is base64 when it is not
	// UTF-8: 4/3 of its size) would get the device's session closed with
	// 1009, so it is answered 502 instead.
	MaxReply int
}

// replyTimeout bounds writing one reply.
const replyTimeout = 10 * time.Second

// ServeRelay answers the relayed HTTP requests that reach conn (a host of a
// hostclient registration) with handler, as an http.Server would: each
// relay frame becomes an *http.Request (method, path, query, headers, body),
// and what the handler writes (status, headers, body; a body that is not
// UTF-8 goes as base64) becomes the reply. Requests run concurrently, at
// most opts.Concurrency at once. Frames that are not relay requests still
// reach conn.Read. It returns when ctx ends or conn closes, after the
// requests in progress have been answered.
func ServeRelay(ctx context.Context, conn *Conn, handler http.Handler, opts *RelayOptions) error {
	n, queue, maxReply := 16, 256, 1<<20
	if opts != nil && opts.Concurrency > 0 {
		n = opts.Concurrency
	}
	if opts != nil && opts.Queue > 0 {
		queue = opts.Queue
	}
	if opts != nil && opts.MaxReply > 0 {
		maxReply = opts.MaxReply
	}
	// send writes a reply on its own deadline: a reply to a request in
	// progress still goes out after ctx has ended.
	send := func(reply relayReply) {
		b, _ := json.Marshal(reply)
		if len(b) > maxReply {
			b, _ = json.Marshal(relayReply{RID: reply.RID, Status: http.StatusBadGateway, Type: "text", Content: "the device's reply is too large for the router"})
		}
		wctx, cancel := context.WithTimeout(context.Background(), replyTimeout)
		defer cancel()
		// A reply whose session ended is lost; the router has answered
		// its caller 502 already.
		conn.Write(wctx, websocket.MessageText, b)
	}
	slots := make(chan struct{}, n)
	reqs := make(chan relayRequest, queue)
	conn.setFilter(func(m Message) bool {
		if m.Type != websocket.MessageText || !bytes.Contains(m.Data, []byte(`"rid"`)) {
			return false
		}
		var r relayRequest
		if json.Unmarshal(m.Data, &r) != nil || r.RID == "" || r.Method == "" {
			return false
		}
		select {
		case reqs <- r:
		default:
			// Every slot busy and the queue full: answer at once
			// rather than stop reading (pings, other messages).
			go send(relayReply{RID: r.RID, Status: http.StatusServiceUnavailable, Type: "text", Content: "device busy"})
		}
		return true
	})
	defer conn.setFilter(nil)
	for {
		select {
		case r := <-reqs:
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
				continue
			case <-conn.Done():
				continue
			}
			go func() {
				defer func() { <-slots }()
				send(serveOne(ctx, handler, r))
			}()
		case <-ctx.Done():
			for range n {
				slots <- struct{}{}
			}
			return ctx.Err()
		case <-conn.Done():
			for range n {
				slots <- struct{}{}
			}
			return conn.Err()
		}
	}
}

// recorder is the http.ResponseWriter of a relayed request: what the
// handler writes becomes the reply.
type recorder struct {
	h      http.Header
	status int
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header { return r.h }

func (r *recorder) WriteHeader(code int) {
	if r.status == 0 && code >= 200 { // a 1xx is informational: not the answer
		r.status = code
	}
}

func (r *recorder) Write(b []byte) (int, error) {
	r.WriteHeader(http.StatusOK)
	return r.body.Write(b)
}

// serveOne runs handler for one relay request and builds its reply.
func serveOne(ctx context.Context, handler http.Handler, r relayRequest) relayReply {
	var body []byte
	if r.Body != nil {
		if r.BodyEncoding == "base64" {
			body, _ = base64.StdEncoding.DecodeString(*r.Body)
		} else {
			body = []byte(*r.Body)
		}
	}
	q := url.Values{}
	for k, raw := range r.Query {
		var one string
		var many []string
		if json.Unmarshal(raw, &one) == nil {
			q.Add(k, one)
		} else if json.Unmarshal(raw, &many) == nil {
			q[k] = append(q[k], many...)
		}
	}
	u := &url.URL{Path: r.Path, RawQuery: q.Encode()}
	req, err := http.NewRequestWithContext(ctx, r.Method, u.String(), bytes.NewReader(body))
	if err != nil {
		return relayReply{RID: r.RID, Status: http.StatusBadRequest, Type: "text", Content: "bad relayed request"}
	}
	req.RequestURI = u.RequestURI()
	for k, v := range r.Headers {
		req.Header.Set(k, v)
	}
	if h := req.Header.Get("Host"); h != "" {
		req.Host = h
	}
	req.ContentLength = int64(len(body))
	rec := &recorder{h: http.Header{}}
	handler.ServeHTTP(rec, req)

	if rec.status == 0 {
		rec.status = http.StatusOK
	}
	out := relayReply{RID: r.RID, Status: rec.status}
	if ct := rec.h.Get("Content-Type"); ct != "" {
		out.Type = ct
	} else {
		out.Type = http.DetectContentType(rec.body.Bytes())
	}
	for k, v := range rec.h {
		if k == "Content-Type" || k == "Content-Length" {
			continue
		}
		if out.Headers == nil {
			out.Headers = map[string]string{}
		}
		out.Headers[k] = strings.Join(v, ", ")
	}
	b := rec.body.Bytes()
	if utf8.Valid(b) {
		out.Content = string(b)
	} else {
		out.Content, out.Encoding = base64.StdEncoding.EncodeToString(b), "base64"
	}
	return out
}
