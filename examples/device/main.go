// Command device is a pretend device behind NAT that anyone with the key can
// reach over plain HTTP through wsrouter's /relay/{id}/… (the main README's
// "Reach a device behind NAT" describes the frames).
//
// It joins a hostclient registration as its host and answers each relay
// frame the way a small board would:
//
//	GET /                      an HTML status page
//	GET /reading               a JSON reading (temperature, humidity, uptime)
//	GET|POST /led?state=on|off|toggle
//	                           switches the simulated LED; answers its state
//	GET /image.png             a small PNG showing the LED, sent as base64
//	anything else              404
//
// Every request frame carries a rid, and the reply must carry the same one.
// Frames without rid and method are not requests (a client of the
// registration may talk to the host too) and are ignored.
//
// It is written on the client library (wsrouter/client): client.Dial keeps
// it connected, reconnecting with backoff when the connection drops, and
// client.ServeRelay turns each relay frame into a call of an ordinary
// http.Handler, so the routes below are plain net/http. If the router
// forgot the registration (a restart without a data file) and the device
// knows the host key, it registers its id again. Ctrl-C ends it.
//
// Keys travel in the X-Key and X-Host-Key headers, never in a URL, and are
// never printed. They may be flags or, to keep them out of shell history and
// ps, WSR_KEY and WSR_HOST_KEY.
package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io"
	"math"
	mrand "math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"
	"wsrouter/client"
)

// timeout bounds each HTTP call, dial and reply write.
const timeout = 10 * time.Second

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "device:", err)
		}
		os.Exit(1)
	}
}

// config is what the flags say.
type config struct {
	router   *url.URL // http or https base of the router
	id       string
	key      string
	hostKey  string
	register bool
}

func parseFlags(args []string, stderr io.Writer) (*config, error) {
	c := &config{}
	fs := flag.NewFlagSet("device", flag.ContinueOnError)
	fs.SetOutput(stderr)
	routerURL := fs.String("router", "http://localhost:8741", "router base URL (http, https, ws or wss)")
	fs.StringVar(&c.id, "id", "", "hostclient registration to join (with -register: the id to ask for, optional)")
	// The keys' flag defaults stay empty and the environment is read after
	// parsing: a default would be printed by -h.
	fs.StringVar(&c.key, "key", "", "registration key (default $WSR_KEY)")
	fs.StringVar(&c.hostKey, "host-key", "", "host key, to -register and to register again after a router restart (default $WSR_HOST_KEY; -register: else random)")
	fs.BoolVar(&c.register, "register", false, "register a new hostclient registration first and print its id")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	c.key = cmp.Or(c.key, os.Getenv("WSR_KEY"))
	c.hostKey = cmp.Or(c.hostKey, os.Getenv("WSR_HOST_KEY"))
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	u, err := url.Parse(*routerURL)
	if err != nil {
		return nil, fmt.Errorf("-router: %w", err)
	}
	switch u.Scheme {
	case "ws":
		u.Scheme = "http"
	case "wss":
		u.Scheme = "https"
	case "http", "https":
	default:
		return nil, fmt.Errorf("-router %q: want an http, https, ws or wss URL", *routerURL)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("-router %q: no host", *routerURL)
	}
	u.RawQuery, u.Fragment = "", ""
	c.router = u

	switch {
	case c.key == "":
		// A random key would be useless: you need it to curl the device.
		return nil, errors.New("no key: export WSR_KEY=$(openssl rand -hex 16) (or pass -key)")
	case c.id == "" && !c.register:
		return nil, errors.New("need -id, or -register to make a new registration")
	}
	return c, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	if c.register {
		if c.hostKey == "" {
			// A random one still lets this process register again after a
			// router restart. Only /remove needs it known; without that,
			// the router removes the registration -gc-grace after the
			// device leaves.
			c.hostKey = rand.Text()
		}
		id, err := register(ctx, c)
		switch {
		case errors.Is(err, client.ErrConflict) && c.id != "":
			// The router kept the registration from an earlier run (it
			// keeps registrations across restarts): join it. A different
			// key is then a 403 at connect.
			fmt.Fprintln(stdout, "already registered:", c.id)
		case err != nil:
			return err
		default:
			c.id = id
			fmt.Fprintln(stdout, "registered", c.id)
		}
	}
	d := &device{start: time.Now()}
	return d.run(ctx, c, stdout)
}

func register(ctx context.Context, c *config) (string, error) {
	return client.Register(ctx, c.router.String(), client.Registration{Type: "hostclient", Key: c.key, HostKey: c.hostKey, ID: c.id})
}

// tryIt prints curl commands for every route. The key stays a shell
// variable: it is never printed.
func tryIt(out io.Writer, c *config) {
	fmt.Fprintf(out, `Try it from another terminal, with the same WSR_KEY set there:
  curl -H "X-Key: $WSR_KEY" %[1]s/
  curl -H "X-Key: $WSR_KEY" %[1]s/reading
  curl -H "X-Key: $WSR_KEY" -X POST '%[1]s/led?state=toggle'
  curl -H "X-Key: $WSR_KEY" -o led.png %[1]s/image.png
`, c.router.JoinPath("relay", c.id))
}

