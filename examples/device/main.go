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
// Like a real device it reconnects with backoff when the connection drops,
// and registers its id again if the router lost it (after a restart) and it
// knows the host key. Ctrl-C ends it.
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
	"encoding/base64"
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
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/coder/websocket"
)

// codeRemoved is the close code of a registration removed by /remove.
const codeRemoved websocket.StatusCode = 4000

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
		var se *statusError
		switch {
		case errors.As(err, &se) && se.code == http.StatusConflict && c.id != "":
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

// run keeps the device connected until ctx is done or the registration is
// removed, reconnecting with exponential backoff (1 s to 1 min, jittered so
// that many devices do not come back in step after a router restart).
func (d *device) run(ctx context.Context, c *config, out io.Writer) error {
	backoff := time.Second
	first := true // no connection yet
	for {
		ws, err := dial(ctx, c)
		var se *statusError
		if errors.As(err, &se) && se.code == http.StatusNotFound && !first && c.hostKey != "" {
			// The router forgot the registration it had (it restarted):
			// make it again under the same id. On the first dial a 404 is
			// a wrong -id, which must not create a registration.
			if _, err = register(ctx, c); err == nil {
				fmt.Fprintln(out, "device: registered", c.id, "again")
				ws, err = dial(ctx, c)
			}
		}
		if errors.As(err, &se) && se.code != http.StatusServiceUnavailable {
			return err // a wrong key or an unknown id does not heal by waiting
		}
		if err == nil {
			fmt.Fprintln(out, "device: connected as host of", c.id)
			if first {
				tryIt(out, c)
				first = false
			}
			backoff = time.Second
			err = d.serve(ctx, ws, out)
			if err == nil {
				return nil
			}
		}
		if ctx.Err() != nil {
			return nil
		}
		wait := backoff/2 + mrand.N(backoff/2)
		fmt.Fprintf(out, "device: %v; reconnecting in %v\n", err, wait.Round(time.Millisecond))
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return nil
		}
		backoff = min(2*backoff, time.Minute)
	}
}

// serve answers relay frames until the connection ends. It returns nil when
// the device should stop (ctx done, registration removed) and an error when
// it should reconnect.
func (d *device) serve(ctx context.Context, ws *websocket.Conn, out io.Writer) error {
	defer ws.CloseNow()
	// ctx ending closes the socket with 1000; reads use Background so that
	// the close handshake completes instead of the read being cut off.
	stop := context.AfterFunc(ctx, func() { ws.Close(websocket.StatusNormalClosure, "bye") })
	defer stop()
	for {
		typ, data, err := ws.Read(context.Background())
		if err != nil {
			switch {
			case ctx.Err() != nil:
				return nil
			case websocket.CloseStatus(err) == codeRemoved:
				fmt.Fprintln(out, "device: registration removed, stopping")
				return nil
			}
			var ce websocket.CloseError
			if errors.As(err, &ce) {
				return fmt.Errorf("closed: %d %s", int(ce.Code), ce.Reason)
			}
			return fmt.Errorf("connection lost: %w", err)
		}
		var req request
		if typ != websocket.MessageText || json.Unmarshal(data, &req) != nil || req.RID == "" || req.Method == "" {
			continue // not a relay request
		}
		rep := d.handle(&req)
		rep.RID = req.RID
		fmt.Fprintf(out, "device: %s %s -> %d\n", req.Method, req.Path, rep.Status)
		b, err := json.Marshal(rep)
		if err != nil {
			return err // cannot happen: every reply is plain data
		}
		wctx, cancel := context.WithTimeout(ctx, timeout)
		err = ws.Write(wctx, websocket.MessageText, b)
		cancel()
		if err != nil {
			return err
		}
	}
}

// request is a relay request frame (docs/protocol.md §7.1).
type request struct {
	RID          string            `json:"rid"`
	Method       string            `json:"method"`
	Path         string            `json:"path"`
	Query        map[string]any    `json:"query"`   // a string, or []any of strings when repeated
	Headers      map[string]string `json:"headers"` // canonical names, values joined by ", "
	Body         string            `json:"body"`
	BodyEncoding string            `json:"body_encoding"` // "base64" when the body is not UTF-8
}

// param returns the first value of a query parameter or, for a form POST, of
// a form field.
func (r *request) param(name string) string {
	switch v := r.Query[name].(type) {
	case string:
		return v
	case []any:
		if s, ok := v[0].(string); ok {
			return s
		}
	}
	if r.BodyEncoding == "" && strings.HasPrefix(r.Headers["Content-Type"], "application/x-www-form-urlencoded") {
		form, _ := url.ParseQuery(r.Body)
		return form.Get(name)
	}
	return ""
}

