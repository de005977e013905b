package router

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/go-jose/go-jose/v4"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"wsrouter/registry"
	"wsrouter/router/relay"
	"wsrouter/router/token"
)

// issuer is an operator's token issuer with one key of each accepted kind:
// Ed25519 and P-256 given to the router as PEM (kid: their thumbprints),
// RSA as JWKS with kid "rsa-1".
type issuer struct {
	ed          ed25519.PrivateKey
	ec          *ecdsa.PrivateKey
	rsa         *rsa.PrivateKey
	edKid       string
	pem, jwks   []byte
	rsaKid      string
	otherRSA    *rsa.PrivateKey // a key the router does not know
	otherEdPriv ed25519.PrivateKey
}

func newIssuer(t testing.TB) *issuer {
	t.Helper()
	is := &issuer{rsaKid: "rsa-1"}
	_, is.ed, _ = ed25519.GenerateKey(rand.Reader)
	_, is.otherEdPriv, _ = ed25519.GenerateKey(rand.Reader)
	var err error
	if is.ec, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		t.Fatal(err)
	}
	if is.rsa, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
		t.Fatal(err)
	}
	if is.otherRSA, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
		t.Fatal(err)
	}
	for _, pub := range []any{is.ed.Public(), &is.ec.PublicKey} {
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			t.Fatal(err)
		}
		is.pem = append(is.pem, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})...)
	}
	set := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &is.rsa.PublicKey, KeyID: is.rsaKid, Algorithm: "RS256", Use: "sig"}}}
	if is.jwks, err = json.Marshal(set); err != nil {
		t.Fatal(err)
	}
	tp, _ := (&jose.JSONWebKey{Key: is.ed.Public()}).Thumbprint(crypto.SHA256)
	is.edKid = base64.RawURLEncoding.EncodeToString(tp)
	return is
}

// keys returns the issuer's keys as the router loads them: PEM and JWKS in
// one file.
func (is *issuer) keys(t testing.TB) *token.KeySet {
	t.Helper()
	ks, err := token.ParseKeys(append(append([]byte{}, is.pem...), is.jwks...))
	if err != nil {
		t.Fatal(err)
	}
	return ks
}

// sign returns a JWT of claims signed with key under alg, with kid if set.
func sign(t testing.TB, alg jose.SignatureAlgorithm, key any, kid string, claims map[string]any) string {
	t.Helper()
	opts := (&jose.SignerOptions{}).WithType("JWT")
	if kid != "" {
		opts = opts.WithHeader(jose.HeaderKey("kid"), kid)
	}
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: key}, opts)
	if err != nil {
		t.Fatal(err)
	}
	payload, _ := json.Marshal(claims)
	jws, err := s.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	out, err := jws.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// unsigned returns a JWT with alg "none".
func unsigned(claims map[string]any) string {
	h := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none","typ":"JWT"}`))
	p, _ := json.Marshal(claims)
	return h + "." + base64.RawURLEncoding.EncodeToString(p) + "."
}

// claimsFor returns good claims for role in reg, valid at now for an hour.
func claimsFor(reg, role string, now time.Time) map[string]any {
	return map[string]any{"reg": reg, "role": role, "aud": "wsrouter", "sub": "dev-1",
		"iat": now.Unix(), "exp": now.Add(time.Hour).Unix()}
}

func with(m map[string]any, kv ...any) map[string]any {
	out := map[string]any{}
	for k, v := range m {
		out[k] = v
	}
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] == nil {
			delete(out, kv[i].(string))
		} else {
			out[kv[i].(string)] = kv[i+1]
		}
	}
	return out
}

// mint asks the router for a token with the host key.
func (ts *testServer) mint(t testing.TB, id, role string, q url.Values) string {
	t.Helper()
	if q == nil {
		q = url.Values{}
	}
	q.Set("role", role)
	code, body, _ := ts.do(t, http.MethodPost, backendURL("/token", id, q), nil, http.Header{"X-Host-Key": {testHostKey}})
	if code != http.StatusOK {
		t.Fatalf("mint %s token: %d %q", role, code, body)
	}
	return body
}

