package router

import (
	"encoding/json"
	"errors"
	"io"
	"mime"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"wsrouter/registry"
)

// The backend API (docs/protocol.md §9): a backend outside the registration
// pushes messages to its members, closes one, and lists them, authorised by
// the registration's host key or the admin token.

// errNoMember is a conn or name that is not connected: 404.
var errNoMember = errors.New("no such member")

// maxReasonLen bounds a close reason set by a backend (a close frame's
// reason must fit in 123 bytes).
const maxReasonLen = 120

// backendTarget is a backend request's registration, after its checks.
type backendTarget struct {
	p   *params
	reg *registry.Registration
}

// backend runs the checks every backend call shares: the id (400), the
// credentials present (400), the registration (404), and the host key or
// admin bearer (403, taking a failed-key token).
func (rt *Router) backend(w http.ResponseWriter, r *http.Request, endpoint string) (*backendTarget, error) {
	if rt.closing.Load() {
		return nil, errShuttingDown
	}
	// /send's body is the message: only the query holds parameters.
	var p *params
	if endpoint == "send" {
		p = &params{r: r, vals: r.URL.Query()}
	} else {
		var err error
		if p, err = readParams(w, r); err != nil {
			return nil, err
		}
	}
	id, err := p.id("id", true)
	if err != nil {
		return nil, err
	}
	bearer := readBearer(r)
	var cred credentials
	if bearer == "" {
		if cred, err = readCredentials(p, needHostKey); err != nil {
			return nil, err
		}
	}
	reg, err := rt.lookup(r.Context(), id)
	if err != nil {
		return nil, err
	}
	if err := rt.auth.backend(r, endpoint, reg, cred, bearer); err != nil {
		return nil, err
	}
	return &backendTarget{p, reg}, nil
}

// selector reads the members a call names: exactly one of conn= and name=
// (and, with allowRole, to=); none means every member when allowNone.
func (t *backendTarget) selector(allowRole, allowNone bool) (registry.Selector, error) {
	var sel registry.Selector
	n := 0
	conn, err := t.p.get("conn")
	if err != nil {
		return sel, err
	}
	if conn != "" {
		if len(conn) != 32 || strings.Trim(conn, "0123456789abcdef") != "" {
			return sel, paramError("malformed conn: 32 lowercase hex digits")
		}
		sel.ID = conn
		n++
	}
	name, err := t.p.name("name")
	if err != nil {
		return sel, err
	}
	if name != "" {
		sel.Name = name
		n++
	}
	if allowRole {
		to, err := t.p.get("to")
		if err != nil {
			return sel, err
		}
		if to != "" {
			if sel.Role, err = roleOf(t.reg.Type, "to", to); err != nil {
				return sel, err
			}
			n++
		}
	}
	switch {
	case n > 1:
		return sel, paramError("give at most one of to, conn and name")
	case n == 0 && !allowNone:
		return sel, paramError("give exactly one of conn and name")
	}
	return sel, nil
}

// closeParams reads DELETE /member's code (4000–4999, default 4002) and
// reason (at most 120 bytes of UTF-8, default "closed by backend").
func (t *backendTarget) closeParams() (code int, reason string, err error) {
	code = codeByBackend
	v, err := t.p.get("code")
	if err != nil {
		return 0, "", err
	}
	if v != "" {
		if code, err = strconv.Atoi(v); err != nil || code < 4000 || code > 4999 {
			return 0, "", paramError("bad code: want 4000 to 4999")
		}
	}
	if reason, err = t.p.get("reason"); err != nil {
		return 0, "", err
	}
	if reason == "" {
		reason = "closed by backend"
	}
	if len(reason) > maxReasonLen || !utf8.ValidString(reason) {
		return 0, "", paramError("bad reason: at most %d bytes of UTF-8", maxReasonLen)
	}
	return code, reason, nil
}

// readMessageBody reads a request body that becomes a message (/send,
// /publish): over -max-message it is a 413.
func (rt *Router) readMessageBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	if r.ContentLength > rt.cfg.MaxMessage {
		return nil, errTooLarge
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, rt.cfg.MaxMessage))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return nil, errTooLarge
		}
		return nil, paramError("request body unreadable")
	}
	return body, nil
}

// roleOf parses a role that registrations of type t have.
func roleOf(t registry.Type, param, s string) (registry.Role, error) {
	switch {
	case t != registry.HostClient && s == "member":
		return registry.RoleMember, nil
	case t == registry.HostClient && (s == "host" || s == "client"):
		role, _ := registry.ParseRole(s)
		return role, nil
	}
	if t != registry.HostClient {
		return 0, paramError("bad %s: a %s has only member", param, t)
	}
	return 0, paramError("bad %s: want host or client", param)
}