// reply is the answer frame: the router maps it to an HTTP response.
type reply struct {
	RID      string            `json:"rid"`
	Status   int               `json:"status"`
	Type     string            `json:"type,omitempty"`     // html, text, json, image, … or a media type
	Content  any               `json:"content"`            // a string, or any JSON value sent as JSON
	Encoding string            `json:"encoding,omitempty"` // "base64": content is decoded first
	Headers  map[string]string `json:"headers,omitempty"`
}

// text is a plain-text reply of one line.
func text(status int, s string) *reply {
	return &reply{Status: status, Type: "text", Content: s + "\n"}
}

// device is the simulated hardware. Frames are handled one at a time by the
// connection's reader, so it needs no lock.
type device struct {
	start time.Time
	led   bool
}

func (d *device) handle(r *request) *reply {
	get := r.Method == http.MethodGet
	switch {
	case r.Path == "/" && get:
		return &reply{Status: 200, Type: "html", Content: d.page()}
	case r.Path == "/reading" && get:
		return &reply{Status: 200, Type: "json", Content: d.reading(),
			Headers: map[string]string{"Cache-Control": "no-store"}}
	case r.Path == "/led" && (get || r.Method == http.MethodPost):
		switch s := r.param("state"); s {
		case "on", "off":
			d.led = s == "on"
		case "toggle":
			d.led = !d.led
		case "":
			// Just report the state.
		default:
			return text(400, "state: want on, off or toggle")
		}
		return &reply{Status: 200, Type: "json", Content: map[string]string{"led": onOff(d.led)}}
	case r.Path == "/image.png" && get:
		return &reply{Status: 200, Type: "image", Encoding: "base64",
			Content: base64.StdEncoding.EncodeToString(ledPNG(d.led)),
			Headers: map[string]string{"Cache-Control": "no-store"}}
	case r.Path == "/" || r.Path == "/reading" || r.Path == "/led" || r.Path == "/image.png":
		rep := text(405, "method not allowed")
		rep.Headers = map[string]string{"Allow": "GET"}
		if r.Path == "/led" {
			rep.Headers["Allow"] = "GET, POST"
		}
		return rep
	}
	return text(404, "no such page on this device")
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
		"led":           onOff(d.led),
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
`, onOff(d.led), r["temperature_c"], r["humidity_pct"], r["uptime_s"])
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

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// statusError is a refusal by the router: an HTTP status and its one-line
// reason.
type statusError struct {
	op   string
	code int
	msg  string
}

func (e *statusError) Error() string { return fmt.Sprintf("%s: %d %s", e.op, e.code, e.msg) }

func refusal(op string, resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	return &statusError{op: op, code: resp.StatusCode, msg: strings.TrimSpace(string(b))}
}

// dial joins registration c.id as its host, with the key in the X-Key header.
func dial(ctx context.Context, c *config) (*websocket.Conn, error) {
	u := c.router.JoinPath("connect")
	u.RawQuery = url.Values{"id": {c.id}, "sock_type": {"host"}}.Encode()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	ws, resp, err := websocket.Dial(ctx, u.String(), &websocket.DialOptions{
		HTTPHeader: http.Header{"X-Key": {c.key}},
	})
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			return nil, refusal("connect", resp)
		}
		var oe *net.OpError // "connection refused" reads better bare
		if errors.As(err, &oe) {
			err = oe
		}
		return nil, fmt.Errorf("connect: %w", err)
	}
	// A request frame carries a body of up to the router's -relay-max-body
	// (1 MiB), more once JSON-escaped or base64-encoded; the library's
	// default read limit of 32 KiB would cut a large POST off.
	ws.SetReadLimit(4 << 20)
	return ws, nil
}

// register creates a hostclient registration with c's keys, asking for c.id
// if set, and returns its id.
func register(ctx context.Context, c *config) (string, error) {
	form := url.Values{"reg_type": {"hostclient"}}
	if c.id != "" {
		form.Set("id_req", c.id)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.router.JoinPath("register").String(), strings.NewReader(form.Encode()))
	if err != nil {
		return "", err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	req.Header.Set("X-Key", c.key)
	req.Header.Set("X-Host-Key", c.hostKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", fmt.Errorf("register: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", refusal("register", resp)
	}
	var body struct {
		ID string `json:"id"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 4096)).Decode(&body); err != nil || body.ID == "" {
		return "", fmt.Errorf("register: unreadable answer (%v)", err)
	}
	return body.ID, nil
}