// dialToken connects to id with tok and the given extra parameters.
func (ts *testServer) dialToken(t testing.TB, id, tok string, q url.Values, hdr http.Header) (*websocket.Conn, int) {
	t.Helper()
	if q == nil {
		q = url.Values{}
	}
	q.Set("id", id)
	if tok != "" {
		q.Set("token", tok)
	}
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, ts.wsURL("/connect", q), &websocket.DialOptions{HTTPHeader: hdr})
	if err != nil {
		if resp == nil {
			t.Fatalf("dial: %v", err)
		}
		return nil, resp.StatusCode
	}
	t.Cleanup(func() { c.CloseNow() })
	return c, http.StatusSwitchingProtocols
}

func tokenChecks(ts *testServer, result string) float64 {
	return testutil.ToFloat64(ts.rt.metrics.tokens.WithLabelValues(result))
}

func TestTokenMint(t *testing.T) {
	clock := &fakeClock{now: time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)}
	ts := newTestServer(t, Config{AdminToken: "admin-secret", Tokens: TokenConfig{MaxTTL: 48 * time.Hour, Now: clock.Now}, Registry: regCfgKeep()})
	hc := ts.register(t, "hostclient")
	lobby := ts.register(t, "lobby")
	hostKey := http.Header{"X-Host-Key": {testHostKey}}

	cases := []struct {
		name string
		id   string
		q    url.Values
		hdr  http.Header
		want int
	}{
		{"host token", hc, url.Values{"role": {"host"}}, hostKey, 200},
		{"client token, name and ttl", hc, url.Values{"role": {"client"}, "name": {"dev-7"}, "ttl": {"1h"}}, hostKey, 200},
		{"lobby member", lobby, url.Values{"role": {"member"}}, hostKey, 200},
		{"admin bearer", lobby, url.Values{"role": {"member"}}, http.Header{"Authorization": {"Bearer admin-secret"}}, 200},
		{"ttl at the maximum", hc, url.Values{"role": {"host"}, "ttl": {"48h"}}, hostKey, 200},
		{"no role", hc, url.Values{}, hostKey, 400},
		{"member in a hostclient", hc, url.Values{"role": {"member"}}, hostKey, 400},
		{"host in a lobby", lobby, url.Values{"role": {"host"}}, hostKey, 400},
		{"bad name", hc, url.Values{"role": {"host"}, "name": {"a b"}}, hostKey, 400},
		{"bad ttl", hc, url.Values{"role": {"host"}, "ttl": {"soon"}}, hostKey, 400},
		{"negative ttl", hc, url.Values{"role": {"host"}, "ttl": {"-1h"}}, hostKey, 400},
		{"ttl over the maximum", hc, url.Values{"role": {"host"}, "ttl": {"49h"}}, hostKey, 400},
		{"no credentials", hc, url.Values{"role": {"host"}}, nil, 400},
		{"the key is not enough", hc, url.Values{"role": {"host"}}, http.Header{"X-Key": {testKey}}, 400},
		{"wrong host key", hc, url.Values{"role": {"host"}}, http.Header{"X-Host-Key": {"nope"}}, 403},
		{"wrong admin bearer", hc, url.Values{"role": {"host"}}, http.Header{"Authorization": {"Bearer nope"}}, 403},
		{"unknown id", "no-such-id", url.Values{"role": {"host"}}, hostKey, 404},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, body, h := ts.do(t, http.MethodPost, backendURL("/token", c.id, c.q), nil, c.hdr)
			if code != c.want {
				t.Fatalf("got %d %q, want %d", code, body, c.want)
			}
			if code != 200 {
				return
			}
			if h.Get("Cache-Control") != "no-store" {
				t.Errorf("Cache-Control %q, want no-store", h.Get("Cache-Control"))
			}
			claims, err := ts.rt.tokens.verify.Verify(body)
			if err != nil {
				t.Fatalf("minted token does not verify: %v", err)
			}
			reg, _ := ts.rt.registry.Get(c.id)
			wantTTL := 24 * time.Hour
			if v := c.q.Get("ttl"); v != "" {
				wantTTL, _ = time.ParseDuration(v)
			}
			if claims.Reg != c.id || claims.Role != c.q.Get("role") || claims.Name != c.q.Get("name") ||
				claims.Gen != token.Generation(reg.Generation) || !claims.Expiry.Equal(clock.Now().Add(wantTTL)) || !claims.Router {
				t.Fatalf("claims %+v", claims)
			}
		})
	}

	// The header names EdDSA, and the JSON answer carries the expiry.
	code, body, h := ts.do(t, http.MethodPost, backendURL("/token", hc, url.Values{"role": {"client"}, "ttl": {"90m"}}), nil,
		http.Header{"X-Host-Key": {testHostKey}, "Accept": {"application/json"}})
	var got struct {
		Token     string    `json:"token"`
		ExpiresAt time.Time `json:"expires_at"`
	}
	if code != 200 || !strings.HasPrefix(h.Get("Content-Type"), "application/json") || json.Unmarshal([]byte(body), &got) != nil {
		t.Fatalf("JSON answer: %d %q", code, body)
	}
	if !got.ExpiresAt.Equal(clock.Now().Add(90 * time.Minute)) {
		t.Fatalf("expires_at %v, want %v", got.ExpiresAt, clock.Now().Add(90*time.Minute))
	}
	hdr, _ := base64.RawURLEncoding.DecodeString(strings.Split(got.Token, ".")[0])
	var jh struct{ Alg, Kid string }
	json.Unmarshal(hdr, &jh)
	if jh.Alg != "EdDSA" || jh.Kid == "" {
		t.Fatalf("header %s", hdr)
	}
	var payload map[string]any
	p, _ := base64.RawURLEncoding.DecodeString(strings.Split(got.Token, ".")[1])
	json.Unmarshal(p, &payload)
	for _, k := range []string{"sub", "reg", "role", "gen", "iat", "exp", "aud"} {
		if _, ok := payload[k]; !ok {
			t.Errorf("claim %s missing from %s", k, p)
		}
	}
	if _, ok := payload["gen"].(string); !ok || payload["aud"] != "wsrouter" {
		t.Errorf("gen must be a string and aud wsrouter: %s", p)
	}
	if code, _, _ := ts.do(t, http.MethodGet, backendURL("/token", hc, url.Values{"role": {"host"}}), nil, hostKey); code != 405 {
		t.Fatalf("GET /token: %d, want 405", code)
	}
	if n := testutil.ToFloat64(ts.rt.metrics.minted); n != 6 {
		t.Fatalf("tokens issued %v, want 6", n)
	}
}

