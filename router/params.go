package router

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"wsrouter/registry"
)

// maxFormBytes bounds a POSTed form: the parameters are an id and two keys.
const maxFormBytes = 16 << 10

// maxIDLen is the longest id a client may ask for or present.
const maxIDLen = 64

// errParam is a client's mistake in the request's parameters: 400.
type errParam struct{ msg string }

func (e *errParam) Error() string { return e.msg }

func paramError(format string, args ...any) error {
	return &errParam{fmt.Sprintf(format, args...)}
}

// validID reports whether s is 1–64 of A-Z a-z 0-9 . _ - (docs/protocol.md §3). Minted
// ids (32 lowercase hex) fit too.
func validID(s string) bool {
	if len(s) == 0 || len(s) > maxIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9',
			c == '.', c == '_', c == '-':
		default:
			return false
		}
	}
	return true
}

// validKey reports whether s is an acceptable key: 1 to 72 bytes. Any bytes
// are allowed; bcrypt would silently ignore those past 72, so longer keys are
// refused rather than truncated.
func validKey(s string) bool {
	return len(s) >= 1 && len(s) <= registry.MaxKeyLen
}

// params reads request parameters from the query string and, for a POST or
// DELETE with a form body, from the form.
type params struct {
	r    *http.Request
	vals url.Values
}

// readParams parses the request's parameters: the query string and, for a
// POST or DELETE, a urlencoded form body (net/http parses DELETE bodies
// only for POST, PUT and PATCH, so DELETE is read here). A form body over
// maxFormBytes is a 413, a malformed one a 400.
func readParams(w http.ResponseWriter, r *http.Request) (*params, error) {
	tooBig := func(err error) bool {
		var mb *http.MaxBytesError
		return errors.As(err, &mb)
	}
	if r.Method == http.MethodPost || r.Method == http.MethodDelete {
		r.Body = http.MaxBytesReader(w, r.Body, maxFormBytes)
	}
	if err := r.ParseForm(); err != nil {
		if tooBig(err) {
			return nil, errTooLarge
		}
		return nil, paramError("malformed parameters")
	}
	if r.Method == http.MethodDelete && isForm(r) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			if tooBig(err) {
				return nil, errTooLarge
			}
			return nil, paramError("malformed parameters")
		}
		body, err := url.ParseQuery(string(b))
		if err != nil {
			return nil, paramError("malformed parameters")
		}
		for k, vs := range body {
			r.Form[k] = append(r.Form[k], vs...)
		}
	}
	return &params{r: r, vals: r.Form}, nil
}

func isForm(r *http.Request) bool {
	ct, _, _ := strings.Cut(r.Header.Get("Content-Type"), ";")
	return strings.EqualFold(strings.TrimSpace(ct), "application/x-www-form-urlencoded")
}

// get returns the single value of name, or "" when absent. A repeated
// parameter is refused: with two keys, which one would be meant?
func (p *params) get(name string) (string, error) {
	vs := p.vals[name]
	switch len(vs) {
	case 0:
		return "", nil
	case 1:
		return vs[0], nil
	}
	return "", paramError("parameter %s given more than once", name)
}

// id returns the required id parameter (name is "id" or "id_req").
func (p *params) id(name string, required bool) (string, error) {
	v, err := p.get(name)
	if err != nil {
		return "", err
	}
	if v == "" && !required {
		return "", nil
	}
	if !validID(v) {
		if v == "" {
			return "", paramError("missing %s", name)
		}
		return "", paramError("malformed %s: 1 to 64 of A-Z a-z 0-9 . _ -", name)
	}
	return v, nil
}

// key returns a required credential from the parameter name or, failing that,
// the header. The value is never put in an error.
func (p *params) key(name, header string) (string, error) {
	v, err := p.credential(name, header)
	if err != nil {
		return "", err
	}
	if v == "" {
		return "", paramError("missing %s", name)
	}
	if !validKey(v) {
		return "", paramError("%s longer than %d bytes", name, registry.MaxKeyLen)
	}
	return v, nil
}

// token returns the token parameter or, failing that, the X-Token header;
// "" when neither is given. Its length is the token checker's business: an
// oversized token is refused as any bad token is (403).
func (p *params) token() (string, error) {
	return p.credential("token", "X-Token")
}

// credential returns the parameter name or, failing that, the header; ""
// when neither is given.
func (p *params) credential(name, header string) (string, error) {
	v, err := p.get(name)
	if err != nil || v != "" {
		return v, err
	}
	hv := p.r.Header.Values(header)
	if len(hv) > 1 {
		return "", paramError("header %s given more than once", header)
	}
	if len(hv) == 1 {
		v = hv[0]
	}
	return v, nil
}

// regType returns the required reg_type.
func (p *params) regType() (registry.Type, error) {
	v, err := p.get("reg_type")
	if err != nil {
		return 0, err
	}
	if v == "" {
		return 0, paramError("missing reg_type")
	}
	t, ok := registry.ParseType(v)
	if !ok {
		return 0, paramError("bad reg_type: want hostclient, lobby or pubsub")
	}
	return t, nil
}

// maxNameLen is the longest member name.
const maxNameLen = 64

// validName reports whether s is 1–64 of A-Z a-z 0-9 . _ - @ : (a member
// name, docs/protocol.md §9).
func validName(s string) bool {
	if len(s) == 0 || len(s) > maxNameLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9',
			c == '.', c == '_', c == '-', c == '@', c == ':':
		default:
			return false
		}
	}
	return true
}

// name returns the optional member name parameter ("" when absent).
func (p *params) name(param string) (string, error) {
	v, err := p.get(param)
	if err != nil || v == "" {
		return "", err
	}
	if !validName(v) {
		return "", paramError("malformed %s: 1 to 64 of A-Z a-z 0-9 . _ - @ :", param)
	}
	return v, nil
}

// role returns the member's role in a registration of type t: sock_type is
// required for hostclient and ignored for a lobby.
func (p *params) role(t registry.Type) (registry.Role, error) {
	if t != registry.HostClient {
		return registry.RoleMember, nil
	}
	v, err := p.get("sock_type")
	if err != nil {
		return 0, err
	}
	if v == "" {
		return 0, paramError("missing sock_type")
	}
	role, ok := registry.ParseRole(v)
	if !ok {
		return 0, paramError("bad sock_type: want host or client")
	}
	return role, nil
}
