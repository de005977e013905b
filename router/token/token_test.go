package token

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
)

func pemOf(t testing.TB, typ string, der []byte) string {
	t.Helper()
	return string(pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}))
}

func pkix(t testing.TB, pub any) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return pemOf(t, "PUBLIC KEY", der)
}

func TestParseKeys(t *testing.T) {
	ed := GenerateKey()
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ec384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	small, _ := rsa.GenerateKey(rand.Reader, 1024)
	big, _ := rsa.GenerateKey(rand.Reader, 2048)
	jwks := func(keys ...jose.JSONWebKey) string {
		b, _ := json.Marshal(jose.JSONWebKeySet{Keys: keys})
		return string(b)
	}
	ecPriv, _ := x509.MarshalPKCS8PrivateKey(ec)

	cases := []struct {
		name string
		in   string
		want []jose.SignatureAlgorithm // nil: refused
		ids  []string
	}{
		{"PEM Ed25519 and P-256", pkix(t, ed.Public()) + pkix(t, &ec.PublicKey), []jose.SignatureAlgorithm{jose.EdDSA, jose.ES256}, nil},
		{"PKCS#1 RSA", pemOf(t, "RSA PUBLIC KEY", x509.MarshalPKCS1PublicKey(&big.PublicKey)), []jose.SignatureAlgorithm{jose.RS256}, nil},
		{"JWKS with kids", jwks(jose.JSONWebKey{Key: &big.PublicKey, KeyID: "r1", Use: "sig", Algorithm: "RS256"}, jose.JSONWebKey{Key: ed.Public(), KeyID: "e1"}),
			[]jose.SignatureAlgorithm{jose.RS256, jose.EdDSA}, []string{"r1", "e1"}},
		{"PEM and JWKS together", pkix(t, &ec.PublicKey) + jwks(jose.JSONWebKey{Key: ed.Public(), KeyID: "e1"}), []jose.SignatureAlgorithm{jose.ES256, jose.EdDSA}, nil},
		{"empty", "", nil, nil},
		{"not keys", "hello", nil, nil},
		{"a private key", pemOf(t, "PRIVATE KEY", ecPriv), nil, nil},
		{"P-384", pkix(t, &ec384.PublicKey), nil, nil},
		{"RSA 1024", pkix(t, &small.PublicKey), nil, nil},
		{"JWKS private key", jwks(jose.JSONWebKey{Key: ed, KeyID: "e1"}), nil, nil},
		{"JWKS symmetric key", `{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}`, nil, nil},
		{"JWKS alg that does not fit", jwks(jose.JSONWebKey{Key: ed.Public(), KeyID: "e1", Algorithm: "RS256"}), nil, nil},
		{"JWKS encryption key", jwks(jose.JSONWebKey{Key: &big.PublicKey, KeyID: "r1", Use: "enc"}), nil, nil},
		{"JWKS without keys", `{"keys":[]}`, nil, nil},
		{"broken PEM", "-----BEGIN PUBLIC KEY-----\nnot base64\n", nil, nil},
		{"trailing garbage", pkix(t, ed.Public()) + "garbage", nil, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ks, err := ParseKeys([]byte(c.in))
			if c.want == nil {
				if err == nil {
					t.Fatalf("accepted: %+v", ks.Keys())
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if ks.Len() != len(c.want) {
				t.Fatalf("%d keys, want %d", ks.Len(), len(c.want))
			}
			for i, k := range ks.Keys() {
				if k.Alg != c.want[i] {
					t.Errorf("key %d: %s, want %s", i, k.Alg, c.want[i])
				}
				if c.ids != nil && k.ID != c.ids[i] {
					t.Errorf("key %d: kid %q, want %q", i, k.ID, c.ids[i])
				}
				if k.ID == "" {
					t.Errorf("key %d has no id", i)
				}
			}
		})
	}
}

func TestPrivateKeyRoundTrip(t *testing.T) {
	k := GenerateKey()
	got, err := ParsePrivateKey([]byte(pemOf(t, "PRIVATE KEY", MarshalPKCS8(k))))
	if err != nil || !got.Equal(k) {
		t.Fatalf("round trip: %v", err)
	}
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(ec)
	if _, err := ParsePrivateKey([]byte(pemOf(t, "PRIVATE KEY", der))); err == nil {
		t.Fatal("an ECDSA key accepted as the router's key")
	}
	if _, err := ParsePrivateKey([]byte(pkix(t, k.Public()))); err == nil {
		t.Fatal("a public key accepted as the router's key")
	}
}

// fuzzSeed is a good token of the fuzz tests' router key, with its claims.
func fuzzSeed(t testing.TB) (*Verifier, string, Claims) {
	// A fixed key: the fuzz corpus in testdata holds tokens it signed.
	key := ed25519.NewKeyFromSeed([]byte("wsrouter token fuzz seed 32 byte"))
	s, err := NewSigner(key)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC)
	c := Claims{Name: "dev-1", Reg: "room", Role: "host", Gen: "42", IssuedAt: now, Expiry: now.Add(time.Hour)}
	tok, err := s.Sign(c)
	if err != nil {
		t.Fatal(err)
	}
	v := &Verifier{Now: func() time.Time { return now }}
	if err := v.SetRouter(s.Public()); err != nil {
		t.Fatal(err)
	}
	return v, tok, c
}

