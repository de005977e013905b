package relay

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/textproto"
	"net/url"
	"strings"
	"unicode/utf8"
)

// Request is the text frame a relayed HTTP request becomes
// (docs/protocol.md §7.1): what a device receives.
type Request struct {
	RID          string            `json:"rid"`
	Method       string            `json:"method"`
	Path         string            `json:"path"`
	Query        map[string]any    `json:"query,omitempty"`
	Headers      map[string]string `json:"headers,omitempty"`
	Body         *string           `json:"body,omitempty"`
	BodyEncoding string            `json:"body_encoding,omitempty"`
}

// hopHeaders are the hop-by-hop headers of RFC 9110 §7.6.1 (plus the
// de-facto Proxy-Connection and Keep-Alive): they concern one connection and
// never cross the relay, either way.
var hopHeaders = map[string]bool{
	"Connection": true, "Proxy-Connection": true, "Keep-Alive": true, "Proxy-Authenticate": true,
	"Proxy-Authorization": true, "Te": true, "Trailer": true, "Transfer-Encoding": true, "Upgrade": true,
}

// dropRequestHeaders never reach the device: credentials of the router
// (X-Key, X-Host-Key, X-Token) and the browser's cookies for the router's origin.
var dropRequestHeaders = map[string]bool{"Cookie": true, "X-Key": true, "X-Host-Key": true, "X-Token": true}

// replyHeaders are the headers a device's reply may set (docs/protocol.md §7): those
// that describe the representation and nothing else. Everything else is
// dropped — CORS, HSTS, CSP, Service-Worker-Allowed, Clear-Site-Data,
// Set-Cookie, WWW-Authenticate, hop-by-hop headers — because a device's
// answer is served from the router's origin, which other registrations'
// pages share: one tenant's device must not be able to change how browsers
// treat that origin. Custom X-… headers pass except the router's own.
// Content-Type stands only when the reply has no usable type.
var replyHeaders = map[string]bool{
	"Content-Type": true, "Content-Language": true, "Content-Disposition": true,
	"Cache-Control": true, "Etag": true, "Last-Modified": true, "Location": true, "Vary": true,
}

// routerHeaders are the router's own X- headers, which a reply never sets.
var routerHeaders = map[string]bool{
	"X-Connection-Id": true, "X-Key": true, "X-Host-Key": true, "X-Token": true,
	"X-Forwarded-For": true, "X-Forwarded-Host": true, "X-Forwarded-Proto": true, "X-Real-Ip": true,
}

// proxyControlPrefixes are X- headers that a reverse proxy in front acts on
// rather than passing (nginx's X-Accel-Redirect serves an internal location,
// X-Accel-Expires overrides Cache-Control in its cache; X-Sendfile and
// LiteSpeed's likewise): a device must not steer the proxy.
var proxyControlPrefixes = []string{"X-Accel-", "X-Sendfile", "X-Litespeed-", "X-Lighttpd-"}

// Sandbox is the Content-Security-Policy of every relay answer: a page
// from a device runs scripts in an opaque origin, so it can reach neither
// the router's origin (other registrations' pages, their keys in URLs) nor
// its storage.
const Sandbox = "sandbox allow-scripts allow-forms allow-popups"

// replyHeaderAllowed reports whether a reply with status may set header k
// (canonical).
func replyHeaderAllowed(k string, status int) bool {
	switch {
	case k == "Location":
		return status >= 300 && status < 400
	case replyHeaders[k]:
		return true
	}
	if len(k) <= 2 || k[:2] != "X-" || routerHeaders[k] {
		return false
	}
	for _, p := range proxyControlPrefixes {
		if strings.HasPrefix(k, p) {
			return false
		}
	}
	return true
}

// cacheControl keeps the directives a device may use (private, no-store,
// no-cache, max-age=N) and makes the answer private unless it is no-store:
// a shared cache in front must never serve one caller's keyed answer to
// another.
func cacheControl(vals []string) string {
	var keep []string
	noStore, private := false, false
	for _, v := range vals {
		for d := range strings.SplitSeq(v, ",") {
			d = strings.ToLower(strings.TrimSpace(d))
			name, arg, hasArg := strings.Cut(d, "=")
			switch {
			case name == "no-store" && !hasArg:
				noStore = true
			case name == "private" && !hasArg:
				private = true
			case name == "no-cache" && !hasArg:
			case name == "max-age" && hasArg && arg != "" && strings.Trim(arg, "0123456789") == "":
			default:
				continue
			}
			keep = append(keep, d)
		}
	}
	if !noStore && !private {
		keep = append([]string{"private"}, keep...)
	}
	return strings.Join(keep, ", ")
}

