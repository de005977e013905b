package router

import (
	"encoding/json"
	"errors"
	"net/http"
	"strings"

	"wsrouter/registry"
)

func (rt *Router) serveHealth(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if rt.draining.Load() {
		w.WriteHeader(http.StatusServiceUnavailable)
		w.Write([]byte("shutting down"))
		return
	}
	if rt.cut() {
		serveDegraded(w)
		return
	}
	w.Write([]byte("ok"))
}

func (rt *Router) serveRegister(w http.ResponseWriter, r *http.Request) {
	if err := rt.register(w, r); err != nil {
		rt.refuse(w, "register", err)
	}
}

func (rt *Router) register(w http.ResponseWriter, r *http.Request) error {
	if rt.draining.Load() {
		return errShuttingDown
	}
	if err := rt.allow(rt.limits.register, "register", r); err != nil {
		return err
	}
	if rt.cut() {
		return errCut
	}
	p, err := readParams(w, r)
	if err != nil {
		return err
	}
	cred, err := readCredentials(p, needKey|needHostKey)
	if err != nil {
		return err
	}
	typ, err := p.regType()
	if err != nil {
		return err
	}
	idReq, err := p.id("id_req", false)
	if err != nil {
		return err
	}
	wh, err := rt.webhookSpec(p)
	if err != nil {
		return err
	}
	reg, err := rt.registry.Create(r.Context(), registry.Spec{ID: idReq, Type: typ, Key: cred.key, HostKey: cred.hostKey, Webhook: wh})
	if err != nil {
		return err
	}

	if acceptsJSON(r) {
		w.Header().Set("Content-Type", "application/json")
		return json.NewEncoder(w).Encode(struct {
			ID      string `json:"id"`
			RegType string `json:"reg_type"`
		}{reg.ID, typ.String()})
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, err = w.Write([]byte(reg.ID))
	return err
}

func acceptsJSON(r *http.Request) bool {
	for _, v := range r.Header.Values("Accept") {
		for part := range strings.SplitSeq(v, ",") {
			mt, _, _ := strings.Cut(part, ";")
			if strings.EqualFold(strings.TrimSpace(mt), "application/json") {
				return true
			}
		}
	}
	return false
}

func (rt *Router) serveRemove(w http.ResponseWriter, r *http.Request) {
	if err := rt.remove(w, r); err != nil {
		rt.refuse(w, "remove", err)
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (rt *Router) remove(w http.ResponseWriter, r *http.Request) error {
	p, err := readParams(w, r)
	if err != nil {
		return err
	}
	id, err := p.id("id", true)
	if err != nil {
		return err
	}
	cred, err := readCredentials(p, needKey|needHostKey)
	if err != nil {
		return err
	}
	if rt.cut() {
		return errCut
	}
	reg, err := rt.lookup(r.Context(), id)
	if err != nil {
		return err
	}
	if err := rt.auth.owner(r, "remove", reg, cred); err != nil {
		return err
	}
	return reg.Remove(r.Context())
}

// refuse answers a refused request with its status and counts it by endpoint
// and status (docs/protocol.md §8: every refusal is counted).
func (rt *Router) refuse(w http.ResponseWriter, endpoint string, err error) {
	code, _ := status(err)
	if errors.Is(err, registry.ErrStore) {
		rt.storeFailed(endpoint, err)
	}
	rt.metrics.refused(endpoint, code)
	writeError(w, err)
}
