package router

import (
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/coder/websocket"
)

// chromium finds a headless-capable Chromium or Chrome, or skips the test
// with how to install one. CI installs Debian's chromium, so there it runs.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("no Chromium in CI: .ci/run installs it (apt-get install -y chromium)")
	}
	t.Skip("no Chromium: install it (Debian: apt-get install -y chromium) to run the dashboard's browser test")
	return ""
}

// TestDashboardInBrowser drives the dashboard in headless Chromium: the page
// loads from the router, takes the admin token, lists a registration made
// by the test, and shows a member joining without a reload. It writes
// screenshots at 1280×800 and at a phone's 390×844 (to
// $DASHBOARD_SCREENSHOTS too, if set: the README's picture).
func TestDashboardInBrowser(t *testing.T) {
	bin := chromium(t)
	ts := newTestServer(t, Config{AdminToken: "dash-admin", Registry: regCfgKeep()})
	// Something to look at before the test's own registration.
	var host, client *websocket.Conn
	for _, typ := range []string{"lobby", "pubsub", "hostclient"} {
		id := ts.register(t, typ, "id_req", "demo-"+typ)
		switch typ {
		case "hostclient":
			host, _, _, _ = ts.dialNamed(t, id, "host", "garage-pi")
			client, _, _, _ = ts.dialNamed(t, id, "client", "phone")
		case "pubsub":
			c, _, _, _ := ts.dialNamed(t, id, "", "sensor-feed")
			ts.subscribe(t, c, "sensors.>")
		default:
			ts.dialNamed(t, id, "", "alice")
		}
	}

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(bin),
		chromedp.NoSandbox, // CI runs as root
		chromedp.WindowSize(1280, 800),
		chromedp.Flag("disable-dev-shm-usage", true),
	)
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelA()
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	ctx, cancelT := context.WithTimeout(ctx, 90*time.Second)
	defer cancelT()

	// The page, then the token.
	if err := chromedp.Do(ctx,
		chromedp.Navigate(ts.URL+"/dashboard"),
		chromedp.WaitVisible(chromedp.ID("token")),
		chromedp.SendKeys(chromedp.ID("token"), "dash-admin"),
		chromedp.Click(chromedp.ID("connect")),
		chromedp.WaitVisible(chromedp.CSS(`#regs tr[data-id="demo-pubsub"]`)),
	); err != nil {
		t.Fatalf("login: %v", err)
	}
	if stored, err := chromedp.Run(ctx, chromedp.Evaluate[string](`sessionStorage.getItem("wsrouter.admin")`)); err != nil || stored != "dash-admin" {
		t.Fatalf("token in sessionStorage: %q %v", stored, err)
	}
	if _, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`window.__noReload = true`)); err != nil {
		t.Fatal(err)
	}

	// A registration made now appears, without a reload.
	id := ts.register(t, "lobby", "id_req", "made-by-the-test")
	row := chromedp.CSS(`#regs tr[data-id="` + id + `"]`)
	if err := chromedp.Do(ctx, chromedp.WaitVisible(row), chromedp.Click(row), chromedp.WaitVisible(chromedp.ID("detail"))); err != nil {
		t.Fatalf("new registration: %v", err)
	}
	// A member joining updates the open registration in place.
	_, conn, _, _ := ts.dialNamed(t, id, "", "browser-test-member")
	member := `#members tr[data-conn="` + conn + `"]`
	if err := chromedp.Do(ctx, chromedp.WaitVisible(chromedp.CSS(member))); err != nil {
		t.Fatalf("member join: %v", err)
	}
	name, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(member+` td:nth-child(2)`)))
	if err != nil || name != "browser-test-member" {
		t.Fatalf("member row name %q, %v", name, err)
	}
	ts.dialNamed(t, id, "", "second")
	if err := chromedp.Do(ctx, chromedp.WaitVisible(`//tr[@data-id="`+id+`"]/td[contains(@class,"members")][text()="2"]`)); err != nil {
		t.Fatalf("second member: %v", err)
	}
	if kept, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`window.__noReload === true`)); err != nil || !kept {
		t.Fatalf("the page was reloaded: %v %v", kept, err)
	}

	// Message rates come from /stats, polled every 2 s: traffic in the
	// hostclient registration shows as a rate once two polls have seen it.
	traffic, stop := context.WithCancel(context.Background())
	defer stop()
	go func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-traffic.Done():
				return
			case <-tick.C:
				client.Write(traffic, websocket.MessageText, []byte("status?"))
			}
		}
	}()
	go func() {
		for {
			if _, _, err := host.Read(traffic); err != nil {
				return
			}
		}
	}()
	if err := chromedp.Do(ctx, chromedp.WaitVisible(`//tr[@data-id="demo-hostclient"]/td[4][not(text()="–")]`)); err != nil {
		t.Fatalf("message rate: %v", err)
	}

	// Show the pub/sub registration's subscriptions in the picture.
	if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS(`#regs tr[data-id="demo-pubsub"]`)), chromedp.WaitVisible(chromedp.CSS(`#members td.subs code`))); err != nil {
		t.Fatalf("pub/sub members: %v", err)
	}
	dirs := []string{t.TempDir()}
	if d := os.Getenv("DASHBOARD_SCREENSHOTS"); d != "" {
		dirs = append(dirs, d)
	}
	for _, shot := range []struct {
		file string
		w, h int64
	}{{"dashboard.png", 1280, 800}, {"dashboard-phone.png", 390, 844}} {
		if err := chromedp.Do(ctx, chromedp.EmulateViewport(shot.w, shot.h)); err != nil {
			t.Fatal(err)
		}
		if overflow, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`document.documentElement.scrollWidth > window.innerWidth + 1`)); err != nil || overflow {
			t.Errorf("%s: the page is wider than %d px (%v)", shot.file, shot.w, err)
		}
		png, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
		if err != nil {
			t.Fatalf("screenshot %s: %v", shot.file, err)
		}
		if len(png) < 1000 || !strings.HasPrefix(string(png), "\x89PNG") {
			t.Fatalf("%s: not a PNG (%d bytes)", shot.file, len(png))
		}
		for _, d := range dirs {
			if err := os.WriteFile(filepath.Join(d, shot.file), png, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestDashboardServed: the page and its files are served with a policy that
// lets them load nothing from elsewhere.
func TestDashboardServed(t *testing.T) {
	ts := newTestServer(t, Config{AdminToken: "x"})
	for path, typ := range map[string]string{"/dashboard": "text/html", "/dashboard/app.js": "text/javascript", "/dashboard/style.css": "text/css"} {
		code, body, h := ts.do(t, http.MethodGet, path, nil, nil)
		if code != 200 || !strings.HasPrefix(h.Get("Content-Type"), typ) || len(body) < 100 {
			t.Errorf("%s: %d %s, %d bytes", path, code, h.Get("Content-Type"), len(body))
		}
		if csp := h.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") || !strings.Contains(csp, "connect-src 'self'") {
			t.Errorf("%s: CSP %q", path, csp)
		}
		if strings.Contains(body, "http://") || strings.Contains(body, "https://") {
			t.Errorf("%s refers to another site", path)
		}
	}
	if code, _, _ := ts.do(t, http.MethodGet, "/dashboard/other.js", nil, nil); code != 404 {
		t.Errorf("unknown asset: %d", code)
	}
}

// TestClientJSServed: the JavaScript client and its types are served for
// pages of any origin to import.
func TestClientJSServed(t *testing.T) {
	ts := newTestServer(t, Config{})
	code, body, h := ts.do(t, http.MethodGet, "/client.js", nil, http.Header{"Origin": {"https://app.example"}})
	if code != 200 || !strings.HasPrefix(h.Get("Content-Type"), "text/javascript") || !strings.Contains(body, "export function connect(") ||
		h.Get("Access-Control-Allow-Origin") != "*" {
		t.Fatalf("/client.js: %d %s %q", code, h.Get("Content-Type"), h.Get("Access-Control-Allow-Origin"))
	}
	if code, body, _ := ts.do(t, http.MethodGet, "/client.d.ts", nil, nil); code != 200 || !strings.Contains(body, "export function connect(") {
		t.Fatalf("/client.d.ts: %d", code)
	}
}
