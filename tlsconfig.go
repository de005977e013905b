package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
)

// tlsOptions are the flags that turn on HTTPS, from certificate files or
// from an ACME CA. The zero value serves plain HTTP.
type tlsOptions struct {
	certFile, keyFile string

	acmeDomains   []string // from -acme-domains; empty: no ACME
	acmeEmail     string
	acmeDirectory string
	acmeCache     string
	acmeCARoots   string // PEM file; empty: the system's roots

	// httpAddr is where plain HTTP is answered (ACME HTTP-01 challenges
	// and a redirect to https); empty: nowhere. parseFlags resolves the
	// flag's default and "off".
	httpAddr string
}

// letsEncrypt is the default -acme-directory: Let's Encrypt's production CA.
const letsEncrypt = "https://acme-v02.api.letsencrypt.org/directory"

// resolve checks the TLS flags, which only make sense in certain
// combinations, and fills in what their defaults depend on. fs must have been
// parsed and had applyEnv applied, so that Visit sees every flag that is set.
func (tc *tlsOptions) resolve(fs *flag.FlagSet, domains string) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })

	for d := range strings.SplitSeq(domains, ",") {
		d = strings.ToLower(strings.TrimSpace(d))
		if d == "" {
			continue
		}
		// autocert refuses names without a dot at handshake time, and no
		// CA validates a wildcard over HTTP-01 or TLS-ALPN-01: better to
		// say so now than on the first client's handshake.
		if strings.ContainsAny(d, "*:/ ") || !strings.Contains(strings.Trim(d, "."), ".") || net.ParseIP(d) != nil {
			return fmt.Errorf("-acme-domains %q: want host names such as ws.example.com (no wildcard, port, scheme or IP address)", d)
		}
		tc.acmeDomains = append(tc.acmeDomains, strings.TrimSuffix(d, "."))
	}
	useACME := len(tc.acmeDomains) > 0

	switch {
	case (tc.certFile == "") != (tc.keyFile == ""):
		return errors.New("-tls-cert and -tls-key go together")
	case tc.certFile != "" && useACME:
		return errors.New("-tls-cert/-tls-key and -acme-domains exclude each other")
	}
	if !useACME {
		// A forgotten -acme-domains must not quietly serve plain HTTP.
		for _, name := range []string{"acme-email", "acme-directory", "acme-cache", "acme-ca-roots"} {
			if set[name] {
				return fmt.Errorf("-%s needs -acme-domains", name)
			}
		}
	} else if u, err := url.Parse(tc.acmeDirectory); err != nil || u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("-acme-directory %q: want an https:// URL", tc.acmeDirectory)
	}

	switch {
	case tc.httpAddr == "off":
		tc.httpAddr = ""
	case tc.httpAddr == "" && useACME:
		tc.httpAddr = ":80"
	case tc.httpAddr != "" && tc.certFile == "" && !useACME:
		return errors.New("-http-addr redirects to https: it needs -tls-cert or -acme-domains")
	}
	return nil
}

// load reads the certificate files or sets up ACME. It returns the TLS
// configuration for -addr (nil: plain HTTP) and what wraps the -http-addr
// redirect (ACME's HTTP-01 challenge responder, or nothing).
func (tc *tlsOptions) load(log *slog.Logger) (*tls.Config, func(redirect http.Handler) http.Handler, error) {
	switch {
	case tc.certFile != "":
		cert, err := tls.LoadX509KeyPair(tc.certFile, tc.keyFile)
		if err != nil {
			return nil, nil, fmt.Errorf("-tls-cert/-tls-key: %w", err)
		}
		if time.Now().After(cert.Leaf.NotAfter) {
			log.Warn("tls certificate has expired", "file", tc.certFile, "not_after", cert.Leaf.NotAfter)
		}
		conf := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		return conf, func(h http.Handler) http.Handler { return h }, nil
	case len(tc.acmeDomains) > 0:
		return tc.loadACME(log)
	}
	return nil, nil, nil
}

