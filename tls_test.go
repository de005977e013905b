package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// selfSigned writes a self-signed certificate for names (host names or IP
// addresses) and its key into dir, and returns the two files and a pool
// that trusts the certificate.
func selfSigned(t *testing.T, dir string, names ...string) (certFile, keyFile string, roots *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: names[0]},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	writePEM(t, certFile, "CERTIFICATE", der)
	writePEM(t, keyFile, "PRIVATE KEY", keyDER)
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots = x509.NewCertPool()
	roots.AddCert(cert)
	return certFile, keyFile, roots
}

func writePEM(t *testing.T, file, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// waitLog reads the program's log lines until one has message msg, and
// returns it.
func waitLog(t *testing.T, lines <-chan string, msg string) map[string]any {
	t.Helper()
	timeout := time.After(60 * time.Second)
	for {
		select {
		case line, ok := <-lines:
			if !ok {
				t.Fatalf("log ended before %q", msg)
			}
			var rec map[string]any
			if json.Unmarshal([]byte(line), &rec) == nil && rec["msg"] == msg {
				return rec
			}
		case <-timeout:
			t.Fatalf("no log line %q", msg)
		}
	}
}

// noRedirects is a client that returns redirects instead of following them.
var noRedirects = &http.Client{
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	Timeout:       10 * time.Second,
}

func TestTLSFromFiles(t *testing.T) {
	certFile, keyFile, roots := selfSigned(t, t.TempDir(), "localhost", "127.0.0.1", "::1")
	base, lines, stop := startProgram(t, "-tls-cert", certFile, "-tls-key", keyFile,
		"-http-addr", "127.0.0.1:0", "-bcrypt-cost", "4")
	if rec := waitLog(t, lines, "listening"); rec["tls"] != "files" {
		t.Errorf("listening log: got tls=%v, want files", rec["tls"])
	}
	httpAddr := waitLog(t, lines, "redirecting http to https")["addr"].(string)
	hostPort := strings.TrimPrefix(base, "http://")
	base = "https://" + hostPort

	// coder/websocket wants the client without a timeout; the context
	// bounds every call instead.
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: roots},
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	get := func(url string) (*http.Response, string) {
		t.Helper()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, string(b)
	}

	resp, body := get(base + "/healthz")
	if resp.StatusCode != 200 || body != "ok" {
		t.Fatalf("GET /healthz over https: got %d %q, want 200 ok", resp.StatusCode, body)
	}
	if resp.TLS == nil || resp.TLS.Version < tls.VersionTLS12 || len(resp.TLS.VerifiedChains) == 0 {
		t.Fatalf("GET /healthz: got TLS state %+v, want a verified TLS 1.2+ connection", resp.TLS)
	}

	// The certificate is served whatever name the client asks for.
	conn, err := tls.Dial("tcp", hostPort, &tls.Config{RootCAs: roots, ServerName: "localhost"})
	if err != nil {
		t.Fatalf("handshake as localhost: %v", err)
	}
	conn.Close()

	// Plain HTTP on the TLS port is refused by net/http, not served.
	if resp, err := http.Get("http://" + hostPort + "/healthz"); err != nil {
		t.Fatal(err)
	} else {
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("plain HTTP to the https port: got %d, want 400", resp.StatusCode)
		}
	}

	// A lobby over https and wss.
	q := url.Values{"key": {"k"}, "host_key": {"hk"}, "reg_type": {"lobby"}}
	resp, id := get(base + "/register?" + q.Encode())
	if resp.StatusCode != 200 {
		t.Fatalf("register over https: got %d %q, want 200", resp.StatusCode, id)
	}
	join := "wss://" + hostPort + "/connect?" + url.Values{"id": {id}, "key": {"k"}}.Encode()
	opts := &websocket.DialOptions{HTTPClient: client}
	a, _, err := websocket.Dial(ctx, join, opts)
	if err != nil {
		t.Fatalf("dial wss: %v", err)
	}
	defer a.CloseNow()
	b, _, err := websocket.Dial(ctx, join, opts)
	if err != nil {
		t.Fatalf("dial wss: %v", err)
	}
	defer b.CloseNow()
	for _, dir := range []struct {
		name     string
		from, to *websocket.Conn
	}{{"a to b", a, b}, {"b to a", b, a}} {
		msg := "over tls, " + dir.name
		if err := dir.from.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			t.Fatal(err)
		}
		if _, got, err := dir.to.Read(ctx); err != nil || string(got) != msg {
			t.Fatalf("%s: got %q %v, want %q", dir.name, got, err, msg)
		}
	}

	// -http-addr only redirects, also without ACME.
	resp, err = noRedirects.Get("http://" + httpAddr + "/healthz?x=1")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	_, port, _ := net.SplitHostPort(hostPort)
	want := "https://127.0.0.1:" + port + "/healthz?x=1"
	if resp.StatusCode != http.StatusPermanentRedirect || resp.Header.Get("Location") != want {
		t.Errorf("GET on -http-addr: got %d to %q, want 308 to %q", resp.StatusCode, resp.Header.Get("Location"), want)
	}
	// Not with a key in it: that is refused, and the key not repeated.
	resp, err = noRedirects.Get("http://" + httpAddr + "/connect?" + join[strings.Index(join, "?")+1:])
	if err != nil {
		t.Fatal(err)
	}
	refusal, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || string(refusal) != "use https\n" || resp.Header.Get("Location") != "" {
		t.Errorf("GET with a key on -http-addr: got %d %q to %q, want 400 \"use https\" and no redirect", resp.StatusCode, refusal, resp.Header.Get("Location"))
	}

	// Shutdown still closes members with 1001 over TLS, and run returns
	// nil with both servers stopped.
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	for _, c := range []*websocket.Conn{a, b} {
		if _, _, err := c.Read(ctx); websocket.CloseStatus(err) != websocket.StatusGoingAway {
			t.Errorf("got close %v, want 1001", err)
		}
	}
	if err := <-stopped; err != nil {
		t.Fatalf("run returned %v, want nil", err)
	}
	if _, err := net.DialTimeout("tcp", httpAddr, time.Second); err == nil {
		t.Error("-http-addr still accepts connections after run returned")
	}
}