// TestTokenConnect is every claim and refusal of a token on /connect.
func TestTokenConnect(t *testing.T) {
	clock := &fakeClock{now: time.Now().Truncate(time.Second)}
	is := newIssuer(t)
	ts := newTestServer(t, Config{Tokens: TokenConfig{Issuers: is.keys(t), Now: clock.Now}, Registry: regCfgKeep()})
	hc := ts.register(t, "hostclient")
	other := ts.register(t, "hostclient")
	lobby := ts.register(t, "lobby")
	now := clock.Now()

	hostTok := ts.mint(t, hc, "host", url.Values{"name": {"dev-1"}})
	clientTok := ts.mint(t, hc, "client", nil)
	lobbyTok := ts.mint(t, lobby, "member", nil)

	// An old generation: the same id removed and registered again.
	reused := ts.register(t, "hostclient", "id_req", "reused-id")
	oldGen := ts.mint(t, reused, "host", nil)
	if code, body, _ := ts.do(t, http.MethodPost, "/remove?"+url.Values{"id": {reused}, "key": {testKey}, "host_key": {testHostKey}}.Encode(), nil, nil); code != 200 {
		t.Fatalf("remove: %d %q", code, body)
	}
	ts.register(t, "hostclient", "id_req", "reused-id")

	good := claimsFor(hc, "host", now)
	tampered := func(tok string, claims map[string]any) string {
		parts := strings.Split(tok, ".")
		p, _ := json.Marshal(claims)
		return parts[0] + "." + base64.RawURLEncoding.EncodeToString(p) + "." + parts[2]
	}
	edPub := []byte(is.ed.Public().(ed25519.PublicKey))
	pubPEM := is.pem[:strings.Index(string(is.pem), "-----END PUBLIC KEY-----")+len("-----END PUBLIC KEY-----\n")]

	cases := []struct {
		name   string
		id     string
		tok    string
		q      url.Values
		want   int
		reason string // counted refusal reason, or "ok"
		role   registry.Role
		member string // the member's name once admitted
	}{
		{"router host token, no sock_type", hc, hostTok, nil, 101, "ok", registry.RoleHost, "dev-1"},
		{"router token, sock_type agrees", hc, clientTok, url.Values{"sock_type": {"client"}}, 101, "ok", registry.RoleClient, ""},
		{"name given wins over sub", hc, hostTok, url.Values{"name": {"other"}}, 101, "ok", registry.RoleHost, "other"},
		{"lobby member token", lobby, lobbyTok, nil, 101, "ok", registry.RoleMember, ""},
		{"issuer EdDSA from PEM, by kid", hc, sign(t, jose.EdDSA, is.ed, is.edKid, good), nil, 101, "ok", registry.RoleHost, "dev-1"},
		{"issuer EdDSA without kid", hc, sign(t, jose.EdDSA, is.ed, "", good), nil, 101, "ok", registry.RoleHost, "dev-1"},
		{"issuer ES256 from PEM", hc, sign(t, jose.ES256, is.ec, "", with(good, "sub", "dev-2")), nil, 101, "ok", registry.RoleHost, "dev-2"},
		{"issuer RS256 from JWKS", hc, sign(t, jose.RS256, is.rsa, is.rsaKid, with(good, "sub", "dev-3")), nil, 101, "ok", registry.RoleHost, "dev-3"},
		{"issuer token of this generation", hc, sign(t, jose.EdDSA, is.ed, "", with(good, "sub", "dev-4", "gen", token.Generation(ts.regGen(t, hc)))), nil, 101, "ok", registry.RoleHost, "dev-4"},
		{"aud as a list", hc, sign(t, jose.EdDSA, is.ed, "", with(good, "sub", "dev-5", "aud", []string{"x", "wsrouter"})), nil, 101, "ok", registry.RoleHost, "dev-5"},
		{"expired 30 s ago: within the skew", hc, sign(t, jose.EdDSA, is.ed, "", with(good, "sub", "dev-6", "exp", now.Add(-30*time.Second).Unix())), nil, 101, "ok", registry.RoleHost, "dev-6"},
		{"nbf 30 s ahead: within the skew", hc, sign(t, jose.EdDSA, is.ed, "", with(good, "sub", "dev-8", "nbf", now.Add(30*time.Second).Unix())), nil, 101, "ok", registry.RoleHost, "dev-8"},

		{"wrong registration", other, hostTok, nil, 403, "scope", 0, ""},
		{"wrong role for sock_type", hc, clientTok, url.Values{"sock_type": {"host"}}, 403, "scope", 0, ""},
		{"hostclient token in a lobby", lobby, sign(t, jose.EdDSA, is.ed, "", with(good, "reg", lobby)), nil, 403, "scope", 0, ""},
		{"old generation", "reused-id", oldGen, nil, 403, "scope", 0, ""},
		{"issuer token of another generation", hc, sign(t, jose.EdDSA, is.ed, "", with(good, "gen", "12345")), nil, 403, "scope", 0, ""},
		{"expired beyond the skew", hc, sign(t, jose.EdDSA, is.ed, "", with(good, "exp", now.Add(-61*time.Second).Unix())), nil, 403, "expired", 0, ""},
		{"not yet valid", hc, sign(t, jose.EdDSA, is.ed, "", with(good, "nbf", now.Add(2*time.Minute).Unix())), nil, 403, "not_yet_valid", 0, ""},
		{"issued in the future", hc, sign(t, jose.EdDSA, is.ed, "", with(good, "iat", now.Add(2*time.Minute).Unix())), nil, 403, "not_yet_valid", 0, ""},
		{"no exp", hc, sign(t, jose.EdDSA, is.ed, "", with(good, "exp", nil)), nil, 403, "malformed", 0, ""},
		{"wrong audience", hc, sign(t, jose.EdDSA, is.ed, "", with(good, "aud", "other")), nil, 403, "audience", 0, ""},
		{"no audience", hc, sign(t, jose.EdDSA, is.ed, "", with(good, "aud", nil)), nil, 403, "audience", 0, ""},
		{"alg none", hc, unsigned(good), nil, 403, "algorithm", 0, ""},
		{"HS256 keyed with the public key bytes", hc, sign(t, jose.HS256, edPub, "", good), nil, 403, "algorithm", 0, ""},
		{"HS256 keyed with the PEM", hc, sign(t, jose.HS256, pubPEM, "", good), nil, 403, "algorithm", 0, ""},
		{"RS256 against the Ed25519 key's kid", hc, sign(t, jose.RS256, is.otherRSA, is.edKid, good), nil, 403, "algorithm", 0, ""},
		{"unknown kid", hc, sign(t, jose.EdDSA, is.ed, "who", good), nil, 403, "signature", 0, ""},
		{"unknown key", hc, sign(t, jose.EdDSA, is.otherEdPriv, "", good), nil, 403, "signature", 0, ""},
		{"tampered payload", hc, tampered(clientTok, with(good, "gen", token.Generation(ts.regGen(t, hc)))), nil, 403, "signature", 0, ""},
		{"not a JWT", hc, "not-a-token", nil, 403, "malformed", 0, ""},
		{"sub that is not a name", hc, sign(t, jose.EdDSA, is.ed, "", with(good, "sub", "a b")), nil, 400, "ok", 0, ""},
		{"key and token", hc, hostTok, url.Values{"key": {testKey}}, 400, "", 0, ""},
		{"token too long", hc, strings.Repeat("a", token.MaxLen+1), nil, 403, "malformed", 0, ""},
		{"gen as a number", hc, sign(t, jose.EdDSA, is.ed, "", with(good, "gen", 12345)), nil, 403, "malformed", 0, ""},
		{"exp as a string", hc, sign(t, jose.EdDSA, is.ed, "", with(good, "exp", "tomorrow")), nil, 403, "malformed", 0, ""},
		{"sub too long", hc, sign(t, jose.EdDSA, is.ed, "", with(good, "sub", strings.Repeat("a", 129))), url.Values{"name": {"n"}}, 403, "malformed", 0, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := map[string]float64{}
			for _, r := range append([]token.Reason{"ok"}, token.Reasons...) {
				before[string(r)] = tokenChecks(ts, string(r))
			}
			conn, code := ts.dialToken(t, c.id, c.tok, c.q, nil)
			if code != c.want {
				t.Fatalf("got %d, want %d", code, c.want)
			}
			for r, n := range before {
				want := n
				if r == c.reason {
					want++
				}
				if got := tokenChecks(ts, r); got != want {
					t.Errorf("token checks %s: %v, want %v", r, got, want)
				}
			}
			if conn == nil {
				return
			}
			reg, _ := ts.rt.registry.Get(c.id)
			var found bool
			for _, m := range reg.Members() {
				if m.Role == c.role && m.Name == c.member {
					found = true
				}
			}
			if !found {
				t.Fatalf("no %s member named %q among %v", c.role, c.member, reg.Members())
			}
			conn.Close(websocket.StatusNormalClosure, "")
		})
	}

	// X-Token works as the query parameter does.
	if _, code := ts.dialToken(t, lobby, "", nil, http.Header{"X-Token": {lobbyTok}}); code != 101 {
		t.Fatalf("X-Token: %d", code)
	}

	// The router's own tokens expire by its clock.
	clock.Advance(24*time.Hour + 61*time.Second)
	if _, code := ts.dialToken(t, lobby, lobbyTok, nil, nil); code != 403 {
		t.Fatalf("expired router token: %d", code)
	}
}

