package router

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"testing"

	"wsrouter/registry"
)

var idPattern = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)

func FuzzValidID(f *testing.F) {
	for _, s := range []string{"", "a", "0123456789abcdef0123456789abcdef", "a/b", "é", strings.Repeat("x", 65), "a b", "..", "-_."} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if got, want := validID(s), idPattern.MatchString(s); got != want {
			t.Fatalf("validID(%q) = %v, want %v", s, got, want)
		}
	})
}

// FuzzParams feeds arbitrary query strings and headers through the parameter
// parsing of every endpoint. Whatever comes in, the answer is a value that
// obeys the rules or a 400 — never a panic, never another status.
func FuzzParams(f *testing.F) {
	f.Add("key=a&host_key=b&reg_type=lobby&id_req=x", "")
	f.Add("id=abc&key=k&sock_type=host", "hdr-key")
	f.Add("key=a&key=b", "")
	f.Add("id=%zz&key=", "")
	f.Add("reg_type=pubsub&sock_type=admin", "\x00")
	f.Add("key="+strings.Repeat("k", 73), strings.Repeat("h", 80))
	f.Fuzz(func(t *testing.T, query, header string) {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.URL.RawQuery = query
		r.Header.Set("X-Key", header)
		p, err := readParams(httptest.NewRecorder(), r)
		if err != nil {
			if code, _ := status(err); code != http.StatusBadRequest {
				t.Fatalf("readParams: status %d, want 400", code)
			}
			return
		}
		check := func(what string, err error) {
			var pe *errParam
			if err != nil && !errors.As(err, &pe) {
				t.Fatalf("%s: %v is not a parameter error", what, err)
			}
		}
		if id, err := p.id("id", true); err == nil && !idPattern.MatchString(id) {
			t.Fatalf("id %q accepted", id)
		} else {
			check("id", err)
		}
		if id, err := p.id("id_req", false); err == nil && id != "" && !idPattern.MatchString(id) {
			t.Fatalf("id_req %q accepted", id)
		} else {
			check("id_req", err)
		}
		if k, err := p.key("key", "X-Key"); err == nil && (len(k) == 0 || len(k) > registry.MaxKeyLen) {
			t.Fatalf("key of %d bytes accepted", len(k))
		} else {
			check("key", err)
		}
		if typ, err := p.regType(); err == nil && typ != registry.Lobby && typ != registry.HostClient && typ != registry.PubSub {
			t.Fatalf("reg_type %v accepted", typ)
		} else {
			check("reg_type", err)
		}
		if role, err := p.role(registry.HostClient); err == nil && role != registry.RoleHost && role != registry.RoleClient {
			t.Fatalf("sock_type %v accepted", role)
		} else {
			check("sock_type", err)
		}
	})
}

// FuzzBackendParams: /send's and /member's parameters parse into a
// selector naming at most one thing, a valid close code and reason, or a
// 400 — never a panic.
func FuzzBackendParams(f *testing.F) {
	f.Add("to=host", false)
	f.Add("conn=0123456789abcdef0123456789abcdef&code=4100&reason=bye", true)
	f.Add("name=dev%40home%3A1&to=client", false)
	f.Add("code=4000x&reason=%ff", true)
	f.Add("to=member&to=member", true)
	f.Fuzz(func(t *testing.T, raw string, lobby bool) {
		q, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		typ := registry.HostClient
		if lobby {
			typ = registry.Lobby
		}
		r := httptest.NewRequest("POST", "/send", nil)
		reg := &registry.Registration{Record: registry.Record{ID: "x", Type: typ}}
		bt := &backendTarget{p: &params{r: r, vals: q}, reg: reg}
		for _, allow := range []bool{true, false} {
			sel, err := bt.selector(allow, allow)
			if err != nil {
				if code, _ := status(err); code != 400 {
					t.Fatalf("selector error %v is a %d, want 400", err, code)
				}
				continue
			}
			n := 0
			if sel.ID != "" {
				n++
				if len(sel.ID) != 32 {
					t.Fatalf("conn %q accepted", sel.ID)
				}
			}
			if sel.Name != "" {
				n++
				if !validName(sel.Name) {
					t.Fatalf("name %q accepted", sel.Name)
				}
			}
			if sel.Role != 0 {
				n++
				if !allow || (typ == registry.Lobby) != (sel.Role == registry.RoleMember) {
					t.Fatalf("role %v accepted for %v (roles allowed: %v)", sel.Role, typ, allow)
				}
			}
			if n > 1 || (n == 0 && !allow) {
				t.Fatalf("selector %+v from %q", sel, raw)
			}
		}
		code, reason, err := bt.closeParams()
		if err == nil && (code < 4000 || code > 4999 || len(reason) > maxReasonLen || reason == "") {
			t.Fatalf("close %d %q accepted from %q", code, reason, raw)
		}
	})
}