// run keeps the device answering until ctx is done or the registration is
// removed. client.Dial reconnects by itself; what it cannot heal (the
// router forgot the registration) ends the Conn, and the device registers
// again once if it can.
func (d *device) run(ctx context.Context, c *config, out io.Writer) error {
	first := true
	for {
		conn, err := client.Dial(ctx, client.Options{
			URL: c.router.String(), ID: c.id, Key: c.key, Role: "host", MinBackoff: time.Second, MaxBackoff: time.Minute,
			OnState: func(s client.State) {
				switch s.Kind {
				case client.Connected:
					fmt.Fprintln(out, "device: connected as host of", c.id)
				case client.Reconnecting:
					fmt.Fprintf(out, "device: %v; reconnecting in %v\n", s.Err, s.Delay.Round(time.Millisecond))
				}
			},
		})
		if errors.Is(err, client.ErrNotFound) && !first && c.hostKey != "" {
			// The router forgot the registration it had: make it again
			// under the same id. On the first dial a 404 is a wrong -id,
			// which must not create a registration.
			if _, rerr := register(ctx, c); rerr == nil {
				fmt.Fprintln(out, "device: registered", c.id, "again")
				continue
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err // a wrong key or an unknown id does not heal by waiting
		}
		if first {
			tryIt(out, c)
			first = false
		}
		err = client.ServeRelay(ctx, conn, d.routes(out), nil)
		conn.Close()
		switch {
		case ctx.Err() != nil:
			return nil
		case errors.Is(err, client.ErrRemoved):
			fmt.Fprintln(out, "device: registration removed, stopping")
			return nil
		case errors.Is(err, client.ErrNotFound) && c.hostKey != "":
			continue
		}
		return err
	}
}

// device is the simulated hardware. ServeRelay answers several requests at
// once, so its state has a lock.
type device struct {
	start time.Time
	mu    sync.Mutex
	led   bool // guarded by mu
}

// routes are the device's pages, as any net/http server would have them.
func (d *device) routes(out io.Writer) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		io.WriteString(w, d.page())
	})
	mux.HandleFunc("GET /reading", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		writeJSON(w, d.reading())
	})
	led := func(w http.ResponseWriter, r *http.Request) {
		d.mu.Lock()
		defer d.mu.Unlock()
		switch s := r.FormValue("state"); s { // the query, or a form POST's body
		case "on", "off":
			d.led = s == "on"
		case "toggle":
			d.led = !d.led
		case "":
			// Just report the state.
		default:
			http.Error(w, "state: want on, off or toggle", http.StatusBadRequest)
			return
		}
		writeJSON(w, map[string]string{"led": onOff(d.led)})
	}
	mux.HandleFunc("GET /led", led)
	mux.HandleFunc("POST /led", led)
	mux.HandleFunc("GET /image.png", func(w http.ResponseWriter, r *http.Request) {
		d.mu.Lock()
		on := d.led
		d.mu.Unlock()
		w.Header().Set("Content-Type", "image/png")
		w.Header().Set("Cache-Control", "no-store")
		w.Write(ledPNG(on))
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "no such page on this device", http.StatusNotFound)
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		mux.ServeHTTP(rw, r)
		fmt.Fprintf(out, "device: %s %s -> %d\n", r.Method, r.URL.Path, rw.status)
	})
}

// statusWriter remembers the status, for the log line.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

// reading is a made-up sensor reading that drifts slowly over time.
func (d *device) reading() map[string]any {
	up := time.Since(d.start)
	phase := 2 * math.Pi * up.Minutes() / 10
	round := func(f float64) float64 { return math.Round(f*10) / 10 }
	return map[string]any{
		"temperature_c": round(21 + 1.5*math.Sin(phase) + 0.2*mrand.Float64()),
		"humidity_pct":  round(45 + 5*math.Cos(phase) + 0.5*mrand.Float64()),
		"uptime_s":      int(up.Seconds()),
		"led":           onOff(d.ledOn()),
	}
}

func (d *device) page() string {
	r := d.reading()
	return fmt.Sprintf(`<!doctype html>
<meta charset="utf-8">
<title>device</title>
<h1>device</h1>
<p><img src="image.png" width="32" height="32" alt=""> LED is <b>%s</b>
(<a href="led?state=toggle">toggle</a>)</p>
<p>%.1f °C, %.1f %% humidity, up %d s (<a href="reading">JSON</a>)</p>
<script>
// The router strips ?key= before the device sees the request; carry it
// over to the links so they work in a browser too.
const key = new URLSearchParams(location.search).get("key");
if (key) for (const el of document.querySelectorAll("[href], [src]")) {
  const attr = el.hasAttribute("href") ? "href" : "src";
  const u = new URL(el.getAttribute(attr), location.href);
  u.searchParams.set("key", key);
  el.setAttribute(attr, u.href);
}
</script>
`, onOff(d.ledOn()), r["temperature_c"], r["humidity_pct"], r["uptime_s"])
}

// ledPNG draws the LED as a 32×32 dot: amber when on, grey when off.
func ledPNG(on bool) []byte {
	c := color.NRGBA{R: 70, G: 70, B: 70, A: 255}
	if on {
		c = color.NRGBA{R: 255, G: 176, B: 0, A: 255}
	}
	img := image.NewNRGBA(image.Rect(0, 0, 32, 32))
	for y := range 32 {
		for x := range 32 {
			if dx, dy := x-16, y-16; dx*dx+dy*dy <= 14*14 {
				img.SetNRGBA(x, y, c)
			}
		}
	}
	var buf bytes.Buffer
	png.Encode(&buf, img) // writing to memory cannot fail
	return buf.Bytes()
}

func (d *device) ledOn() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.led
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}
