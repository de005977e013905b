// Package client is the Go client of a wsrouter: register a registration,
// join it with a connection that stays connected (reconnecting with backoff
// on its own), answer relayed HTTP requests with an ordinary http.Handler,
// and drive a registration from a backend. It depends on nothing beyond
// what the router itself uses (coder/websocket).
//
// The wire protocol is the router's docs/protocol.md.
package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Errors a call can end with, to test with errors.Is. A refused HTTP request
// is a *StatusError that matches the one of its status.
var (
	ErrBadRequest  = errors.New("wsrouter: bad request (400)")
	ErrForbidden   = errors.New("wsrouter: wrong key or token (403)")
	ErrNotFound    = errors.New("wsrouter: no such registration (404)")
	ErrConflict    = errors.New("wsrouter: id or name taken (409)")
	ErrRateLimited = errors.New("wsrouter: rate limited (429)")
	ErrUnavailable = errors.New("wsrouter: unavailable (503)")

	// ErrRemoved: the registration was removed (close code 4000).
	ErrRemoved = errors.New("wsrouter: registration removed (4000)")
	// ErrReplaced: a newer connection took this member's name (4001).
	ErrReplaced = errors.New("wsrouter: replaced by a newer connection of the same name (4001)")
	// ErrClosedByBackend: the registration's backend closed this member
	// (4002, or the 4000–4999 code it chose).
	ErrClosedByBackend = errors.New("wsrouter: closed by the registration's backend")
	// ErrRevoked: the credentials were revoked while connected (1008).
	ErrRevoked = errors.New("wsrouter: credentials revoked or policy violated (1008)")
	// ErrClosed: Close was called.
	ErrClosed = errors.New("wsrouter: connection closed")
)

// StatusError is an HTTP refusal: its status, its one-line body, and when
// the router asked to be tried again (Retry-After; 0 when it did not).
type StatusError struct {
	Status     int
	Body       string
	RetryAfter time.Duration
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("wsrouter: %d %s", e.Status, e.Body)
}

// Is reports whether target is the sentinel error of e's status.
func (e *StatusError) Is(target error) bool {
	switch e.Status {
	case http.StatusBadRequest:
		return target == ErrBadRequest
	case http.StatusForbidden:
		return target == ErrForbidden
	case http.StatusNotFound:
		return target == ErrNotFound
	case http.StatusConflict:
		return target == ErrConflict
	case http.StatusTooManyRequests:
		return target == ErrRateLimited
	case http.StatusServiceUnavailable:
		return target == ErrUnavailable
	}
	return false
}

// statusError reads a refusal from resp (whose body it consumes).
func statusError(resp *http.Response) *StatusError {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	e := &StatusError{Status: resp.StatusCode, Body: strings.TrimSpace(string(b))}
	if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s > 0 {
		e.RetryAfter = time.Duration(s) * time.Second
	}
	return e
}

// Registration is what Register asks for.
type Registration struct {
	// Type is "lobby", "hostclient" or "pubsub".
	Type string
	// Key joins; HostKey (with Key) administers. 1 to 72 bytes each.
	Key, HostKey string
	// ID asks for a chosen id; empty lets the router mint one.
	ID string
	// Webhook, if set, is where the registration's backend hears of its
	// members (docs/protocol.md §11), signed with WebhookSecret (16 to 128
	// bytes), for the events listed in WebhookEvents ("connect,message,close";
	// empty: the router's default).
	Webhook, WebhookSecret, WebhookEvents string
}

// Register creates a registration on the router at baseURL (http or https,
// e.g. "http://localhost:8741") and returns its id. A refusal is a
// *StatusError: ErrConflict when ID is taken, ErrRateLimited with
// RetryAfter, ErrUnavailable.
func Register(ctx context.Context, baseURL string, r Registration) (string, error) {
	form := url.Values{"reg_type": {r.Type}}
	if r.ID != "" {
		form.Set("id_req", r.ID)
	}
	if r.Webhook != "" {
		form.Set("webhook", r.Webhook)
		form.Set("webhook_secret", r.WebhookSecret)
		if r.WebhookEvents != "" {
			form.Set("webhook_events", r.WebhookEvents)
		}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimSuffix(baseURL, "/")+"/register", strings.NewReader(form.Encode()))
	if err != nil {
		return "", err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("X-Key", r.Key)
	req.Header.Set("X-Host-Key", r.HostKey)
	req.Header.Set("Accept", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", statusError(resp)
	}
	var out struct {
		ID string `json:"id"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || out.ID == "" {
		return "", fmt.Errorf("wsrouter: register: unreadable answer: %v", err)
	}
	return out.ID, nil
}

// Remove deletes registration id (with its key and host key); every member
// is closed with 4000. A refusal is a *StatusError (ErrForbidden for a wrong
// key, ErrNotFound).
func Remove(ctx context.Context, baseURL, id, key, hostKey string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimSuffix(baseURL, "/")+"/remove",
		strings.NewReader(url.Values{"id": {id}}.Encode()))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("X-Key", key)
	req.Header.Set("X-Host-Key", hostKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return statusError(resp)
	}
	return nil
}