// isText reports whether a /send body of content type ct goes out as a text
// message: text/*, application/json or …+json, whatever the parameters.
func isText(ct string) bool {
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil {
		mt = strings.ToLower(strings.TrimSpace(strings.SplitN(ct, ";", 2)[0]))
	}
	return strings.HasPrefix(mt, "text/") || mt == "application/json" || strings.HasSuffix(mt, "+json")
}

// serveSend answers POST /send.
func (rt *Router) serveSend(w http.ResponseWriter, r *http.Request) {
	n, err := rt.send(w, r)
	if err != nil {
		code, _ := status(err)
		rt.metrics.sent(strconv.Itoa(code))
		rt.refuse(w, "send", err)
		return
	}
	rt.metrics.sent("ok")
	writeJSON(w, struct {
		Delivered int `json:"delivered"`
	}{n})
}

func (rt *Router) send(w http.ResponseWriter, r *http.Request) (int, error) {
	t, err := rt.backend(w, r, "send")
	if err != nil {
		return 0, err
	}
	sel, err := t.selector(true, true)
	if err != nil {
		return 0, err
	}
	body, err := rt.readMessageBody(w, r)
	if err != nil {
		return 0, err
	}
	msg := registry.Message{Binary: !isText(r.Header.Get("Content-Type")), Data: body}
	if !msg.Binary && !utf8.Valid(body) {
		return 0, paramError("a text body must be UTF-8")
	}
	n := t.reg.SendTo(sel, msg)
	if rt.cfg.Cluster != nil && (n == 0 || sel.ID == "") {
		// A connection id is on one node; a name may be on several.
		more, err := rt.clusterSend(r.Context(), t.reg, sel, msg)
		if err != nil && n == 0 {
			return 0, err
		}
		n += more
	}
	if n == 0 && (sel.ID != "" || sel.Name != "") {
		return 0, errNoMember
	}
	rt.metrics.messagesOut(msg, n)
	return n, nil
}

// serveCloseMember answers DELETE /member.
func (rt *Router) serveCloseMember(w http.ResponseWriter, r *http.Request) {
	if err := rt.closeMember(w, r); err != nil {
		rt.refuse(w, "member", err)
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (rt *Router) closeMember(w http.ResponseWriter, r *http.Request) error {
	t, err := rt.backend(w, r, "member")
	if err != nil {
		return err
	}
	sel, err := t.selector(false, false)
	if err != nil {
		return err
	}
	code, reason, err := t.closeParams()
	if err != nil {
		return err
	}
	m, _, ok := t.reg.Lookup(sel)
	if !ok {
		if rt.cfg.Cluster != nil {
			if closed, err := rt.clusterClose(r.Context(), t.reg, sel, code, reason); closed || err != nil {
				return err
			}
		}
		return errNoMember
	}
	m.Close(code, reason)
	return nil
}

// memberJSON is one member in GET /members.
type memberJSON struct {
	Conn          string    `json:"conn"`
	Role          string    `json:"role"`
	Name          string    `json:"name,omitempty"`
	RemoteAddr    string    `json:"remote_addr"`
	ConnectedAt   time.Time `json:"connected_at"`
	Subscriptions []string  `json:"subscriptions,omitempty"`
}

// memberOf is a member as /members and the info stream show it.
func memberOf(mi registry.MemberInfo) memberJSON {
	mj := memberJSON{Conn: mi.Member.ID(), Role: mi.Role.String(), Name: mi.Name, Subscriptions: mi.Subscriptions}
	if c, ok := mi.Member.(*conn); ok {
		mj.RemoteAddr, mj.ConnectedAt = c.remoteAddr, c.connectedAt
	}
	return mj
}

// membersJSON lists members as /members and the info stream's snapshots
// show them: oldest first, so that a listing reads as the room filled.
func membersJSON(ms []registry.MemberInfo) []memberJSON {
	out := make([]memberJSON, 0, len(ms))
	for _, mi := range ms {
		out = append(out, memberOf(mi))
	}
	slices.SortFunc(out, func(a, b memberJSON) int { return a.ConnectedAt.Compare(b.ConnectedAt) })
	return out
}

// serveMembers answers GET /members.
func (rt *Router) serveMembers(w http.ResponseWriter, r *http.Request) {
	t, err := rt.backend(w, r, "members")
	if err != nil {
		rt.refuse(w, "members", err)
		return
	}
	ms := membersJSON(t.reg.Members())
	if rt.cfg.Cluster != nil {
		ms = rt.clusterMembers(r.Context(), t.reg, ms, nil)
	}
	writeJSON(w, struct {
		Members []memberJSON `json:"members"`
	}{ms})
}

// writeJSON answers 200 with v as JSON.
func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	json.NewEncoder(w).Encode(v)
}