func TestTLSRedirect(t *testing.T) {
	tests := []struct {
		name, method, host, target, port string
		header                           string // sent with the value "s3cret"
		wantCode                         int
		wantLocation                     string
	}{
		{"port kept off 443", "GET", "ws.example.com", "/healthz?a=1", "8443", "", 308, "https://ws.example.com:8443/healthz?a=1"},
		{"no port for 443", "GET", "ws.example.com", "/x", "443", "", 308, "https://ws.example.com/x"},
		{"http port dropped", "HEAD", "ws.example.com:80", "/", "443", "", 308, "https://ws.example.com/"},
		{"ipv6 with port", "GET", "[::1]:8080", "/", "8443", "", 308, "https://[::1]:8443/"},
		{"ipv6 on 443", "GET", "[::1]", "/", "443", "", 308, "https://[::1]/"},
		{"post refused", "POST", "ws.example.com", "/register", "443", "", 400, ""},
		{"no host", "GET", "", "/", "443", "", 400, ""},
		// Credentials sent in the clear are refused, never redirected.
		{"key in query", "GET", "ws.example.com", "/connect?id=a&key=s3cret", "443", "", 400, ""},
		{"host_key in query", "GET", "ws.example.com", "/remove?id=a&host_key=s3cret", "443", "", 400, ""},
		{"token in query", "HEAD", "ws.example.com", "/relay/a/x?token=s3cret", "443", "", 400, ""},
		{"empty key", "GET", "ws.example.com", "/connect?key=", "443", "", 400, ""},
		{"escaped name", "GET", "ws.example.com", "/connect?k%65y=s3cret", "443", "", 400, ""},
		{"undecodable value", "GET", "ws.example.com", "/connect?key=s3cret%zz", "443", "", 400, ""},
		{"after a semicolon", "GET", "ws.example.com", "/connect?a=1;key=s3cret", "443", "", 400, ""},
		{"X-Key header", "GET", "ws.example.com", "/relay/a/", "443", "X-Key", 400, ""},
		{"X-Host-Key header", "GET", "ws.example.com", "/remove?id=a", "443", "X-Host-Key", 400, ""},
		{"X-Token header", "GET", "ws.example.com", "/relay/a/", "443", "X-Token", 400, ""},
		{"Authorization header", "GET", "ws.example.com", "/stats", "443", "Authorization", 400, ""},
		{"names that only contain key", "GET", "ws.example.com", "/x?monkey=1&keys=2&key_=3", "443", "", 308, "https://ws.example.com/x?monkey=1&keys=2&key_=3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest(tt.method, tt.target, nil)
			r.Host = tt.host
			if tt.header != "" {
				r.Header.Set(tt.header, "s3cret")
			}
			w := httptest.NewRecorder()
			redirectHTTPS(tt.port).ServeHTTP(w, r)
			if w.Code != tt.wantCode || w.Header().Get("Location") != tt.wantLocation {
				t.Errorf("got %d to %q, want %d to %q", w.Code, w.Header().Get("Location"), tt.wantCode, tt.wantLocation)
			}
			if tt.wantCode == 400 {
				if body := w.Body.String(); body != "use https\n" {
					t.Errorf("body: got %q, want %q", body, "use https\n")
				}
			}
			for name, vs := range w.Header() {
				if strings.Contains(strings.Join(vs, " "), "s3cret") {
					t.Errorf("header %s echoes the secret: %q", name, vs)
				}
			}
		})
	}
}

