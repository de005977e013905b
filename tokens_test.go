package main

import (
	"context"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/pem"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"wsrouter/router/token"
)

// mint asks base for a member token of the lobby id made by register.
func mint(t *testing.T, base, id string) string {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, base+"/token?"+url.Values{"id": {id}, "role": {"member"}}.Encode(), nil)
	req.Header.Set("X-Host-Key", "h-"+id)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("mint: %d %q", resp.StatusCode, b)
	}
	return string(b)
}

// dialToken connects to id with tok and returns 101 or the refusal's
// status, and the connection (closed with the test).
func dialToken(t *testing.T, base, id, tok string) (int, *websocket.Conn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	u := "ws" + strings.TrimPrefix(base, "http") + "/connect?" + url.Values{"id": {id}, "token": {tok}}.Encode()
	c, resp, err := websocket.Dial(ctx, u, nil)
	if err == nil {
		t.Cleanup(func() { c.CloseNow() })
		return 101, c
	}
	if resp == nil {
		t.Fatalf("dial %s: %v", id, err)
	}
	return resp.StatusCode, nil
}

// TestTokenSurvivesRestart: the generated token key is kept in the data
// file, so a token minted before a restart opens the restored registration
// after it.
func TestTokenSurvivesRestart(t *testing.T) {
	file := filepath.Join(t.TempDir(), "wsrouter.db")
	args := []string{"-data", file, "-bcrypt-cost", "4"}
	base, lines, stop := startProgram(t, args...)
	waitLog(t, lines, "token key generated")
	if code := register(t, base, "fleet"); code != 200 {
		t.Fatalf("register: %d", code)
	}
	tok := mint(t, base, "fleet")
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	base, _, stop = startProgram(t, args...)
	if code, _ := dialToken(t, base, "fleet", tok); code != 101 {
		t.Fatalf("token after a restart: %d, want 101", code)
	}
	stop()

	// Without -data the key dies with the process, and says so.
	base, lines, _ = startProgram(t, "-data", "", "-bcrypt-cost", "4")
	waitLog(t, lines, "token key generated for this process only: its tokens stop working at restart (set -data or -token-key)")
	register(t, base, "fleet")
	if code, _ := dialToken(t, base, "fleet", tok); code != 403 {
		t.Fatalf("another key's token: %d, want 403", code)
	}
}

// TestTokenKeyFile: -token-key signs with the operator's key.
func TestTokenKeyFile(t *testing.T) {
	dir := t.TempDir()
	key := token.GenerateKey()
	file := filepath.Join(dir, "token.pem")
	writePEM(t, file, "PRIVATE KEY", token.MarshalPKCS8(key))
	base, _, _ := startProgram(t, "-data", "", "-bcrypt-cost", "4", "-token-key", file)
	register(t, base, "lobby")
	var v token.Verifier
	if err := v.SetRouter(key.Public().(ed25519.PublicKey)); err != nil {
		t.Fatal(err)
	}
	if c, err := v.Verify(mint(t, base, "lobby")); err != nil || c.Reg != "lobby" {
		t.Fatalf("token not signed by -token-key: %+v %v", c, err)
	}
}

func TestTokenFlagErrors(t *testing.T) {
	dir := t.TempDir()
	notKey := filepath.Join(dir, "not.pem")
	os.WriteFile(notKey, []byte("hello"), 0o600)
	cert, ecKey, _ := selfSigned(t, dir, "localhost") // ECDSA
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"-token-key", notKey}, "-token-key"},
		{[]string{"-token-key", filepath.Join(dir, "missing.pem")}, "-token-key"},
		{[]string{"-token-key", cert}, "-token-key"},
		{[]string{"-token-key", ecKey}, "-token-key"},
		{[]string{"-token-issuer-keys", notKey}, "-token-issuer-keys"},
		{[]string{"-token-issuer-keys", ecKey}, "-token-issuer-keys"}, // a private key
		{[]string{"-token-max-ttl", "0"}, "-token-max-ttl"},
	} {
		err := run(context.Background(), append([]string{"-addr", "127.0.0.1:0", "-data", ""}, c.args...), io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: got %v, want an error naming %s", c.args, err, c.want)
		}
	}
}

