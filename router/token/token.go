// Package token mints and checks the router's tokens (docs/protocol.md §12):
// JWTs that admit a member to one registration, role and generation without
// a bcrypt key check. The router signs its own with an Ed25519 key; an
// operator's issuer may sign them too, with keys the router is given as PEM
// or a JWKS document.
//
// Parsing and signature checks are go-jose's, with an explicit list of
// accepted algorithms (EdDSA, ES256, RS256), so that "none", HMAC and any
// algorithm the key was not made for are refused before a key is touched.
package token

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

const (
	// Audience is the aud claim every token must carry.
	Audience = "wsrouter"
	// Skew is the clock difference allowed on exp, nbf and iat.
	Skew = 60 * time.Second
	// MaxLen bounds a token's length; the largest legitimate one (RS256
	// with a 4096-bit key and a 64-byte name) is under 1 KiB.
	MaxLen = 4096
)

// algorithms are the signature algorithms accepted, in any token.
var algorithms = []jose.SignatureAlgorithm{jose.EdDSA, jose.ES256, jose.RS256}

// Claims are what a token grants.
type Claims struct {
	// Name is the member's name (sub); empty means none.
	Name string
	// Reg is the registration's id.
	Reg string
	// Role is host, client or member.
	Role string
	// Gen is the registration's generation as a decimal string; empty (only
	// in an issuer's token) means any generation.
	Gen string
	// IssuedAt, NotBefore and Expiry bound when the token is good;
	// NotBefore's zero value means from IssuedAt (or always).
	IssuedAt, NotBefore, Expiry time.Time
	// Key is the RFC 7638 thumbprint of the key that signed the token,
	// whatever its kid; set by Verify.
	Key string
	// Router reports whether the router's own key signed the token; set by
	// Verify.
	Router bool
}

// Generation formats a registration's generation as the gen claim.
func Generation(g uint64) string { return strconv.FormatUint(g, 10) }

// wire is a token's payload as JSON.
type wire struct {
	Sub  string           `json:"sub"`
	Reg  string           `json:"reg"`
	Role string           `json:"role"`
	Gen  string           `json:"gen,omitempty"`
	Aud  jwt.Audience     `json:"aud"`
	Iat  *jwt.NumericDate `json:"iat,omitempty"`
	Nbf  *jwt.NumericDate `json:"nbf,omitempty"`
	Exp  *jwt.NumericDate `json:"exp,omitempty"`
}

// Signer mints the router's tokens. Its zero value is not usable; make one
// with NewSigner.
type Signer struct {
	key    ed25519.PrivateKey
	kid    string
	signer jose.Signer
}

// NewSigner returns a Signer for key. Its tokens carry the key's RFC 7638
// thumbprint as kid.
func NewSigner(key ed25519.PrivateKey) (*Signer, error) {
	if len(key) != ed25519.PrivateKeySize {
		return nil, errors.New("token key: not an Ed25519 private key")
	}
	kid, err := thumbprint(key.Public())
	if err != nil {
		return nil, err
	}
	opts := (&jose.SignerOptions{}).WithType("JWT").WithHeader(jose.HeaderKey("kid"), kid)
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.EdDSA, Key: key}, opts)
	if err != nil {
		return nil, fmt.Errorf("token key: %w", err)
	}
	return &Signer{key: key, kid: kid, signer: s}, nil
}

// GenerateKey returns a new Ed25519 key for a Signer.
func GenerateKey() ed25519.PrivateKey {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(err) // crypto/rand never fails (Go 1.24)
	}
	return priv
}

// Public returns the signer's public key.
func (s *Signer) Public() ed25519.PublicKey { return s.key.Public().(ed25519.PublicKey) }

// KeyID returns the kid of the signer's tokens.
func (s *Signer) KeyID() string { return s.kid }

// Sign returns the token for c. Its Expiry must be set.
func (s *Signer) Sign(c Claims) (string, error) {
	if c.Expiry.IsZero() {
		return "", errors.New("token without an expiry")
	}
	w := wire{Sub: c.Name, Reg: c.Reg, Role: c.Role, Gen: c.Gen, Aud: jwt.Audience{Audience},
		Exp: jwt.NewNumericDate(c.Expiry)}
	if !c.IssuedAt.IsZero() {
		w.Iat = jwt.NewNumericDate(c.IssuedAt)
	}
	if !c.NotBefore.IsZero() {
		w.Nbf = jwt.NewNumericDate(c.NotBefore)
	}
	return jwt.Signed(s.signer).Claims(w).Serialize()
}

// Reason is why a token was refused; each is a label of the router's
// refusal counter.
type Reason string

// The reasons a token is refused.
const (
	Malformed   Reason = "malformed"     // not a JWT, an unusable or oversized claim, no exp
	Algorithm   Reason = "algorithm"     // none, HS*, or not the key's algorithm
	Signature   Reason = "signature"     // no key of that kid, or the signature does not verify
	Expired     Reason = "expired"       // exp passed, beyond the skew
	NotYetValid Reason = "not_yet_valid" // nbf or iat in the future, beyond the skew
	AudienceR   Reason = "audience"      // aud without "wsrouter"
	Scope       Reason = "scope"         // another registration, generation or role
)

// Reasons lists every Reason, for metrics.
var Reasons = []Reason{Malformed, Algorithm, Signature, Expired, NotYetValid, AudienceR, Scope}

// Error is a refused token. Its message never contains the token.
type Error struct {
	Reason Reason
	msg    string
}

func (e *Error) Error() string { return "token refused (" + string(e.Reason) + "): " + e.msg }

func refuse(r Reason, format string, args ...any) *Error {
	return &Error{Reason: r, msg: fmt.Sprintf(format, args...)}
}

// ScopeError returns the refusal of a token that is good but opens
// something else than asked.
func ScopeError(format string, args ...any) *Error { return refuse(Scope, format, args...) }