func TestTLSFlags(t *testing.T) {
	t.Setenv("WSROUTER_ACME_DOMAINS", " WS.example.com, b.example.com.,")
	o, err := parseFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.Join(o.tls.acmeDomains, "|"), "ws.example.com|b.example.com"; got != want {
		t.Errorf("domains from the environment: got %q, want %q", got, want)
	}
	tests := []struct {
		name      string
		got, want string
	}{
		{"http-addr default with ACME", o.tls.httpAddr, ":80"},
		{"directory default", o.tls.acmeDirectory, "https://acme-v02.api.letsencrypt.org/directory"},
		{"cache default", o.tls.acmeCache, "certs/acme"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s: got %q, want %q", tt.name, tt.got, tt.want)
		}
	}

	o, err = parseFlags([]string{"-http-addr", "off"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.tls.httpAddr != "" {
		t.Errorf("-http-addr off: got %q, want none", o.tls.httpAddr)
	}
	t.Setenv("WSROUTER_ACME_DOMAINS", "")
	o, err = parseFlags([]string{"-tls-cert", "c.pem", "-tls-key", "k.pem"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.tls.httpAddr != "" {
		t.Errorf("-tls-cert without -http-addr: got http-addr %q, want none", o.tls.httpAddr)
	}
}

func TestTLSFlagErrors(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, _ := selfSigned(t, dir, "localhost")
	otherDir := t.TempDir()
	_, otherKey, _ := selfSigned(t, otherDir, "localhost")
	notPEM := filepath.Join(dir, "not.pem")
	os.WriteFile(notPEM, []byte("hello"), 0o600)
	acme := []string{"-acme-domains", "ws.example.com"}

	tests := []struct {
		name string
		env  [2]string
		args []string
		want string // in the error
	}{
		{name: "cert without key", args: []string{"-tls-cert", certFile}, want: "go together"},
		{name: "key without cert", env: [2]string{"WSROUTER_TLS_KEY", keyFile}, want: "go together"},
		{name: "files and ACME", args: append([]string{"-tls-cert", certFile, "-tls-key", keyFile}, acme...), want: "exclude each other"},
		{name: "email without domains", args: []string{"-acme-email", "ops@example.com"}, want: "-acme-email needs -acme-domains"},
		{name: "cache without domains", env: [2]string{"WSROUTER_ACME_CACHE", dir}, want: "-acme-cache needs -acme-domains"},
		{name: "http-addr without TLS", args: []string{"-http-addr", "127.0.0.1:0"}, want: "needs -tls-cert or -acme-domains"},
		{name: "single-label domain", args: []string{"-acme-domains", "localhost"}, want: "-acme-domains"},
		{name: "wildcard domain", args: []string{"-acme-domains", "*.example.com"}, want: "-acme-domains"},
		{name: "domain with port", args: []string{"-acme-domains", "ws.example.com:443"}, want: "-acme-domains"},
		{name: "IP as domain", args: []string{"-acme-domains", "192.0.2.1"}, want: "-acme-domains"},
		{name: "plain-http directory", args: append([]string{"-acme-directory", "http://ca.example.com/dir"}, acme...), want: "https://"},
		{name: "missing cert file", args: []string{"-tls-cert", filepath.Join(dir, "none.pem"), "-tls-key", keyFile}, want: "none.pem"},
		{name: "key of another cert", args: []string{"-tls-cert", certFile, "-tls-key", otherKey}, want: "-tls-cert/-tls-key"},
		{name: "missing CA roots", args: append([]string{"-acme-ca-roots", filepath.Join(dir, "none.pem"), "-acme-cache", dir}, acme...), want: "-acme-ca-roots"},
		{name: "CA roots not PEM", args: append([]string{"-acme-ca-roots", notPEM, "-acme-cache", dir}, acme...), want: "no PEM certificate"},
		{name: "cache under a file", args: append([]string{"-acme-cache", filepath.Join(notPEM, "acme")}, acme...), want: "-acme-cache"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.env[0] != "" {
				t.Setenv(tt.env[0], tt.env[1])
			}
			err := run(t.Context(), append(tt.args, "-addr", "127.0.0.1:0"), io.Discard, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got error %v, want one containing %q", err, tt.want)
			}
		})
	}
}
