package token

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"

	"github.com/go-jose/go-jose/v4"
)

// Key is one public key that may sign tokens.
type Key struct {
	// ID is the key's kid: from its JWK, or its RFC 7638 thumbprint.
	ID string
	// Thumbprint is the key's RFC 7638 SHA-256 thumbprint, base64url: what
	// the key is, whatever kid it was given.
	Thumbprint string
	// Public is an ed25519.PublicKey, a P-256 *ecdsa.PublicKey or an
	// *rsa.PublicKey.
	Public crypto.PublicKey
	// Alg is the one algorithm the key verifies.
	Alg jose.SignatureAlgorithm
}

// KeySet is an issuer's keys. It is immutable once made; the zero value
// holds none.
type KeySet struct {
	keys []Key
}

// Len returns the number of keys in s.
func (s *KeySet) Len() int {
	if s == nil {
		return 0
	}
	return len(s.keys)
}

// Keys returns the keys of s.
func (s *KeySet) Keys() []Key {
	if s == nil {
		return nil
	}
	return s.keys
}

// minRSABits is the smallest RSA key accepted.
const minRSABits = 2048

// newKey checks that pub is a kind of key tokens may use and returns it with
// its algorithm; kid "" means its thumbprint.
func newKey(pub crypto.PublicKey, kid string) (Key, error) {
	k := Key{ID: kid, Public: pub}
	switch p := pub.(type) {
	case ed25519.PublicKey:
		k.Alg = jose.EdDSA
	case *ecdsa.PublicKey:
		if p.Curve != elliptic.P256() {
			return k, errors.New("ECDSA key not on P-256 (ES256 only)")
		}
		k.Alg = jose.ES256
	case *rsa.PublicKey:
		if p.N.BitLen() < minRSABits {
			return k, fmt.Errorf("RSA key of %d bits (at least %d)", p.N.BitLen(), minRSABits)
		}
		k.Alg = jose.RS256
	default:
		return k, fmt.Errorf("unsupported key type %T (Ed25519, P-256 or RSA)", pub)
	}
	var err error
	if k.Thumbprint, err = thumbprint(pub); err != nil {
		return k, err
	}
	if k.ID == "" {
		k.ID = k.Thumbprint
	}
	return k, nil
}

// thumbprint returns pub's RFC 7638 SHA-256 thumbprint, base64url.
func thumbprint(pub crypto.PublicKey) (string, error) {
	t, err := (&jose.JSONWebKey{Key: pub}).Thumbprint(crypto.SHA256)
	if err != nil {
		return "", fmt.Errorf("key thumbprint: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(t), nil
}

// ParseKeys reads an issuer's public keys: PEM blocks (PUBLIC KEY, RSA
// PUBLIC KEY, CERTIFICATE) and/or one JWKS document ({"keys":[…]}) in the
// text around them. Private keys, symmetric keys and other kinds are
// refused, so a mistaken file fails loudly rather than trusting something
// it should not.
func ParseKeys(data []byte) (*KeySet, error) {
	var set KeySet
	var other []byte // what is not PEM: a JWKS document, or nothing
	rest := data
	for {
		i := bytes.Index(rest, []byte("-----BEGIN "))
		if i < 0 {
			other = append(other, rest...)
			break
		}
		other = append(other, rest[:i]...)
		var b *pem.Block
		b, rest = pem.Decode(rest[i:])
		if b == nil {
			return nil, errors.New("a PEM block that does not parse")
		}
		k, err := pemKey(b)
		if err != nil {
			return nil, fmt.Errorf("PEM block %d: %w", len(set.keys)+1, err)
		}
		set.keys = append(set.keys, k)
	}
	if other = bytes.TrimSpace(other); len(other) > 0 {
		if other[0] != '{' {
			return nil, errors.New("text that is neither PEM nor a JWKS document")
		}
		jwks, err := parseJWKS(other)
		if err != nil {
			return nil, err
		}
		set.keys = append(set.keys, jwks...)
	}
	if len(set.keys) == 0 {
		return nil, errors.New("no keys: want PEM public keys or a JWKS document")
	}
	return &set, nil
}

func pemKey(b *pem.Block) (Key, error) {
	var pub any
	var err error
	switch b.Type {
	case "PUBLIC KEY":
		pub, err = x509.ParsePKIXPublicKey(b.Bytes)
	case "RSA PUBLIC KEY":
		pub, err = x509.ParsePKCS1PublicKey(b.Bytes)
	case "CERTIFICATE":
		var cert *x509.Certificate
		if cert, err = x509.ParseCertificate(b.Bytes); err == nil {
			pub = cert.PublicKey
		}
	default:
		return Key{}, fmt.Errorf("%q: want PUBLIC KEY, RSA PUBLIC KEY or CERTIFICATE", b.Type)
	}
	if err != nil {
		return Key{}, err
	}
	return newKey(pub, "")
}

func parseJWKS(data []byte) ([]Key, error) {
	var doc jose.JSONWebKeySet
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("JWKS: %w", err)
	}
	if len(doc.Keys) == 0 {
		return nil, errors.New("JWKS: no keys")
	}
	var keys []Key
	for i, jk := range doc.Keys {
		if !jk.IsPublic() {
			return nil, fmt.Errorf("JWKS key %d: not a public key", i)
		}
		if jk.Use != "" && jk.Use != "sig" {
			return nil, fmt.Errorf("JWKS key %d: use %q, not sig", i, jk.Use)
		}
		k, err := newKey(jk.Key, jk.KeyID)
		if err != nil {
			return nil, fmt.Errorf("JWKS key %d: %w", i, err)
		}
		if jk.Algorithm != "" && jk.Algorithm != string(k.Alg) {
			return nil, fmt.Errorf("JWKS key %d: alg %q does not fit its key (%s)", i, jk.Algorithm, k.Alg)
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// LoadKeys reads an issuer's keys from a file (see ParseKeys).
func LoadKeys(path string) (*KeySet, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	s, err := ParseKeys(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return s, nil
}

// ParsePrivateKey reads the router's Ed25519 key from PEM (PKCS#8, "PRIVATE
// KEY", as openssl genpkey -algorithm ed25519 writes it).
func ParsePrivateKey(data []byte) (ed25519.PrivateKey, error) {
	b, _ := pem.Decode(data)
	if b == nil || b.Type != "PRIVATE KEY" {
		return nil, errors.New("want a PEM PRIVATE KEY block (PKCS#8)")
	}
	return ParsePKCS8(b.Bytes)
}

// ParsePKCS8 reads an Ed25519 key from PKCS#8 DER.
func ParsePKCS8(der []byte) (ed25519.PrivateKey, error) {
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, err
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("a %T, want Ed25519", k)
	}
	return priv, nil
}

// MarshalPKCS8 returns key as PKCS#8 DER, to be kept with the data.
func MarshalPKCS8(key ed25519.PrivateKey) []byte {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		panic(err) // an Ed25519 key always marshals
	}
	return der
}
