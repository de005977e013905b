package relay

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzRelayReply feeds arbitrary host frames through the reply path. A frame
// is either not a reply (forwarded), or a reply that maps to a response
// within the limits, or an unusable one (502) — never a panic.
func FuzzRelayReply(f *testing.F) {
	for _, s := range []string{
		`{"rid":"r","status":200,"type":"html","content":"<h1>on</h1>"}`,
		`{"rid":"r","content":"AAEC","encoding":"base64","type":"image"}`,
		`{"rid":"r","temp":21,"headers":{"X-A":["b","c"],"Set-Cookie":"x"}}`,
		`{"rid":"r","status":"404","content":{"a":[1,2]}}`,
		`{"rid":1}`, `[1,2]`, `{"rid":"r","status":150}`, `  {"rid":"r","content":null}`,
	} {
		f.Add([]byte(s))
	}
	const maxBody = 4096
	f.Fuzz(func(t *testing.T, data []byte) {
		rid, ok := replyRID(data)
		if !ok {
			return
		}
		var check map[string]any
		if json.Unmarshal(data, &check) != nil {
			t.Fatalf("accepted a frame that is not a JSON object: %q", data)
		}
		found := false
		for k, v := range check {
			if strings.EqualFold(k, "rid") && v == rid {
				found = true
			}
		}
		if !found {
			t.Fatalf("got rid %q, not a string rid of %q", rid, data)
		}
		resp, err := parseReply(data, maxBody)
		if err != nil {
			if !errors.Is(err, ErrBadReply) {
				t.Fatalf("error %v is not ErrBadReply", err)
			}
			return
		}
		if resp.status < 200 || resp.status > 599 {
			t.Fatalf("status %d", resp.status)
		}
		if len(resp.body) > maxBody {
			t.Fatalf("body of %d bytes over %d", len(resp.body), maxBody)
		}
		if resp.header.Get("Content-Type") == "" {
			t.Fatal("no Content-Type")
		}
		for k, vs := range resp.header {
			if k == "Set-Cookie" || k == "Connection" || k == "Transfer-Encoding" || !validHeaderName(k) {
				t.Fatalf("header %q passed", k)
			}
			for _, v := range vs {
				if !validHeaderValue(v) {
					t.Fatalf("header %s value %q passed", k, v)
				}
			}
		}
	})
}

// FuzzRelayRequest checks that any request turns into a frame from which the
// device gets back exactly the body, method, path and query.
func FuzzRelayRequest(f *testing.F) {
	f.Add("GET", "/status", "led=on&led=off&x=", "Accept", "*/*", []byte(nil))
	f.Add("POST", "/", "", "Content-Type", "text/plain", []byte("héllo"))
	f.Add("PUT", "/a/b", "q=%00", "X-Bin", "v", []byte{0xff, 0xfe, 0})
	// Each invalid UTF-8 alone, valid joined: the first release's oracle
	// checked them joined.
	f.Add("\xc2", "\x80", "", "", "", []byte(nil))
	f.Add("POST", "/", "", "", "", []byte("<<<<&&&&\x01\x02\u2028"))
	f.Fuzz(func(t *testing.T, method, path, rawQuery, hname, hval string, body []byte) {
		query, _ := url.ParseQuery(rawQuery)
		h := http.Header{}
		if validHeaderName(hname) && validHeaderValue(hval) {
			h.Set(hname, hval)
		}
		h.Set("Cookie", "c=1")
		h.Set("X-Key", "k")
		h.Set("X-Token", "t")
		b, err := encodeRequest("0123", method, path, query, h, body)
		if err != nil {
			t.Fatal(err)
		}
		var got Request
		if err := json.Unmarshal(b, &got); err != nil {
			t.Fatalf("frame is not JSON: %v", err)
		}
		// encoding/json turns invalid UTF-8 into U+FFFD (a path may hold
		// it after percent-decoding); valid input comes back exactly.
		if utf8.ValidString(method) && got.Method != method {
			t.Fatalf("got method %q, want %q", got.Method, method)
		}
		if utf8.ValidString(path) && got.Path != path {
			t.Fatalf("got path %q, want %q", got.Path, path)
		}
		// The frame stays within the bound the relay charges for it.
		r := &http.Request{Method: method, URL: &url.URL{Path: path, RawQuery: query.Encode()}, Header: h}
		if bound := frameBound(r, int64(len(body))); int64(len(b)) > bound {
			t.Fatalf("frame of %d bytes over its bound %d", len(b), bound)
		}
		var gotBody []byte
		if got.Body != nil {
			if got.BodyEncoding == "base64" {
				gotBody, err = base64.StdEncoding.DecodeString(*got.Body)
				if err != nil {
					t.Fatal(err)
				}
			} else {
				gotBody = []byte(*got.Body)
			}
		}
		if !bytes.Equal(gotBody, body) {
			t.Fatalf("got body %q, want %q", gotBody, body)
		}
		if _, ok := got.Headers["Cookie"]; ok {
			t.Fatal("Cookie passed")
		}
		if _, ok := got.Headers["X-Token"]; ok {
			t.Fatal("X-Token passed")
		}
		if _, ok := got.Headers["X-Key"]; ok {
			t.Fatal("X-Key passed")
		}
		if len(got.Query) != len(query) {
			t.Fatalf("got %d query names, want %d", len(got.Query), len(query))
		}
	})
}

// TestRelayFrameSize: a body is never escaped into something much larger
// than itself (the first release's frames were six times the size of a body
// of "<").
func TestRelayFrameSize(t *testing.T) {
	const n = 1 << 20
	for _, tt := range []struct {
		name       string
		body       []byte
		wantBase64 bool
	}{
		{"html characters", bytes.Repeat([]byte("<>&"), n/3), false},
		{"plain text", bytes.Repeat([]byte("a"), n), false},
		{"control characters", bytes.Repeat([]byte{1}, n), true},
		{"line separators", bytes.Repeat([]byte("\u2028"), n/3), true},
		{"binary", bytes.Repeat([]byte{0xff}, n), true},
	} {
		b, err := encodeRequest("0123", "POST", "/", nil, nil, tt.body)
		if err != nil {
			t.Fatal(err)
		}
		if max := len(tt.body)*4/3 + 200; len(b) > max {
			t.Errorf("%s: frame of %d bytes for a %d-byte body, want at most %d", tt.name, len(b), len(tt.body), max)
		}
		var got Request
		if err := json.Unmarshal(b, &got); err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		if (got.BodyEncoding == "base64") != tt.wantBase64 {
			t.Errorf("%s: body_encoding %q, want base64 %v", tt.name, got.BodyEncoding, tt.wantBase64)
		}
	}
}