func (tc *tlsOptions) loadACME(log *slog.Logger) (*tls.Config, func(http.Handler) http.Handler, error) {
	client := &acme.Client{DirectoryURL: tc.acmeDirectory, UserAgent: "wsrouter"}
	if tc.acmeCARoots != "" {
		b, err := os.ReadFile(tc.acmeCARoots)
		if err != nil {
			return nil, nil, fmt.Errorf("-acme-ca-roots: %w", err)
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(b) {
			return nil, nil, fmt.Errorf("-acme-ca-roots %s: no PEM certificate in it", tc.acmeCARoots)
		}
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
		client.HTTPClient = &http.Client{Transport: tr}
	}
	// An unwritable cache (ProtectSystem=strict without a StateDirectory,
	// say) would otherwise show only at the first handshake, and without a
	// cache every restart asks the CA again, into its rate limits.
	if err := os.MkdirAll(tc.acmeCache, 0o700); err != nil {
		return nil, nil, fmt.Errorf("-acme-cache: %w", err)
	}
	probe, err := os.CreateTemp(tc.acmeCache, ".probe-*")
	if err != nil {
		return nil, nil, fmt.Errorf("-acme-cache: %w", err)
	}
	probe.Close()
	os.Remove(probe.Name())

	whitelist := autocert.HostWhitelist(tc.acmeDomains...)
	m := &autocert.Manager{
		// Setting -acme-domains is the operator's acceptance of the CA's
		// terms of service; README says so.
		Prompt: autocert.AcceptTOS,
		Cache:  autocert.DirCache(tc.acmeCache),
		Email:  tc.acmeEmail,
		Client: client,
		// HTTP-01 requests are checked against the policy by their Host
		// header, which carries a port when the CA validates on one other
		// than 80 (a test CA such as pebble); HostWhitelist compares whole
		// strings, so the port would refuse them.
		HostPolicy: func(ctx context.Context, host string) error {
			if h, _, err := net.SplitHostPort(host); err == nil {
				host = h
			}
			return whitelist(ctx, strings.ToLower(host))
		},
	}
	conf := m.TLSConfig() // with acme-tls/1 in NextProtos, for TLS-ALPN-01
	conf.MinVersion = tls.VersionTLS12
	cl := &certLog{log: log, domains: tc.acmeDomains, last: map[string]string{}}
	conf.GetCertificate = cl.wrap(m.GetCertificate)
	return conf, m.HTTPHandler, nil
}

// certLog tells the operator what ACME does for the configured domains:
// each certificate when it is first served, and why there is none. The
// handshakes of other names (scanners, clients without SNI) stay in the
// http.Server's debug-level error log.
type certLog struct {
	log     *slog.Logger
	domains []string

	mu   sync.Mutex
	last map[string]string // domain → what was logged last: serial or error text; guarded by mu
}

func (cl *certLog) wrap(get func(*tls.ClientHelloInfo) (*tls.Certificate, error)) func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
		cert, err := get(hello)
		name := strings.TrimSuffix(strings.ToLower(hello.ServerName), ".")
		challenge := slices.Equal(hello.SupportedProtos, []string{acme.ALPNProto})
		if challenge || !slices.Contains(cl.domains, name) {
			return cert, err
		}
		// Log once per change, not per handshake: while the CA fails,
		// autocert answers every handshake with the same error for a
		// minute, and then again.
		what := ""
		switch {
		case err != nil:
			what = "error " + err.Error()
		case cert.Leaf != nil:
			what = cert.Leaf.PublicKeyAlgorithm.String() + " " + cert.Leaf.SerialNumber.String()
		}
		cl.mu.Lock()
		changed := what != "" && cl.last[name] != what
		cl.last[name] = what
		cl.mu.Unlock()
		switch {
		case !changed:
		case err != nil:
			cl.log.Warn("acme: no certificate", "domain", name, "err", err)
		default:
			cl.log.Info("acme: serving certificate", "domain", name, "issuer", cert.Leaf.Issuer.CommonName, "not_after", cert.Leaf.NotAfter)
		}
		return cert, err
	}
}

// redirectHTTPS answers plain HTTP with a redirect to the same host and
// path on https at port httpsPort. Only GET and HEAD without credentials are
// redirected: any other request has already sent its body, and maybe its
// keys, in the clear, and one with a key, host key or token in its query or
// headers has already given it away. Redirected, it would work, echo the key
// in a Location header and teach its client that http:// is fine; it had
// better fail loudly, with a body that repeats nothing of the request.
func redirectHTTPS(httpsPort string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if (r.Method != http.MethodGet && r.Method != http.MethodHead) || hasCredentials(r) {
			http.Error(w, "use https", http.StatusBadRequest)
			return
		}
		host := r.Host
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
		if host == "" {
			http.Error(w, "use https", http.StatusBadRequest)
			return
		}
		if httpsPort != "443" {
			host = net.JoinHostPort(host, httpsPort)
		} else if strings.Contains(host, ":") {
			host = "[" + host + "]"
		}
		http.Redirect(w, r, "https://"+host+r.URL.RequestURI(), http.StatusPermanentRedirect)
	})
}

// credentialParams are the query parameters that carry a secret.
var credentialParams = []string{"key", "host_key", "token"}

// credentialHeaders are the headers that carry a secret.
var credentialHeaders = []string{"X-Key", "X-Host-Key", "X-Token", "Authorization"}

// hasCredentials reports whether r carries a key, host key or token in its
// query or headers. It reads the raw query itself rather than through
// url.ParseQuery, which drops a pair it cannot decode ("key=%zz") or that
// follows a semicolon, and would let such a key through to a redirect.
func hasCredentials(r *http.Request) bool {
	for _, h := range credentialHeaders {
		if _, ok := r.Header[h]; ok {
			return true
		}
	}
	for pair := range strings.FieldsFuncSeq(r.URL.RawQuery, func(c rune) bool { return c == '&' || c == ';' }) {
		name, _, _ := strings.Cut(pair, "=")
		if n, err := url.QueryUnescape(name); err == nil {
			name = n
		}
		if slices.Contains(credentialParams, name) {
			return true
		}
	}
	return false
}
