package relay

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"

	"wsrouter/registry"
	"wsrouter/registry/cluster"
)

// A relay request between the nodes of a cluster: the node the caller
// reached reads and checks the request, and the node with a host makes the
// exchange with its device, as it would for a caller of its own.

// Exchange is a relay request on its way to another node.
type Exchange struct {
	Method string      `json:"method"`
	Path   string      `json:"path"`
	Query  url.Values  `json:"query,omitempty"`
	Header http.Header `json:"header,omitempty"`
	Body   []byte      `json:"-"`
	Client string      `json:"client"`
}

// Answer is a device's answer, or a relay error, on its way back.
type Answer struct {
	Status int         `json:"status"`
	Header http.Header `json:"header,omitempty"`
	Body   []byte      `json:"-"`
	// Error names the relay error the exchange ended with, if it did.
	Error string `json:"error,omitempty"`
}

// errorNames name the errors of an exchange that cross between nodes.
var errorNames = map[string]error{
	"no_host":   ErrNoHost,
	"timeout":   ErrTimeout,
	"host_gone": ErrHostGone,
	"bad_reply": ErrBadReply,
	"pending":   ErrTooManyPending,
	"host_busy": ErrHostBusy,
	"memory":    ErrMemory,
}

// ServeRemote makes the exchange x with host, a host of reg on this node,
// for a caller on another node. A relay error comes back in the Answer.
func (p *Proxy) ServeRemote(ctx context.Context, reg *registry.Registration, host Host, x *Exchange) *Answer {
	p.init()
	t := &Target{Reg: reg, Host: host, Path: x.Path, Query: x.Query, Client: x.Client}
	resp, err := p.exchange(ctx, t, x.Method, x.Header, x.Body)
	if err != nil {
		for name, e := range errorNames {
			if errors.Is(err, e) {
				return &Answer{Error: name}
			}
		}
		return &Answer{Error: "internal"}
	}
	return &Answer{Status: resp.status, Header: resp.header, Body: resp.body}
}

// Err returns the relay error an Answer carries, or nil.
func (a *Answer) Err() error {
	if a.Error == "" {
		return nil
	}
	if err, ok := errorNames[a.Error]; ok {
		return err
	}
	// Something went wrong on the host's node: the gateway's fault, 502.
	return fmt.Errorf("%w: on another node: %s", ErrBadReply, a.Error)
}

// On the wire between nodes, an Exchange or an Answer is its JSON without
// the body, and then the body's raw bytes (cluster.Pack): base64 in JSON
// would make a body a third larger than a NATS message may be.

// Encode returns x as it crosses to another node.
func (x *Exchange) Encode() ([]byte, error) { return cluster.Pack(x, x.Body) }

// Encode returns a as it crosses back.
func (a *Answer) Encode() ([]byte, error) { return cluster.Pack(a, a.Body) }

// DecodeExchange reads what Exchange.Encode wrote.
func DecodeExchange(b []byte) (*Exchange, error) {
	var x Exchange
	body, err := cluster.Unpack(b, &x)
	x.Body = body
	return &x, err
}

// DecodeAnswer reads what Answer.Encode wrote.
func DecodeAnswer(b []byte) (*Answer, error) {
	var a Answer
	body, err := cluster.Unpack(b, &a)
	a.Body = body
	return &a, err
}