func (ts *testServer) regGen(t testing.TB, id string) uint64 {
	t.Helper()
	reg, err := ts.rt.registry.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	return reg.Generation
}

// TestTokenRealClock checks times against the wall clock, with no clock
// injected: the skew is 60 s each way, no more.
func TestTokenRealClock(t *testing.T) {
	is := newIssuer(t)
	ts := newTestServer(t, Config{Tokens: TokenConfig{Issuers: is.keys(t)}, Registry: regCfgKeep()})
	id := ts.register(t, "lobby")
	now := time.Now()
	good := claimsFor(id, "member", now)
	for _, c := range []struct {
		name   string
		claims map[string]any
		want   int
	}{
		{"good", good, 101},
		{"expired 20 s ago", with(good, "exp", now.Add(-20*time.Second).Unix()), 101},
		{"expired 2 min ago", with(good, "exp", now.Add(-2*time.Minute).Unix()), 403},
		{"nbf in 20 s", with(good, "nbf", now.Add(20*time.Second).Unix()), 101},
		{"nbf in 2 min", with(good, "nbf", now.Add(2*time.Minute).Unix()), 403},
	} {
		if _, code := ts.dialToken(t, id, sign(t, jose.EdDSA, is.ed, "", c.claims), nil, nil); code != c.want {
			t.Errorf("%s: %d, want %d", c.name, code, c.want)
		}
	}
	// And a minted token is good now.
	if _, code := ts.dialToken(t, id, ts.mint(t, id, "member", url.Values{"ttl": {"1s"}}), nil, nil); code != 101 {
		t.Fatalf("minted token: %d", code)
	}
}

