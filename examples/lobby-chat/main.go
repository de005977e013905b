// Command lobby-chat serves a one-page browser chat whose rooms are wsrouter
// lobby registrations. The page talks to the router directly; this server
// only hands out the page and tells it where the router is.
//
// Room ids and keys live in the page's URL fragment (#id=…&key=…), which
// browsers never send to any server, so neither this server nor the router
// logs them.
package main

import (
	"context"
	"crypto/rand"
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"html/template"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

//go:embed index.html
var indexHTML string

var page = template.Must(template.New("index").Parse(indexHTML))

func main() {
	addr := flag.String("addr", ":8080", "listen address")
	routerURL := flag.String("router", "http://localhost:8741", "wsrouter base URL as the browser reaches it (http or https)")
	flag.Parse()

	router, err := parseRouter(*routerURL)
	if err != nil {
		log.Fatal(err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	mux := http.NewServeMux()
	mux.Handle("GET /{$}", servePage(router))
	srv := &http.Server{
		Addr:              *addr,
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       time.Minute,
	}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	log.Printf("lobby-chat on %s, router %s", *addr, router)
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Fatal(err)
	}
}

// parseRouter checks that s is an absolute http or https URL and returns it
// without a trailing slash, so the page can append "/register".
func parseRouter(s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("-router: %w", err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("-router %q: want an http or https URL like http://localhost:8741", s)
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	u.RawPath = ""
	return u, nil
}

// servePage renders the page with the router's URL and a fresh nonce for its
// inline script and style. The Content-Security-Policy lets the page run only
// its own code and talk only to the router: chat messages come from strangers,
// and although the page renders them as text, a policy costs nothing.
func servePage(router *url.URL) http.Handler {
	wsScheme := "ws"
	if router.Scheme == "https" {
		wsScheme = "wss"
	}
	connect := router.Scheme + "://" + router.Host + " " + wsScheme + "://" + router.Host

	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		nonce := rand.Text()
		h := w.Header()
		h.Set("Content-Type", "text/html; charset=utf-8")
		h.Set("Cache-Control", "no-store")
		h.Set("Content-Security-Policy", "default-src 'none'; "+
			// The router's origin too: the page imports the client
			// library from it (/client.js).
			"script-src 'nonce-"+nonce+"' "+router.Scheme+"://"+router.Host+"; style-src 'nonce-"+nonce+"'; "+
			"connect-src "+connect+"; img-src data:; "+
			"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("X-Content-Type-Options", "nosniff")
		err := page.Execute(w, struct{ Router, Nonce string }{router.String(), nonce})
		if err != nil {
			log.Printf("render: %v", err)
		}
	})
}
