package client

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Backend drives one registration from outside it (docs/protocol.md §10),
// with its host key or the router's admin token.
type Backend struct {
	// URL is the router's base, http(s)://host[:port].
	URL string
	// ID is the registration.
	ID string
	// HostKey, or AdminToken (sent as a bearer): exactly one.
	HostKey, AdminToken string
	// HTTPClient makes the calls; nil means http.DefaultClient.
	HTTPClient *http.Client
}

// Target chooses the members of a Send: one of Role ("host", "client",
// "member"), Conn (a connection id) or Name; the zero value is everyone.
type Target struct {
	Role, Conn, Name string
}

func (t Target) query(q url.Values) {
	switch {
	case t.Conn != "":
		q.Set("conn", t.Conn)
	case t.Name != "":
		q.Set("name", t.Name)
	case t.Role != "":
		q.Set("to", t.Role)
	}
}

// Send sends body to the members to chooses, as one message: text when
// contentType is text/*, application/json or …+json, binary otherwise. It
// returns how many members it was queued to; naming a conn or name that is
// not connected is ErrNotFound.
func (b *Backend) Send(ctx context.Context, to Target, contentType string, body []byte) (int, error) {
	q := url.Values{}
	to.query(q)
	var out struct {
		Delivered int `json:"delivered"`
	}
	err := b.call(ctx, http.MethodPost, "/send", q, contentType, body, &out)
	return out.Delivered, err
}

// CloseMember closes the member with connection id conn (or, if conn is
// empty, the one named name) with code (4000–4999; 0 means 4002) and reason.
func (b *Backend) CloseMember(ctx context.Context, conn, name string, code int, reason string) error {
	q := url.Values{}
	if conn != "" {
		q.Set("conn", conn)
	} else {
		q.Set("name", name)
	}
	if code != 0 {
		q.Set("code", strconv.Itoa(code))
	}
	if reason != "" {
		q.Set("reason", reason)
	}
	return b.call(ctx, http.MethodDelete, "/member", q, "", nil, nil)
}

// Member is a live member as GET /members lists it.
type Member struct {
	Conn          string    `json:"conn"`
	Role          string    `json:"role"`
	Name          string    `json:"name,omitempty"`
	RemoteAddr    string    `json:"remote_addr"`
	ConnectedAt   time.Time `json:"connected_at"`
	Subscriptions []string  `json:"subscriptions,omitempty"`
}

// Members lists the registration's live members, oldest first.
func (b *Backend) Members(ctx context.Context) ([]Member, error) {
	var out struct {
		Members []Member `json:"members"`
	}
	err := b.call(ctx, http.MethodGet, "/members", url.Values{}, "", nil, &out)
	return out.Members, err
}

func (b *Backend) call(ctx context.Context, method, path string, q url.Values, contentType string, body []byte, out any) error {
	q.Set("id", b.ID)
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(b.URL, "/")+path+"?"+q.Encode(), bytes.NewReader(body))
	if err != nil {
		return err
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if b.AdminToken != "" {
		req.Header.Set("Authorization", "Bearer "+b.AdminToken)
	} else {
		req.Header.Set("X-Host-Key", b.HostKey)
	}
	hc := b.HTTPClient
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return statusError(resp)
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// ErrBadSignature is a webhook whose signature does not verify, or whose
// timestamp is too far from now.
var ErrBadSignature = errors.New("wsrouter: bad webhook signature")

// WebhookTolerance is how far a webhook's timestamp may be from now.
const WebhookTolerance = 5 * time.Minute

// VerifyWebhook checks a webhook call's Standard Webhooks signature
// (webhook-id, webhook-timestamp, webhook-signature headers) over its raw
// body with the registration's secret, and that its timestamp is within
// WebhookTolerance of now, so that a recorded call cannot be replayed
// later.
func VerifyWebhook(secret []byte, header http.Header, body []byte) error {
	id, ts := header.Get("webhook-id"), header.Get("webhook-timestamp")
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || id == "" {
		return ErrBadSignature
	}
	if d := time.Since(time.Unix(sec, 0)); d > WebhookTolerance || d < -WebhookTolerance {
		return fmt.Errorf("%w: timestamp %v away", ErrBadSignature, d.Round(time.Second))
	}
	m := hmac.New(sha256.New, secret)
	fmt.Fprintf(m, "%s.%s.", id, ts)
	m.Write(body)
	want := "v1," + base64.StdEncoding.EncodeToString(m.Sum(nil))
	for sig := range strings.FieldsSeq(header.Get("webhook-signature")) {
		if hmac.Equal([]byte(sig), []byte(want)) {
			return nil
		}
	}
	return ErrBadSignature
}
