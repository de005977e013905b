package token

import (
	"crypto/ed25519"
	"crypto/sha256"
	"errors"
	"sync"
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

	// memo remembers tokens that verified, by their SHA-256, as the
	// registry remembers keys: a device that reconnects with the token it
	// used before costs a hash and a map lookup instead of a signature
	// check (84 µs of Ed25519 on the reference machine, a connect's whole
	// cost twice over). Only a success is kept; times and the key are
	// checked again on every use.
	mu    sync.Mutex
	memo  map[[sha256.Size]byte]Claims // guarded by mu
	epoch uint64                       // guarded by mu; counts forgets
}

// memoSize bounds the memo. With the claims' lengths bounded below, an
// entry is at most about 500 bytes, so the memo holds 32 MB at worst. When
// full, an arbitrary entry makes way.
const memoSize = 1 << 16

// The longest claims accepted: an id, a role, a generation, and a subject
// twice a member name's length (an issuer's own subject may not be one).
const (
	maxReg  = 64
	maxRole = 8
	maxGen  = 20
	maxSub  = 128
)

// SetRouter makes pub the router's own key.
func (v *Verifier) SetRouter(pub ed25519.PublicKey) error {
	k, err := newKey(pub, "")
	if err != nil {
		return err
	}
	v.router.Store(&k)
	v.forget()
	return nil
}

// SetIssuers replaces the issuer's keys; nil means none. Tokens verified
// before are verified again: a new key may reuse an old one's kid.
func (v *Verifier) SetIssuers(s *KeySet) {
	v.issuers.Store(s)
	v.forget()
}

// forget empties the memo.
func (v *Verifier) forget() {
	v.mu.Lock()
	v.memo = nil
	v.epoch++
	v.mu.Unlock()
}

// Issuers returns the issuer's current keys.
func (v *Verifier) Issuers() *KeySet { return v.issuers.Load() }

// HasKey reports whether the key of that RFC 7638 thumbprint may still sign
// tokens: the router's, or one of the issuer's current keys. A new key
// under an old kid is another key.
func (v *Verifier) HasKey(thumbprint string) bool {
	if k := v.router.Load(); k != nil && k.Thumbprint == thumbprint {
		return true
	}
	for _, k := range v.issuers.Load().Keys() {
		if k.Thumbprint == thumbprint {
			return true
		}
	}
	return false
}

// Verify checks s — its algorithm, signature, audience and times — and
// returns what it grants. An error is an *Error whose Reason says why.
// Scope (registration, generation, role) is the caller's to check.
func (v *Verifier) Verify(s string) (Claims, error) {
	if len(s) > MaxLen {
		return Claims{}, refuse(Malformed, "longer than %d bytes", MaxLen)
	}
	sum := sha256.Sum256([]byte(s))
	v.mu.Lock()
	c, ok := v.memo[sum]
	epoch := v.epoch
	v.mu.Unlock()
	if ok {
		return c, v.checkTimes(c)
	}
	c, err := v.verify(s)
	if err != nil {
		return c, err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.epoch != epoch {
		return c, nil // the keys changed meanwhile: remember nothing
	}
	if v.memo == nil {
		v.memo = make(map[[sha256.Size]byte]Claims)
	}
	if len(v.memo) >= memoSize {
		for k := range v.memo {
			delete(v.memo, k)
			break
		}
	}
	v.memo[sum] = c
	return c, nil
}

// checkTimes reports whether c is good now, within the skew.
func (v *Verifier) checkTimes(c Claims) error {
	now := time.Now
	if v.Now != nil {
		now = v.Now
	}
	std := jwt.Claims{Expiry: jwt.NewNumericDate(c.Expiry)}
	if !c.NotBefore.IsZero() {
		std.NotBefore = jwt.NewNumericDate(c.NotBefore)
	}
	if !c.IssuedAt.IsZero() {
		std.IssuedAt = jwt.NewNumericDate(c.IssuedAt)
	}
	switch err := std.ValidateWithLeeway(jwt.Expected{Time: now()}, Skew); {
	case errors.Is(err, jwt.ErrExpired):
		return refuse(Expired, "expired")
	case err != nil:
		return refuse(NotYetValid, "not yet valid")
	}
	return nil
}

// verify is Verify without the memo.
func (v *Verifier) verify(s string) (Claims, error) {
	var c Claims
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
	var signer *Key
	try := func(k *Key) {
		if signer != nil || (h.KeyID != "" && k.ID != h.KeyID) {
			return
		}
		named++
		if k.Alg != alg {
			return
		}
		fit++
		if tok.Claims(k.Public) == nil { // the signature alone
			signer = k
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
	case signer != nil:
	case named == 0 && h.KeyID != "":
		return c, refuse(Signature, "no key with that kid")
	case fit == 0:
		return c, refuse(Algorithm, "alg %q does not fit the key", alg)
	default:
		return c, refuse(Signature, "bad signature")
	}
	c.Key, c.Router = signer.Thumbprint, signer == router

	// Signed, so what follows is the signer's mistake, not a forgery.
	var w wire
	if err := tok.UnsafeClaimsWithoutVerification(&w); err != nil {
		return c, refuse(Malformed, "claims of the wrong type")
	}
	if len(w.Sub) > maxSub || len(w.Reg) > maxReg || len(w.Role) > maxRole || len(w.Gen) > maxGen {
		return c, refuse(Malformed, "a claim too long")
	}
	if !w.Aud.Contains(Audience) {
		return c, refuse(AudienceR, "aud without %q", Audience)
	}
	if w.Exp == nil {
		return c, refuse(Malformed, "no exp")
	}
	c.Expiry = w.Exp.Time()
	if w.Iat != nil {
		c.IssuedAt = w.Iat.Time()
	}
	if w.Nbf != nil {
		c.NotBefore = w.Nbf.Time()
	}
	if err := v.checkTimes(c); err != nil {
		return c, err
	}
	if w.Reg == "" || w.Role == "" {
		return c, refuse(Malformed, "no reg or role")
	}
	if c.Router && w.Gen == "" {
		return c, refuse(Malformed, "no gen")
	}
	c.Name, c.Reg, c.Role, c.Gen = w.Sub, w.Reg, w.Role, w.Gen
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
