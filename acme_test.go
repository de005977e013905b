package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/letsencrypt/pebble/v2/ca"
	"github.com/letsencrypt/pebble/v2/db"
	"github.com/letsencrypt/pebble/v2/va"
	"github.com/letsencrypt/pebble/v2/wfe"
	"github.com/miekg/dns"
)

// The ACME tests run the whole ACME flow against pebble, Let's Encrypt's
// test CA, in-process on loopback: account, order, challenge validated by
// pebble's VA against the running wsrouter, certificate, and a handshake that
// chains to pebble's root. Only the CA is a stand-in; wsrouter's side is the
// production code path.

// testDomain resolves to 127.0.0.1 through testDNS. It needs a dot:
// autocert refuses single-label names such as localhost.
const testDomain = "wsrouter.test"

// testDNS serves DNS on a loopback TCP port (pebble's VA asks over TCP),
// answering every A query with 127.0.0.1 and every other one with nothing.
func testDNS(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{Listener: ln, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		for _, question := range q.Question {
			if question.Qtype == dns.TypeA {
				m.Answer = append(m.Answer, &dns.A{
					Hdr: dns.RR_Header{Name: question.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60},
					A:   net.IPv4(127, 0, 0, 1),
				})
			}
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	return ln.Addr().String()
}

// lockedBuffer collects pebble's log, which its goroutines write to.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// pebbleCA is pebble's ACME server on a loopback https port. Its directory
// URL exists from the start; the CA behind it is made by start, because
// pebble's VA must be told the ports to validate on, which are known only
// once wsrouter listens.
type pebbleCA struct {
	directory string // ACME directory URL
	tlsRoots  string // PEM file: the ACME server's own TLS certificate

	logs *lockedBuffer // pebble's log, once started

	mu      sync.Mutex
	handler http.Handler // nil: answers 503; guarded by mu
	root    *x509.Certificate
}

func newPebbleCA(t *testing.T) *pebbleCA {
	t.Helper()
	// No random validation delays and no bad-nonce injection (the acme
	// client retries those, but they would only make the test slower).
	t.Setenv("PEBBLE_VA_NOSLEEP", "1")
	t.Setenv("PEBBLE_WFE_NONCEREJECT", "0")
	t.Setenv("PEBBLE_AUTHZREUSE", "0")

	p := &pebbleCA{}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		h := p.handler
		p.mu.Unlock()
		if h == nil {
			http.Error(w, "CA not running", http.StatusServiceUnavailable)
			return
		}
		h.ServeHTTP(w, r)
	}))
	srv.StartTLS()
	t.Cleanup(srv.Close)
	p.directory = srv.URL + wfe.DirectoryPath
	p.tlsRoots = filepath.Join(t.TempDir(), "acme-server-roots.pem")
	writePEM(t, p.tlsRoots, "CERTIFICATE", srv.Certificate().Raw)
	return p
}

// start runs the CA; its VA validates HTTP-01 on httpPort and TLS-ALPN-01
// on tlsPort, resolving names with the DNS server at dnsAddr.
func (p *pebbleCA) start(t *testing.T, httpPort, tlsPort int, dnsAddr string) {
	t.Helper()
	p.logs = &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pebble's log:\n%s", p.logs)
		}
	})
	logger := log.New(p.logs, "pebble ", log.Lmicroseconds)
	store := db.NewMemoryStore()
	authority := ca.New(logger, store, "", "ecdsa", 0, 1, map[string]ca.Profile{"default": {Description: "default"}})
	validator := va.New(logger, httpPort, tlsPort, false, dnsAddr, store)
	front := wfe.New(logger, store, validator, authority, []string{"pebble.letsencrypt.org"}, false, false, 0, 0)
	p.mu.Lock()
	p.handler = front.Handler()
	p.root = authority.GetRootCert(0).Cert
	p.mu.Unlock()
}

func (p *pebbleCA) stop() {
	p.mu.Lock()
	p.handler = nil
	p.mu.Unlock()
}

// deadPort is a loopback port that accepts connections and closes them at
// once, so that a challenge validated there fails fast.
func deadPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}

func portOf(t *testing.T, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// httpsTo is a client that reaches addr whatever the URL's host, and trusts
// only roots.
func httpsTo(addr string, roots *x509.CertPool) *http.Client {
	return &http.Client{
		Timeout: 60 * time.Second, // the first handshake waits for the certificate
		Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: roots},
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, network, addr)
			},
		},
	}
}

