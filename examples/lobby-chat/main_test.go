package main

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"wsrouter/client"
	"wsrouter/registry"
	"wsrouter/router"
)

// routerOn serves a router on addr ("127.0.0.1:0" for any port) with the
// registrations of store, and returns its address and a stop function.
func routerOn(t *testing.T, addr string, store *registry.MemoryStore) (string, func()) {
	t.Helper()
	rt := router.New(router.Config{Registry: registry.Config{BcryptCost: 4, GCGrace: time.Hour, Store: store}}, nil)
	recs, _ := store.Load(context.Background())
	if err := rt.Registry().Restore(recs); err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	var err error
	for range 100 { // the old listener's port may take a moment to free
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: rt}
	go srv.Serve(ln)
	return ln.Addr().String(), func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		rt.Shutdown(ctx)
		srv.Shutdown(ctx)
	}
}

// TestPageReconnects drives the page in headless Chromium: it creates a
// room, chats with a Go member, loses the router (restarted on the same
// port with its registrations) and reconnects by itself through the client
// library, with nobody pressing anything.
func TestPageReconnects(t *testing.T) {
	bin := ""
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			bin = p
			break
		}
	}
	if bin == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("no Chromium in CI: .ci/run installs it")
		}
		t.Skip("no Chromium: install it (Debian: apt-get install -y chromium) to run the page's browser test")
	}
	store := &registry.MemoryStore{}
	addr, stop := routerOn(t, "127.0.0.1:0", store)
	defer func() { stop() }()
	routerURL, _ := url.Parse("http://" + addr)
	page := httptest.NewServer(servePage(routerURL))
	defer page.Close()

	actx, cancelA := chromedp.NewExecAllocator(context.Background(),
		append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(bin), chromedp.NoSandbox, chromedp.Flag("disable-dev-shm-usage", true))...)
	defer cancelA()
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	ctx, cancelT := context.WithTimeout(ctx, 90*time.Second)
	defer cancelT()
	connected := `//p[@id="status"][starts-with(text(), "Connected")]`
	if err := chromedp.Do(ctx,
		chromedp.Navigate(page.URL),
		chromedp.Click(chromedp.ID("create")),
		chromedp.WaitVisible(connected),
	); err != nil {
		t.Fatalf("create a room: %v", err)
	}
	link, err := chromedp.Run(ctx, chromedp.Value(chromedp.ID("link")))
	if err != nil {
		t.Fatal(err)
	}
	frag, _ := url.ParseQuery(link[strings.Index(link, "#")+1:])
	sessions := make(chan struct{}, 8)
	member, err := client.Dial(ctx, client.Options{URL: "http://" + addr, ID: frag.Get("id"), Key: frag.Get("key"), MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		OnState: func(s client.State) {
			if s.Kind == client.Connected {
				sessions <- struct{}{}
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer member.Close()

	say := func(text string) {
		t.Helper()
		if err := chromedp.Do(ctx, chromedp.SendKeys(chromedp.ID("text"), text), chromedp.Click(chromedp.ID("send-button"))); err != nil {
			t.Fatal(err)
		}
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		m, err := member.Read(rctx)
		if err != nil || !strings.Contains(string(m.Data), text) {
			t.Fatalf("the member got %q, %v; want %q", m.Data, err, text)
		}
	}
	<-sessions
	say("before")

	// The router goes away and comes back on the same port.
	stop()
	if err := chromedp.Do(ctx, chromedp.WaitVisible(`//p[@id="status"][contains(text(), "reconnecting in")]`)); err != nil {
		t.Fatalf("no reconnecting status: %v", err)
	}
	_, stop = routerOn(t, addr, store)
	if err := chromedp.Do(ctx, chromedp.WaitVisible(connected)); err != nil {
		t.Fatalf("the page did not reconnect: %v", err)
	}
	// The Go member reconnects too; only then can it hear the page.
	select {
	case <-sessions:
	case <-member.Done():
		t.Fatalf("the Go member ended: %v", member.Err())
	case <-ctx.Done():
		t.Fatal("the Go member did not reconnect")
	}
	say("after")
}