// TestTokenIssuerKeysReload: the real binary reloads -token-issuer-keys on
// SIGHUP. A good file replaces the keys, refusing the old key's tokens and
// closing the members they admitted with 1008; a broken one leaves them.
func TestTokenIssuerKeysReload(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "issuer.pem")
	keyA, keyB := token.GenerateKey(), token.GenerateKey()
	writeIssuer := func(keys ...ed25519.PrivateKey) {
		var out []byte
		for _, k := range keys {
			der, _ := x509.MarshalPKIXPublicKey(k.Public())
			out = append(out, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})...)
		}
		if err := os.WriteFile(file, out, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	issue := func(k ed25519.PrivateKey) string {
		s, _ := token.NewSigner(k)
		tok, err := s.Sign(token.Claims{Reg: "room", Role: "member", Expiry: time.Now().Add(time.Hour)})
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	writeIssuer(keyA)
	cmd, base, lines := startBinary(t, "-data", "", "-bcrypt-cost", "4", "-token-issuer-keys", file)
	if code := register(t, base, "room"); code != 200 {
		t.Fatalf("register: %d", code)
	}
	code, memberA := dialToken(t, base, "room", issue(keyA))
	if code != 101 {
		t.Fatalf("issuer key A: %d", code)
	}
	if code, _ := dialToken(t, base, "room", issue(keyB)); code != 403 {
		t.Fatalf("key B before the reload: %d", code)
	}

	writeIssuer(keyB)
	cmd.Process.Signal(syscall.SIGHUP)
	if rec := waitLog(t, lines, "token issuer keys reloaded"); rec["members_closed"] != 1.0 {
		t.Errorf("reload closed %v members, want 1", rec["members_closed"])
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, _, err := memberA.Read(ctx); websocket.CloseStatus(err) != 1008 {
		t.Errorf("key A's member: %v, want closed with 1008", err)
	}
	if code, _ := dialToken(t, base, "room", issue(keyA)); code != 403 {
		t.Errorf("key A after the reload: %d, want 403", code)
	}
	if code, _ := dialToken(t, base, "room", issue(keyB)); code != 101 {
		t.Errorf("key B after the reload: %d, want 101", code)
	}

	os.WriteFile(file, []byte("-----BEGIN PUBLIC KEY-----\ngarbage\n"), 0o600)
	cmd.Process.Signal(syscall.SIGHUP)
	waitLog(t, lines, "token issuer keys not reloaded: keeping the old ones")
	if code, _ := dialToken(t, base, "room", issue(keyB)); code != 101 {
		t.Errorf("key B after a broken reload: %d, want 101", code)
	}
}

// issue is the README's issuer, word for word: it must keep working.
func issue(key ed25519.PrivateKey, reg, name string) (string, error) {
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.EdDSA, Key: key}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return "", err
	}
	now := time.Now()
	return jwt.Signed(sig).Claims(map[string]any{"sub": name, "reg": reg, "role": "host", "aud": "wsrouter",
		"iat": now.Unix(), "exp": now.Add(30 * 24 * time.Hour).Unix()}).Serialize()
}

// TestReadmeIssuer: a token from the README's issuer opens a hostclient
// registration as a named host, with the issuer's public key given as the
// openssl command of the README writes it (PKIX PEM).
func TestReadmeIssuer(t *testing.T) {
	key := token.GenerateKey()
	pub := filepath.Join(t.TempDir(), "issuer.pub")
	der, _ := x509.MarshalPKIXPublicKey(key.Public())
	writePEM(t, pub, "PUBLIC KEY", der)
	base, _, _ := startProgram(t, "-data", "", "-bcrypt-cost", "4", "-token-issuer-keys", pub)
	q := url.Values{"id_req": {"garage-door"}, "key": {"k"}, "host_key": {"h"}, "reg_type": {"hostclient"}}
	if code, body := get(t, base+"/register?"+q.Encode()); code != 200 {
		t.Fatalf("register: %d %q", code, body)
	}
	tok, err := issue(key, "garage-door", "door-1")
	if err != nil {
		t.Fatal(err)
	}
	if code, _ := dialToken(t, base, "garage-door", tok); code != 101 {
		t.Fatalf("README issuer's token: %d", code)
	}
	if code, body := get(t, base+"/members?"+url.Values{"id": {"garage-door"}, "host_key": {"h"}}.Encode()); code != 200 || !strings.Contains(body, `"role":"host","name":"door-1"`) {
		t.Fatalf("members: %d %s", code, body)
	}
}