// encodeRequest turns an HTTP request (its body already read) into the
// frame for the device. path is the part after /relay/{id}; query has the
// key already removed.
//
// The frame is never much larger than the request: HTML characters are not
// escaped (json.Marshal would turn each <, > and & into six bytes), and a
// body whose JSON string would be larger than its base64 (control
// characters cost six bytes each) is sent as base64, as a body that is not
// UTF-8 is. frameBound gives the bound.
func encodeRequest(rid, method, path string, query url.Values, h http.Header, body []byte) ([]byte, error) {
	f := Request{RID: rid, Method: method, Path: path}
	if len(query) > 0 {
		f.Query = make(map[string]any, len(query))
		for k, vs := range query {
			if len(vs) == 1 {
				f.Query[k] = vs[0]
			} else {
				f.Query[k] = vs
			}
		}
	}
	if hs := endToEnd(h, dropRequestHeaders); len(hs) > 0 {
		f.Headers = make(map[string]string, len(hs))
		for k, vs := range hs {
			f.Headers[k] = strings.Join(vs, ", ")
		}
	}
	if len(body) > 0 {
		var s string
		if utf8.Valid(body) && jsonStringLen(body) <= base64.StdEncoding.EncodedLen(len(body)) {
			s = string(body)
		} else {
			s = base64.StdEncoding.EncodeToString(body)
			f.BodyEncoding = "base64"
		}
		f.Body = &s
	}
	var buf bytes.Buffer
	buf.Grow(frameSize(&f))
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(f); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// jsonStringLen is the length of b (valid UTF-8) as the contents of a JSON
// string, as encoding/json writes it without HTML escaping.
func jsonStringLen(b []byte) int {
	n := len(b)
	for i := 0; i < len(b); i++ {
		switch c := b[i]; {
		case c == '"' || c == '\\' || c == '\n' || c == '\r' || c == '\t':
			n++ // a two-byte escape
		case c < 0x20:
			n += 5 // \u00XX
		case c == 0xe2 && i+2 < len(b) && b[i+1] == 0x80 && (b[i+2] == 0xa8 || b[i+2] == 0xa9):
			n += 3 // U+2028 and U+2029 are always escaped
		}
	}
	return n
}

// frameSize estimates the encoded size of f, to size the buffer once.
func frameSize(f *Request) int {
	n := 128 + len(f.Path) + len(f.Method)
	for k, v := range f.Headers {
		n += len(k) + len(v) + 8
	}
	if f.Body != nil {
		n += len(*f.Body)
	}
	return n
}

// frameBound bounds the frame of r with a body of up to maxBody bytes:
// the body at 4/3 (base64, or a string no longer than that), and everything
// else of the request at six bytes per byte (the worst escape).
func frameBound(r *http.Request, maxBody int64) int64 {
	n := int64(len(r.Method)+len(r.URL.Path)+len(r.URL.RawQuery)) + 256
	for k, vs := range r.Header {
		n += int64(len(k)) + 4
		for _, v := range vs {
			n += int64(len(v)) + 2
		}
	}
	return 6*n + (maxBody+2)/3*4
}

// endToEnd returns the headers of h that may cross the relay: in canonical
// form, without hop-by-hop headers, those the Connection header names, and
// drop.
func endToEnd(h http.Header, drop map[string]bool) http.Header {
	var named map[string]bool // headers the Connection header names
	for _, v := range h.Values("Connection") {
		for name := range strings.SplitSeq(v, ",") {
			if name = strings.TrimSpace(name); name != "" {
				if named == nil {
					named = map[string]bool{}
				}
				named[textproto.CanonicalMIMEHeaderKey(name)] = true
			}
		}
	}
	out := make(http.Header, len(h))
	for k, vs := range h {
		ck := textproto.CanonicalMIMEHeaderKey(k)
		if hopHeaders[ck] || drop[ck] || named[ck] || len(vs) == 0 {
			continue
		}
		out[ck] = append(out[ck], vs...)
	}
	return out
}

// response is a device's answer mapped to HTTP.
type response struct {
	status int
	header http.Header
	body   []byte
}

// ErrBadReply means the device answered with a frame whose fields cannot be
// used: the caller gets 502.
var ErrBadReply = errors.New("unusable relay reply")

// typeNames maps the reply's short type names to Content-Types (docs/protocol.md §7).
var typeNames = map[string]string{
	"html": "text/html; charset=utf-8",
	"text": "text/plain; charset=utf-8",
	"json": "application/json",
	"xml":  "application/xml",
	"css":  "text/css; charset=utf-8",
	"js":   "text/javascript; charset=utf-8",
	"raw":  "application/octet-stream",
}

// replyReserved are the keys of a reply that are never part of a legacy
// body.
var replyReserved = map[string]bool{"rid": true, "status": true, "type": true, "headers": true, "encoding": true}

// replyFrame is a reply's fields of fixed meaning, kept raw: each is read
// by its own rule below, and a missing one differs from a null one.
type replyFrame struct {
	Status   json.RawMessage `json:"status"`
	Type     json.RawMessage `json:"type"`
	Content  json.RawMessage `json:"content"`
	Encoding json.RawMessage `json:"encoding"`
	Headers  json.RawMessage `json:"headers"`
}

// parseReply maps a device's reply frame (a JSON object, as replyRID
// found) to an HTTP response (docs/protocol.md §7). maxBody bounds the decoded body.
func parseReply(data []byte, maxBody int64) (*response, error) {
	var f replyFrame
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadReply, err)
	}
	resp := &response{status: http.StatusOK, header: http.Header{}}

	if raw := bytes.TrimSpace(f.Status); len(raw) > 0 {
		// Only a JSON number counts: json.Number would also take "404".
		if raw[0] != '"' {
			if v, err := json.Number(raw).Int64(); err == nil && v >= 100 && v <= 599 {
				if v < 200 {
					// A 1xx cannot be the final status of an HTTP
					// response, so the reply is unusable.
					return nil, fmt.Errorf("%w: status %d", ErrBadReply, v)
				}
				resp.status = int(v)
			}
		}
	}

	var encoding string
	json.Unmarshal(f.Encoding, &encoding) // absent or not a string: none

	// The body: content as a string (maybe base64), content as a JSON
	// value, or the legacy form of every other key.
	isJSON := false
	if raw := f.Content; raw != nil {
		var s string
		if err := json.Unmarshal(raw, &s); err == nil {
			if encoding == "base64" {
				b, err := decodeBase64(s)
				if err != nil {
					return nil, fmt.Errorf("%w: content is not base64", ErrBadReply)
				}
				resp.body = b
			} else {
				resp.body = []byte(s)
			}
		} else {
			resp.body = bytes.TrimSpace(raw)
			isJSON = true
		}
	} else {
		var legacy map[string]json.RawMessage
		if err := json.Unmarshal(data, &legacy); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrBadReply, err)
		}
		for k := range legacy {
			// Keys match as encoding/json matches them above: ignoring
			// case, so "Status" is the status, not a legacy field.
			if replyReserved[strings.ToLower(k)] {
				delete(legacy, k)
			}
		}
		b, err := json.Marshal(legacy)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrBadReply, err)
		}
		resp.body = b
		isJSON = true
	}
	if int64(len(resp.body)) > maxBody {
		return nil, fmt.Errorf("%w: body of %d bytes over %d", ErrBadReply, len(resp.body), maxBody)
	}

	if f.Headers != nil {
		if err := copyReplyHeaders(resp.header, f.Headers, resp.status); err != nil {
			return nil, err
		}
	}
	resp.header.Set("Cache-Control", cacheControl(resp.header.Values("Cache-Control")))
	resp.header.Set("Content-Security-Policy", Sandbox)

	var typ string
	json.Unmarshal(f.Type, &typ) // absent or not a string: no type
	switch ct, known := typeNames[typ]; {
	case known:
		resp.header.Set("Content-Type", ct)
	case typ == "image":
		resp.header.Set("Content-Type", http.DetectContentType(resp.body))
	case strings.Contains(typ, "/") && validHeaderValue(typ):
		resp.header.Set("Content-Type", typ)
	case resp.header.Get("Content-Type") != "":
		// No usable type: the reply's own Content-Type header stands.
	case isJSON:
		resp.header.Set("Content-Type", "application/json")
	default:
		resp.header.Set("Content-Type", "text/plain; charset=utf-8")
	}
	return resp, nil
}