// FuzzVerify feeds Verify arbitrary tokens. It must never panic, always
// give a Reason when it refuses, and accept only what the key signed: a
// token that verifies carries exactly the seed's claims.
func FuzzVerify(f *testing.F) {
	v, good, want := fuzzSeed(f)
	f.Add(good)
	parts := strings.Split(good, ".")
	f.Add(parts[0] + "." + parts[1] + ".")
	f.Add(`eyJhbGciOiJub25lIn0.` + parts[1] + ".")
	f.Add("a.b.c")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := v.Verify(s)
		if err != nil {
			var te *Error
			if !errors.As(err, &te) || te.Reason == "" {
				t.Fatalf("refusal without a reason: %v", err)
			}
			if strings.Contains(err.Error(), s) && len(s) > 8 {
				t.Fatalf("the error repeats the token: %v", err)
			}
			return
		}
		if c.Name != want.Name || c.Reg != want.Reg || c.Role != want.Role || c.Gen != want.Gen || !c.Expiry.Equal(want.Expiry) {
			t.Fatalf("accepted claims %+v that the key did not sign", c)
		}
	})
}

// BenchmarkVerifyFirst is a token's first check: the signature.
func BenchmarkVerifyFirst(b *testing.B) {
	v, tok, _ := fuzzSeed(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := v.verify(tok); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVerify is a token checked before: the memo.
func BenchmarkVerify(b *testing.B) {
	v, tok, _ := fuzzSeed(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := v.Verify(tok); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEd25519(b *testing.B) {
	k := GenerateKey()
	msg := []byte("header.payload")
	sig := ed25519.Sign(k, msg)
	pub := k.Public().(ed25519.PublicKey)
	for b.Loop() {
		ed25519.Verify(pub, msg, sig)
	}
}

// TestMemo: a token checked before is taken from the memo, with its times
// checked again, and the memo is forgotten when the keys change.
func TestMemo(t *testing.T) {
	now := time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC)
	issuerKey := GenerateKey()
	is, _ := NewSigner(issuerKey)
	tok, _ := is.Sign(Claims{Reg: "r", Role: "member", Expiry: now.Add(time.Minute)})
	ks, err := ParseKeys([]byte(pkix(t, issuerKey.Public())))
	if err != nil {
		t.Fatal(err)
	}
	clock := now
	v := &Verifier{Now: func() time.Time { return clock }}
	v.SetIssuers(ks)
	for range 2 {
		if _, err := v.Verify(tok); err != nil {
			t.Fatal(err)
		}
	}
	if len(v.memo) != 1 {
		t.Fatalf("memo holds %d, want 1", len(v.memo))
	}
	clock = now.Add(time.Minute + Skew + time.Second)
	var te *Error
	if _, err := v.Verify(tok); !errors.As(err, &te) || te.Reason != Expired {
		t.Fatalf("a remembered token past its exp: %v", err)
	}
	clock = now
	v.SetIssuers(nil)
	if _, err := v.Verify(tok); !errors.As(err, &te) || te.Reason != Signature {
		t.Fatalf("a remembered token of a dropped key: %v", err)
	}
}