func TestACMEWithPebble(t *testing.T) {
	tests := []struct {
		name string
		// Which of wsrouter's ports pebble's VA validates on; the other
		// challenge goes to a dead port, so a certificate proves that this
		// one worked. autocert tries TLS-ALPN-01 first and falls back to
		// HTTP-01 with a new order.
		http01 bool
	}{
		{name: "http-01", http01: true},
		{name: "tls-alpn-01", http01: false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dnsAddr := testDNS(t)
			pebble := newPebbleCA(t)
			cache := filepath.Join(t.TempDir(), "acme")
			args := []string{
				"-acme-domains", testDomain,
				"-acme-email", "ops@example.com",
				"-acme-directory", pebble.directory,
				"-acme-ca-roots", pebble.tlsRoots,
				"-acme-cache", cache,
				"-http-addr", "127.0.0.1:0",
			}
			base, lines, stop := startProgram(t, args...)
			httpsAddr := strings.TrimPrefix(base, "http://")
			httpAddr := waitLog(t, lines, "redirecting http to https")["addr"].(string)
			httpPort, tlsPort := portOf(t, httpAddr), deadPort(t)
			if !tt.http01 {
				httpPort, tlsPort = deadPort(t), portOf(t, httpsAddr)
			}
			pebble.start(t, httpPort, tlsPort, dnsAddr)

			roots := x509.NewCertPool()
			roots.AddCert(pebble.root)
			client := httpsTo(httpsAddr, roots)
			httpsURL := "https://" + net.JoinHostPort(testDomain, strconv.Itoa(portOf(t, httpsAddr)))
			resp, err := client.Get(httpsURL + "/healthz")
			if err != nil {
				t.Fatalf("GET /healthz over https (certificate from pebble): %v", err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || string(body) != "ok" {
				t.Fatalf("GET /healthz: got %d %q, want 200 ok", resp.StatusCode, body)
			}
			leaf := resp.TLS.PeerCertificates[0]
			if err := leaf.VerifyHostname(testDomain); err != nil {
				t.Errorf("served certificate: %v", err)
			}
			chain := resp.TLS.VerifiedChains[0]
			if !chain[len(chain)-1].Equal(pebble.root) {
				t.Errorf("served certificate chains to %q, want pebble's root %q",
					chain[len(chain)-1].Subject, pebble.root.Subject)
			}
			// pebble's own account of the validation agrees.
			want := "Attempting to validate w/ HTTP: http://" + net.JoinHostPort(testDomain, strconv.Itoa(httpPort))
			if got := strings.Contains(pebble.logs.String(), want); got != tt.http01 {
				t.Errorf("pebble's log has %q: got %v, want %v", want, got, tt.http01)
			}
			rec := waitLog(t, lines, "acme: serving certificate")
			if rec["domain"] != testDomain {
				t.Errorf("log: got domain %v, want %s", rec["domain"], testDomain)
			}
			// The account key and the certificate are in the cache.
			for _, name := range []string{"acme_account+key", testDomain} {
				if _, err := os.Stat(filepath.Join(cache, name)); err != nil {
					t.Errorf("cache: %v", err)
				}
			}

			// Only the listed domain gets a certificate.
			_, err = tls.Dial("tcp", httpsAddr, &tls.Config{RootCAs: roots, ServerName: "other.test"})
			if err == nil {
				t.Error("handshake for a domain not in -acme-domains succeeded")
			}

			// Plain HTTP: redirected to https, except challenge paths.
			plain := []struct {
				host, path string
				wantCode   int
				wantLoc    string
			}{
				{testDomain, "/healthz", http.StatusPermanentRedirect, httpsURL + "/healthz"},
				{testDomain, "/.well-known/acme-challenge/unknown", http.StatusNotFound, ""},
				{"other.test", "/.well-known/acme-challenge/unknown", http.StatusForbidden, ""},
			}
			for _, p := range plain {
				req, _ := http.NewRequest(http.MethodGet, "http://"+httpAddr+p.path, nil)
				req.Host = p.host
				if p.wantLoc != "" {
					req.Host = net.JoinHostPort(p.host, strconv.Itoa(portOf(t, httpAddr)))
				}
				resp, err := noRedirects.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode != p.wantCode || resp.Header.Get("Location") != p.wantLoc {
					t.Errorf("GET http://%s%s: got %d to %q, want %d to %q",
						req.Host, p.path, resp.StatusCode, resp.Header.Get("Location"), p.wantCode, p.wantLoc)
				}
			}

			if err := stop(); err != nil {
				t.Fatalf("run returned %v, want nil", err)
			}
			if !tt.http01 {
				return
			}

			// A restart serves the cached certificate without asking the
			// CA, which is down now.
			pebble.stop()
			base, _, _ = startProgram(t, args...)
			httpsAddr = strings.TrimPrefix(base, "http://")
			httpsURL = "https://" + net.JoinHostPort(testDomain, strconv.Itoa(portOf(t, httpsAddr)))
			resp, err = httpsTo(httpsAddr, roots).Get(httpsURL + "/healthz")
			if err != nil {
				t.Fatalf("after a restart with the CA down: %v", err)
			}
			resp.Body.Close()
			if got := resp.TLS.PeerCertificates[0]; !got.Equal(leaf) {
				t.Errorf("after a restart: got certificate serial %v, want the cached %v", got.SerialNumber, leaf.SerialNumber)
			}
		})
	}
}
