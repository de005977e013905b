package router

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"time"

	"wsrouter/registry"
	"wsrouter/registry/cluster"
)

var (
	errTooLarge     = errors.New("request body too large")
	errShuttingDown = errors.New("server shutting down")
	errNotUpgrade   = errors.New("websocket upgrade required")
	errOrigin       = errors.New("origin not allowed")
)

// errRateLimited is a 429 with a Retry-After.
type errRateLimited struct{ retry time.Duration }

func (e *errRateLimited) Error() string { return "rate limited" }

// status maps an error to its HTTP status and one-line body. This is the one
// place registry errors become statuses (docs/protocol.md §2); a client's mistake is
// never a 5xx.
func status(err error) (int, string) {
	var pe *errParam
	var rl *errRateLimited
	switch {
	case errors.As(err, &pe):
		return http.StatusBadRequest, pe.msg
	case errors.As(err, &rl):
		return http.StatusTooManyRequests, "rate limited"
	case errors.Is(err, registry.ErrNotFound):
		return http.StatusNotFound, "registration not found"
	case errors.Is(err, errNoMember):
		return http.StatusNotFound, "no such member"
	case errors.Is(err, registry.ErrForbidden):
		// One body for key and host key: no oracle for which was wrong.
		return http.StatusForbidden, "forbidden"
	case errors.Is(err, errOrigin):
		return http.StatusForbidden, "origin not allowed"
	case errors.Is(err, errWebhookRefused):
		return http.StatusForbidden, "refused by the registration's backend"
	case errors.Is(err, errWebhookFailed):
		return http.StatusServiceUnavailable, "the registration's backend did not answer"
	case errors.Is(err, registry.ErrNameTaken):
		return http.StatusConflict, "name held by a member of another role"
	case errors.Is(err, registry.ErrExists):
		return http.StatusConflict, "id already taken"
	case errors.Is(err, errTooLarge):
		return http.StatusRequestEntityTooLarge, "request body too large"
	case errors.Is(err, errNotUpgrade):
		return http.StatusBadRequest, "websocket upgrade required"
	case errors.Is(err, registry.ErrTooManyRegistrations):
		return http.StatusServiceUnavailable, "too many registrations"
	case errors.Is(err, registry.ErrTooManyMembers):
		return http.StatusServiceUnavailable, "too many members"
	case errors.Is(err, registry.ErrBusy):
		return http.StatusServiceUnavailable, "server busy"
	case errors.Is(err, errTooManyWatchers):
		return http.StatusServiceUnavailable, "too many info streams"
	case errors.Is(err, errCut), errors.Is(err, cluster.ErrCut):
		return http.StatusServiceUnavailable, "cut off from the cluster"
	case errors.Is(err, registry.ErrStore):
		return http.StatusServiceUnavailable, "storage unavailable"
	case errors.Is(err, registry.ErrRemoving):
		return http.StatusServiceUnavailable, "registration being removed"
	case errors.Is(err, registry.ErrClosed), errors.Is(err, errShuttingDown):
		return http.StatusServiceUnavailable, "server shutting down"
	case errors.Is(err, context.Canceled):
		// The client went away; nobody reads this answer. 499 as nginx does
		// would confuse, and it is not the server's fault either.
		return http.StatusBadRequest, "request canceled"
	}
	return http.StatusInternalServerError, "internal error"
}

// writeError answers err as a one-line text/plain body with its status.
func writeError(w http.ResponseWriter, err error) {
	code, msg := status(err)
	writeStatus(w, err, code, msg)
}

// writeStatus answers with code and msg, adding Retry-After for a rate limit.
func writeStatus(w http.ResponseWriter, err error, code int, msg string) {
	var rl *errRateLimited
	switch {
	case errors.As(err, &rl):
		secs := int((rl.retry + time.Second - 1) / time.Second)
		w.Header().Set("Retry-After", strconv.Itoa(max(1, secs)))
	case errors.Is(err, registry.ErrStore), errors.Is(err, registry.ErrRemoving), errors.Is(err, errCut):
		w.Header().Set("Retry-After", "1")
	}
	http.Error(w, msg, code)
}

// Close codes of docs/protocol.md §4 that the server sends. 1000 is only ever the echo
// of a peer's own close; 1011 has no cause in this version.
const (
	codeGoingAway = 1001
	// codeServiceRestart closes the info streams of a cluster node whose
	// view of the other nodes jumped (docs/protocol.md §15.2).
	codeServiceRestart = 1012
	codeInvalidUTF8    = 1007
	codePolicy         = 1008
	codeTooBig         = 1009
	codeRemoved        = 4000
	codeReplaced       = registry.CodeReplaced // 4001
	codeByBackend      = 4002
	codeSlowConsumer   = 4008

	// codePingTimeout stands for a member dropped without a close frame
	// because it did not answer a ping. It never goes on the wire.
	codePingTimeout = -1
	// codeWriteFailed stands for a member dropped because a write failed
	// or stalled past -write-timeout. It never goes on the wire either.
	codeWriteFailed = -2
)
