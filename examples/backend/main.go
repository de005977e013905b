// Command backend is a backend in charge of a wsrouter registration without
// any WebSocket code of its own: it registers a lobby whose webhook points at
// itself, hears every connect, message and close as a signed HTTP call,
// admits or refuses members by a rule, answers messages through POST /send
// and closes members through DELETE /member.
//
// Run the router with webhooks to this machine allowed, then this, with the
// key members will join with in WSR_KEY (it is never printed):
//
//	WSROUTER_WEBHOOK_ALLOW=127.0.0.1 go run .
//	export WSR_KEY=$(openssl rand -hex 16); go run ./examples/backend
//
// The rule: a member is admitted unless its name starts with "guest" (name
// one with &name=… on /connect). A message "ping" is answered "pong" to its
// sender only; "time" with the time to everyone; "bye" closes the sender
// with 4100.
package main

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"time"
)

func main() {
	router := flag.String("router", "http://127.0.0.1:8741", "wsrouter's base URL")
	addr := flag.String("addr", "127.0.0.1:8090", "where this backend listens for webhooks")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, *router, *addr); err != nil {
		log.Fatal(err)
	}
}

// backend holds what it needs to call the router back.
type backend struct {
	router, id, hostKey string
	secret              []byte
}

func run(ctx context.Context, router, addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	b := &backend{router: router, hostKey: rand.Text(), secret: []byte(rand.Text())}
	key := os.Getenv("WSR_KEY")
	if key == "" {
		return fmt.Errorf("set WSR_KEY to the key members will join with")
	}
	q := url.Values{"reg_type": {"lobby"}, "key": {key}, "host_key": {b.hostKey},
		"webhook": {"http://" + ln.Addr().String() + "/hook"}, "webhook_secret": {string(b.secret)},
		"webhook_events": {"connect,message,close"}}
	resp, err := http.PostForm(router+"/register", q)
	if err != nil {
		return err
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("register: %s: %s (is the router running with WSROUTER_WEBHOOK_ALLOW=127.0.0.1?)", resp.Status, strings.TrimSpace(string(body)))
	}
	b.id = string(body)
	ws := strings.Replace(router, "http", "ws", 1)
	fmt.Printf("registration %s; join it with, for example:\n  websocat \"%s/connect?id=%s&key=$WSR_KEY&name=alice\"\n", b.id, ws, b.id)

	srv := &http.Server{Handler: http.HandlerFunc(b.hook), ReadHeaderTimeout: 5 * time.Second}
	go func() { <-ctx.Done(); srv.Close() }()
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		return err
	}
	return nil
}

// event is a webhook's body.
type event struct {
	Type, Conn, Role, Name string
	Data                   *string
	Code                   int
	Reason                 string
}

// hook answers one webhook call.
func (b *backend) hook(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 2<<20))
	if err != nil || !b.verify(r, body) {
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	var ev event
	if err := json.Unmarshal(body, &ev); err != nil {
		http.Error(w, "bad event", http.StatusBadRequest)
		return
	}
	switch ev.Type {
	case "connect":
		if strings.HasPrefix(ev.Name, "guest") {
			log.Printf("refused %s (%s)", ev.Conn, ev.Name)
			w.WriteHeader(http.StatusForbidden)
			return
		}
		log.Printf("admitted %s (%s)", ev.Conn, ev.Name)
	case "message":
		if ev.Data == nil {
			break // binary: ignored here
		}
		log.Printf("%s says %q", ev.Conn, *ev.Data)
		// Answer off the webhook's goroutine: the router waits for this
		// call before it sends the next event of the connection.
		go b.answer(ev.Conn, *ev.Data)
	case "close":
		log.Printf("%s left: %d %s", ev.Conn, ev.Code, ev.Reason)
	}
	w.WriteHeader(http.StatusNoContent)
}

func (b *backend) answer(conn, text string) {
	var err error
	switch text {
	case "ping":
		err = b.call("POST", "/send", url.Values{"conn": {conn}}, "pong")
	case "time":
		err = b.call("POST", "/send", nil, time.Now().Format(time.RFC3339))
	case "bye":
		err = b.call("DELETE", "/member", url.Values{"conn": {conn}, "code": {"4100"}, "reason": {"bye"}}, "")
	}
	if err != nil {
		log.Print(err)
	}
}

// call makes one backend API call with the host key.
func (b *backend) call(method, path string, q url.Values, text string) error {
	if q == nil {
		q = url.Values{}
	}
	q.Set("id", b.id)
	req, err := http.NewRequest(method, b.router+path+"?"+q.Encode(), strings.NewReader(text))
	if err != nil {
		return err
	}
	req.Header.Set("X-Host-Key", b.hostKey)
	req.Header.Set("Content-Type", "text/plain")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("%s %s: %s %s", method, path, resp.Status, strings.TrimSpace(string(msg)))
	}
	return nil
}

// verify checks the Standard Webhooks signature and that the event is
// recent (a recorded one cannot be replayed later).
func (b *backend) verify(r *http.Request, body []byte) bool {
	id, ts := r.Header.Get("webhook-id"), r.Header.Get("webhook-timestamp")
	var sec int64
	if _, err := fmt.Sscan(ts, &sec); err != nil || time.Since(time.Unix(sec, 0)).Abs() > 5*time.Minute {
		return false
	}
	m := hmac.New(sha256.New, b.secret)
	fmt.Fprintf(m, "%s.%s.", id, ts)
	m.Write(body)
	want := "v1," + base64.StdEncoding.EncodeToString(m.Sum(nil))
	return hmac.Equal([]byte(r.Header.Get("webhook-signature")), []byte(want))
}