// TestTokenRefusalsTakeFailedKeyTokens: a refused token is a failed key
// check, and an address out of them is refused even a good token.
func TestTokenRefusalsTakeFailedKeyTokens(t *testing.T) {
	ts := newTestServer(t, Config{RateBadKey: Limit{Rate: 0.001, Burst: 2}, Registry: regCfgKeep()})
	id := ts.register(t, "lobby")
	good := ts.mint(t, id, "member", nil)
	other := ts.register(t, "lobby")
	wrong := ts.mint(t, other, "member", nil)
	for i, want := range []int{403, 403, 429} {
		if _, code := ts.dialToken(t, id, wrong, nil, nil); code != want {
			t.Fatalf("wrong token %d: %d, want %d", i, code, want)
		}
	}
	if _, code := ts.dialToken(t, id, good, nil, nil); code != 429 {
		t.Fatalf("good token while locked out: %d, want 429", code)
	}
}

func TestTokenRelay(t *testing.T) {
	ts := newTestServer(t, Config{Registry: regCfgKeep()})
	id := ts.register(t, "hostclient")
	_, frames := ts.device(t, id, func(f relay.Request) string { return reply(f, map[string]any{"content": "ok"}) })
	client := ts.mint(t, id, "client", nil)
	host := ts.mint(t, id, "host", nil)
	lobby := ts.register(t, "lobby")
	lobbyTok := ts.mint(t, lobby, "member", nil)

	path := func(id string, q url.Values) string { return "/relay/" + id + "/status?" + q.Encode() }
	cases := []struct {
		name string
		path string
		hdr  http.Header
		want int
	}{
		{"client token in the query", path(id, url.Values{"token": {client}, "led": {"on"}}), nil, 200},
		{"client token in X-Token", path(id, url.Values{"led": {"on"}}), http.Header{"X-Token": {client}, "Authorization": {"Basic ZGV2aWNl"}}, 200},
		{"host token", path(id, url.Values{"token": {host}}), nil, 403},
		{"token of a lobby", path(lobby, url.Values{"token": {lobbyTok}}), nil, 403},
		{"key and token", path(id, url.Values{"token": {client}, "key": {testKey}}), nil, 400},
		{"garbage", path(id, url.Values{"token": {"x.y.z"}}), nil, 403},
	}
	for _, c := range cases {
		code, body, _ := ts.do(t, http.MethodGet, c.path, nil, c.hdr)
		if code != c.want {
			t.Fatalf("%s: %d %q, want %d", c.name, code, body, c.want)
		}
		if code != 200 {
			continue
		}
		f := <-frames
		if _, ok := f.Query["token"]; ok || f.Query["led"] == nil {
			t.Errorf("%s: query forwarded as %v", c.name, f.Query)
		}
		if _, ok := f.Headers["X-Token"]; ok {
			t.Errorf("%s: X-Token forwarded", c.name)
		}
		if c.hdr.Get("Authorization") != "" && f.Headers["Authorization"] != c.hdr.Get("Authorization") {
			t.Errorf("%s: Authorization not passed to the device: %v", c.name, f.Headers)
		}
	}
}