func decodeBase64(s string) ([]byte, error) {
	if b, err := base64.StdEncoding.DecodeString(s); err == nil {
		return b, nil
	}
	return base64.RawStdEncoding.DecodeString(s)
}

// copyReplyHeaders copies the allowed headers of a reply's headers object
// into h: each value a string or an array of strings. Anything not allowed
// for a reply with status, or not a valid header field, is dropped.
func copyReplyHeaders(h http.Header, raw json.RawMessage, status int) error {
	var hs map[string]json.RawMessage
	if err := json.Unmarshal(raw, &hs); err != nil {
		return fmt.Errorf("%w: headers is not an object", ErrBadReply)
	}
	for k, v := range hs {
		if !validHeaderName(k) {
			continue
		}
		k = textproto.CanonicalMIMEHeaderKey(k)
		if !replyHeaderAllowed(k, status) {
			continue
		}
		var one string
		var many []string
		switch {
		case json.Unmarshal(v, &one) == nil:
			many = []string{one}
		case json.Unmarshal(v, &many) == nil:
		default:
			continue
		}
		for _, s := range many {
			if validHeaderValue(s) {
				h.Add(k, s)
			}
		}
	}
	return nil
}

func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`"(),/:;<=>?@[\]{}`, c) >= 0 {
			return false
		}
	}
	return true
}

func validHeaderValue(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < ' ' && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

// replyRID recognises a host text frame as a relay reply candidate: a JSON
// object with a string rid (its key matched, like every key of a reply, as
// encoding/json does: ignoring case). ok is false for anything else, which is then
// forwarded to clients as usual. Only rid is decoded here, on the host's
// reader; the caller parses the rest.
func replyRID(data []byte) (rid string, ok bool) {
	// Cheap refusal first: most host frames are not replies.
	trimmed := bytes.TrimLeft(data, " \t\r\n")
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return "", false
	}
	var f struct {
		RID json.RawMessage `json:"rid"`
	}
	if json.Unmarshal(data, &f) != nil || len(f.RID) == 0 || f.RID[0] != '"' {
		return "", false
	}
	if json.Unmarshal(f.RID, &rid) != nil {
		return "", false
	}
	return rid, true
}
