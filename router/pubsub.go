package router

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"
	"unicode/utf8"

	"wsrouter/registry"
)

// Pub/sub registrations (docs/protocol.md §13): members speak JSON actions —
// subscribe, unsubscribe, unsubscribe:all, publish — and a publish reaches
// the members subscribed to its event, as an envelope built once and shared
// by every receiver. POST /publish publishes over HTTP.

// action is a member's pub/sub frame.
type action struct {
	Action string          `json:"action"`
	Event  string          `json:"event"`
	Data   json.RawMessage `json:"data"`
}

// parseAction reads a member's frame as an action, checked: a known action,
// and an event that is a valid subscription (subscribe, unsubscribe) or a
// literal event (publish). The error says what is wrong, for the member.
func parseAction(data []byte) (action, error) {
	var a action
	if err := json.Unmarshal(data, &a); err != nil {
		return a, errors.New("not a JSON action object")
	}
	switch a.Action {
	case "subscribe", "unsubscribe":
		if !registry.ValidPattern(a.Event) {
			return a, fmt.Errorf("bad event %q: dot-separated tokens of A-Z a-z 0-9 _ -, * for one token, a final > for the rest, 1 to 128 bytes", clip(a.Event))
		}
	case "publish":
		if !registry.ValidEvent(a.Event) {
			return a, fmt.Errorf("bad event %q: dot-separated tokens of A-Z a-z 0-9 _ -, 1 to 128 bytes, no wildcards", clip(a.Event))
		}
	case "unsubscribe:all":
	case "":
		return a, errors.New("missing action")
	default:
		return a, fmt.Errorf("unknown action %q: want subscribe, unsubscribe, unsubscribe:all or publish", clip(a.Action))
	}
	return a, nil
}

// clip shortens what a member sent before it is quoted back to it.
func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}

// envelope is what subscribers receive for a publish of event with data
// (nil: null), stamped now.
func envelope(event string, data json.RawMessage, now time.Time) []byte {
	b := make([]byte, 0, len(event)+len(data)+96)
	b = append(b, `{"action":"publish","event":"`...)
	b = append(b, event...) // its characters need no escaping
	b = append(b, `","data":`...)
	if len(data) == 0 {
		b = append(b, "null"...)
	} else {
		b = append(b, data...)
	}
	b = append(b, `,"created_at":"`...)
	b = now.UTC().AppendFormat(b, time.RFC3339Nano)
	return append(b, `"}`...)
}

// errorReply is the frame that tells a member its action failed; the
// connection stays open.
func errorReply(msg string) registry.Message {
	b, _ := json.Marshal(struct {
		Action string `json:"action"`
		Error  string `json:"error"`
	}{"error", msg})
	return registry.Message{Data: b}
}

// pubsubFrame handles a frame of a pub/sub member and returns the number of
// members a publish reached (0 for anything else).
func (c *conn) pubsubFrame(msg registry.Message) int {
	if msg.Binary {
		c.Send(errorReply("binary frames are not actions: send JSON text"))
		return 0
	}
	a, err := parseAction(msg.Data)
	if err != nil {
		c.Send(errorReply(err.Error()))
		return 0
	}
	switch a.Action {
	case "subscribe":
		if _, err := c.reg.Subscribe(c, a.Event); errors.Is(err, registry.ErrTooManySubscriptions) {
			c.Send(errorReply(fmt.Sprintf("too many subscriptions: at most %d", c.rt.cfg.Registry.MaxSubscriptions)))
		}
	case "unsubscribe":
		c.reg.Unsubscribe(c, a.Event)
	case "unsubscribe:all":
		c.reg.UnsubscribeAll(c)
	case "publish":
		out := registry.Message{Data: envelope(a.Event, a.Data, time.Now()), Event: a.Event}
		n := c.reg.Publish(c, c.role, out)
		c.rt.metrics.messagesOut(out, n)
		return n
	}
	return 0
}

// servePublish answers POST /publish: an event published over HTTP with the
// registration's key or a member token.
func (rt *Router) servePublish(w http.ResponseWriter, r *http.Request) {
	n, err := rt.publish(w, r)
	if err != nil {
		rt.refuse(w, "publish", err)
		return
	}
	writeJSON(w, struct {
		Delivered int `json:"delivered"`
	}{n})
}

func (rt *Router) publish(w http.ResponseWriter, r *http.Request) (int, error) {
	if rt.closing.Load() {
		return 0, errShuttingDown
	}
	// The body is the event: only the query holds parameters.
	p := &params{r: r, vals: r.URL.Query()}
	id, err := p.id("id", true)
	if err != nil {
		return 0, err
	}
	cred, err := readCredentials(p, needKey|orToken)
	if err != nil {
		return 0, err
	}
	reg, err := rt.lookup(r.Context(), id)
	if err != nil {
		return 0, err
	}
	if cred.token != "" {
		_, _, err = rt.auth.token(r, "publish", reg, cred.token, registry.RoleMember)
	} else {
		err = rt.auth.member(r, "publish", reg, cred)
	}
	if err != nil {
		return 0, err
	}
	// The type is told only to the key's holder, as on /relay.
	if reg.Type != registry.PubSub {
		return 0, paramError("registration %s is not pubsub", reg.ID)
	}
	body, err := rt.readMessageBody(w, r)
	if err != nil {
		return 0, err
	}
	// Subscribers are often browsers, which fail their whole connection
	// on a text message that is not UTF-8: such a body never goes out.
	if !utf8.Valid(body) {
		return 0, paramError("body: not UTF-8")
	}
	var ev struct {
		Event string          `json:"event"`
		Data  json.RawMessage `json:"data"`
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(&ev); err != nil {
		return 0, paramError(`body: want one JSON object {"event":E,"data":…}`)
	}
	if _, err := dec.Token(); err != io.EOF {
		return 0, paramError(`body: want one JSON object {"event":E,"data":…}, nothing after it`)
	}
	if !registry.ValidEvent(ev.Event) {
		return 0, paramError("bad event: dot-separated tokens of A-Z a-z 0-9 _ -, 1 to 128 bytes, no wildcards")
	}
	msg := registry.Message{Data: envelope(ev.Event, ev.Data, time.Now()), Event: ev.Event}
	n := reg.Publish(nil, registry.RoleMember, msg)
	rt.metrics.messagesOut(msg, n)
	return n, nil
}