// TestTokenIssuerRotation: replacing the issuer's keys refuses the old
// key's tokens and closes the members they admitted with 1008; members
// admitted otherwise stay.
func TestTokenIssuerRotation(t *testing.T) {
	is := newIssuer(t)
	ts := newTestServer(t, Config{Tokens: TokenConfig{Issuers: is.keys(t)}, Registry: regCfgKeep()})
	id := ts.register(t, "lobby")
	issued, code := ts.dialToken(t, id, sign(t, jose.EdDSA, is.ed, "", claimsFor(id, "member", time.Now())), nil, nil)
	if code != 101 {
		t.Fatalf("issuer token: %d", code)
	}
	routers, _ := ts.dialToken(t, id, ts.mint(t, id, "member", nil), nil, nil)
	keyed := ts.dial(t, id, "")

	// The new set keeps only the RSA key.
	next, err := token.ParseKeys(is.jwks)
	if err != nil {
		t.Fatal(err)
	}
	if n := ts.rt.SetTokenIssuers(next); n != 1 {
		t.Fatalf("closed %d members, want 1", n)
	}
	if code, reason := closeStatus(t, issued); code != codePolicy || reason != "credentials revoked" {
		t.Fatalf("issuer's member closed with %d %q, want 1008", code, reason)
	}
	if _, code := ts.dialToken(t, id, sign(t, jose.EdDSA, is.ed, "", claimsFor(id, "member", time.Now())), nil, nil); code != 403 {
		t.Fatalf("dropped key's token: %d, want 403", code)
	}
	// The others still hear each other.
	write(t, routers, "still here")
	expectNext(t, keyed, "still here")

	// A new key under an old kid is another key: its predecessor's
	// members go too.
	jwks := func(k *rsa.PrivateKey) *token.KeySet {
		b, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &k.PublicKey, KeyID: "k1"}}})
		ks, err := token.ParseKeys(b)
		if err != nil {
			t.Fatal(err)
		}
		return ks
	}
	ts.rt.SetTokenIssuers(jwks(is.rsa))
	old, code := ts.dialToken(t, id, sign(t, jose.RS256, is.rsa, "k1", claimsFor(id, "member", time.Now())), nil, nil)
	if code != 101 {
		t.Fatalf("kid k1, first key: %d", code)
	}
	if n := ts.rt.SetTokenIssuers(jwks(is.otherRSA)); n != 1 {
		t.Fatalf("a new key under kid k1 closed %d members, want 1", n)
	}
	if code, _ := closeStatus(t, old); code != codePolicy {
		t.Fatalf("the old key's member: %d, want 1008", code)
	}
}
