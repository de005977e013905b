package token

import (
	"crypto/ed25519"
	"errors"
	"sync/atomic"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// Verifier checks tokens against the router's key and an issuer's keys.
// Its zero value accepts no token; set Router, and Issuers if there is an
// issuer. Safe for concurrent use.
type Verifier struct {
	// router is the router's own key; its tokens must carry a gen.
	router atomic.Pointer[Key]
	// issuers is the operator's issuer's current key set, replaced whole
	// on reload.
	issuers atomic.Pointer[KeySet]
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// SetRouter makes pub the router's own key.
func (v *Verifier) SetRouter(pub ed25519.PublicKey) error {
	k, err := newKey(pub, "")
	if err != nil {
		return err
	}
	v.router.Store(&k)
	return nil
}

// SetIssuers replaces the issuer's keys; nil means none.
func (v *Verifier) SetIssuers(s *KeySet) { v.issuers.Store(s) }

// Issuers returns the issuer's current keys.
func (v *Verifier) Issuers() *KeySet { return v.issuers.Load() }

// HasKey reports whether a key with that id may still sign tokens: the
// router's, or one of the issuer's current keys.
func (v *Verifier) HasKey(id string) bool {
	if k := v.router.Load(); k != nil && k.ID == id {
		return true
	}
	for _, k := range v.issuers.Load().Keys() {
		if k.ID == id {
			return true
		}
	}
	return false
}

// Verify checks s — its algorithm, signature, audience and times — and
// returns what it grants. An error is an *Error whose Reason says why.
// Scope (registration, generation, role) is the caller's to check.
func (v *Verifier) Verify(s string) (Claims, error) {
	var c Claims
	if len(s) > MaxLen {
		return c, refuse(Malformed, "longer than %d bytes", MaxLen)
	}
	tok, err := jwt.ParseSigned(s, algorithms)
	if err != nil {
		var alg *jose.ErrUnexpectedSignatureAlgorithm
		if errors.As(err, &alg) {
			return c, refuse(Algorithm, "alg %q not accepted", alg.Got)
		}
		return c, refuse(Malformed, "not a signed JWT")
	}
	if len(tok.Headers) != 1 {
		return c, refuse(Malformed, "not one signature")
	}
	h := tok.Headers[0]
	alg := jose.SignatureAlgorithm(h.Algorithm)

	// The candidates: the key its kid names, or every key; of those, the
	// ones made for its algorithm.
	router := v.router.Load()
	var named, fit int
	var w wire
	verified := false
	try := func(k *Key) {
		if verified || (h.KeyID != "" && k.ID != h.KeyID) {
			return
		}
		named++
		if k.Alg != alg {
			return
		}
		fit++
		var got wire
		if tok.Claims(k.Public, &got) == nil {
			w, verified = got, true
			c.KeyID, c.Router = k.ID, k == router
		}
	}
	if router != nil {
		try(router)
	}
	iss := v.issuers.Load()
	for i := range iss.Keys() {
		try(&iss.keys[i])
	}
	switch {
	case verified:
	case named == 0 && h.KeyID != "":
		return c, refuse(Signature, "no key with that kid")
	case fit == 0:
		return c, refuse(Algorithm, "alg %q does not fit the key", alg)
	default:
		return c, refuse(Signature, "bad signature")
	}

	if !w.Aud.Contains(Audience) {
		return c, refuse(AudienceR, "aud without %q", Audience)
	}
	if w.Exp == nil {
		return c, refuse(Malformed, "no exp")
	}
	now := time.Now
	if v.Now != nil {
		now = v.Now
	}
	std := jwt.Claims{Expiry: w.Exp, NotBefore: w.Nbf, IssuedAt: w.Iat}
	switch err := std.ValidateWithLeeway(jwt.Expected{Time: now()}, Skew); {
	case errors.Is(err, jwt.ErrExpired):
		return c, refuse(Expired, "expired")
	case err != nil:
		return c, refuse(NotYetValid, "not yet valid")
	}
	if w.Reg == "" || w.Role == "" {
		return c, refuse(Malformed, "no reg or role")
	}
	if c.Router && w.Gen == "" {
		return c, refuse(Malformed, "no gen")
	}
	c.Name, c.Reg, c.Role, c.Gen = w.Sub, w.Reg, w.Role, w.Gen
	c.Expiry = w.Exp.Time()
	if w.Iat != nil {
		c.IssuedAt = w.Iat.Time()
	}
	if w.Nbf != nil {
		c.NotBefore = w.Nbf.Time()
	}
	return c, nil
}

// Grants reports (nil) whether c opens the registration id of generation
// gen: another id or generation is a Scope refusal.
func (c Claims) Grants(id string, gen uint64) error {
	if c.Reg != id {
		return refuse(Scope, "another registration")
	}
	if c.Gen != "" && c.Gen != Generation(gen) {
		return refuse(Scope, "another generation of the registration")
	}
	return nil
}
