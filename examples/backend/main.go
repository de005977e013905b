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
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"time"
	"wsrouter/client"
)

func main() {
	router := flag.String("router", "http://127.0.0.1:8741", "wsrouter's base URL")
	addr := flag.String("addr", "127.0.0.1:8090", "where this backend listens for webhooks")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, *router, *addr, os.Stdout); err != nil {
		log.Fatal(err)
	}
}

// backend holds what it needs to call the router back.
type backend struct {
	api    *client.Backend // /send and DELETE /member, with the host key
	secret []byte          // the webhook secret
}

func run(ctx context.Context, router, addr string, out io.Writer) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	key := os.Getenv("WSR_KEY")
	if key == "" {
		return fmt.Errorf("set WSR_KEY to the key members will join with")
	}
	hostKey, secret := rand.Text(), rand.Text()
	id, err := client.Register(ctx, router, client.Registration{Type: "lobby", Key: key, HostKey: hostKey,
		Webhook: "http://" + ln.Addr().String() + "/hook", WebhookSecret: secret, WebhookEvents: "connect,message,close"})
	if err != nil {
		return fmt.Errorf("register: %w (is the router running with WSROUTER_WEBHOOK_ALLOW=127.0.0.1?)", err)
	}
	b := &backend{api: &client.Backend{URL: router, ID: id, HostKey: hostKey}, secret: []byte(secret)}
	ws := strings.Replace(router, "http", "ws", 1)
	fmt.Fprintf(out, "registration %s; join it with, for example:\n  websocat \"%s/connect?id=%s&key=$WSR_KEY&name=alice\"\n", id, ws, id)

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
	if err != nil || client.VerifyWebhook(b.secret, r.Header, body) != nil {
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
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var err error
	switch text {
	case "ping":
		_, err = b.api.Send(ctx, client.Target{Conn: conn}, "text/plain", []byte("pong"))
	case "time":
		_, err = b.api.Send(ctx, client.Target{}, "text/plain", []byte(time.Now().Format(time.RFC3339)))
	case "bye":
		err = b.api.CloseMember(ctx, conn, "", 4100, "bye")
	}
	if err != nil {
		log.Print(err)
	}
}
