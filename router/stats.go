package router

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"slices"
	"strconv"
	"time"

	"wsrouter/registry"
	"wsrouter/router/webhook"
)

// statsReply is the JSON of /stats. It never carries keys or hashes.
type statsReply struct {
	Totals        statsTotals `json:"totals"`
	Registrations []regStats  `json:"registrations"`
}

type statsTotals struct {
	Registrations int            `json:"registrations"`
	ByType        map[string]int `json:"registrations_by_type"`
	Members       map[string]int `json:"members_by_role"`
	MessagesIn    uint64         `json:"messages_in"`
	MessagesOut   uint64         `json:"messages_out"`
	RelayPending  int            `json:"relay_pending"`
}

type regStats struct {
	ID          string         `json:"id"`
	Type        string         `json:"type"`
	Members     map[string]int `json:"members_by_role"`
	Created     time.Time      `json:"created"`
	LastActive  time.Time      `json:"last_active"`
	MessagesIn  uint64         `json:"messages_in"`
	MessagesOut uint64         `json:"messages_out"`
	// Names are the members' names (docs/protocol.md §10), sorted;
	// omitted when nobody has one.
	Names []string `json:"names,omitempty"`
	// Webhook is the registration's webhook, without its secret.
	Webhook *webhookStats `json:"webhook,omitempty"`
}

type webhookStats struct {
	URL    string `json:"url"`
	Events string `json:"events"`
}

// serveStats answers /stats for the admin token's bearer only (docs/protocol.md §8).
// Without an admin token the route does not exist (404).
func (rt *Router) serveStats(w http.ResponseWriter, r *http.Request) {
	if !rt.requireAdmin(w, r, "stats") {
		return
	}
	reply := statsReply{
		Totals: statsTotals{
			ByType:  map[string]int{"hostclient": 0, "lobby": 0, "pubsub": 0},
			Members: map[string]int{"host": 0, "client": 0, "member": 0},
		},
		Registrations: []regStats{},
	}
	rt.registry.Each(func(reg *registry.Registration) {
		hosts, clients, members := reg.Counts()
		in, out, last := reg.Stats()
		rs := regStats{
			ID: reg.ID, Type: reg.Type.String(), Created: reg.Created.UTC(), LastActive: last.UTC(),
			MessagesIn: in, MessagesOut: out,
		}
		for _, mi := range reg.Members() {
			if mi.Name != "" {
				rs.Names = append(rs.Names, mi.Name)
			}
		}
		slices.Sort(rs.Names)
		if reg.Webhook.URL != "" {
			rs.Webhook = &webhookStats{reg.Webhook.URL, webhook.Events(reg.Webhook.Events).String()}
		}
		if reg.Type != registry.HostClient {
			rs.Members = map[string]int{"member": members}
		} else {
			rs.Members = map[string]int{"host": hosts, "client": clients}
		}
		t := &reply.Totals
		t.Registrations++
		t.ByType[rs.Type]++
		t.Members["host"] += hosts
		t.Members["client"] += clients
		t.Members["member"] += members
		t.MessagesIn += in
		t.MessagesOut += out
		reply.Registrations = append(reply.Registrations, rs)
	})
	reply.Totals.RelayPending = rt.relay.Pending()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	json.NewEncoder(w).Encode(reply)
}

// serveBackup streams a consistent copy of the data file to the admin
// token's bearer (docs/operations.md, "Backups"), while the router serves.
func (rt *Router) serveBackup(w http.ResponseWriter, r *http.Request) {
	if !rt.requireAdmin(w, r, "backup") {
		return
	}
	// A snapshot first, so that a slow client never holds the store, and
	// a length, so that a client can tell a whole copy from a cut one.
	snap, n, err := rt.cfg.Backup()
	if err != nil {
		rt.storeFailed("backup", err)
		http.Error(w, "storage unavailable", http.StatusServiceUnavailable)
		return
	}
	defer snap.Close()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", `attachment; filename="wsrouter.db"`)
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	if _, err := io.Copy(w, snap); err != nil {
		// Cut the connection: a complete-looking answer must never be a
		// partial copy.
		panic(http.ErrAbortHandler)
	}
}

// requireAdmin answers a request without the admin token (401, or 429 for
// an address locked out) and reports whether it may go on.
func (rt *Router) requireAdmin(w http.ResponseWriter, r *http.Request, endpoint string) bool {
	err := rt.auth.admin(r, endpoint, readBearer(r))
	switch {
	case err == nil:
		return true
	case errors.Is(err, errUnauthorized):
		rt.metrics.refused(endpoint, http.StatusUnauthorized)
		w.Header().Set("WWW-Authenticate", `Bearer realm="wsrouter"`)
		http.Error(w, "unauthorized", http.StatusUnauthorized)
	default:
		rt.refuse(w, endpoint, err)
	}
	return false
}
