// Command hostclient shows a host and a client talking through wsrouter.
//
// With no -mode it runs the whole demo in one process: it registers a
// hostclient registration with fresh random keys, connects a host and a
// client, has the client send a few messages that the host answers in upper
// case, then removes the registration and exits 0.
//
// The halves can also run apart, in two terminals, against a registration
// made beforehand (see README.md): -mode register, -mode host, -mode client
// and -mode remove.
//
// Keys travel in the X-Key and X-Host-Key headers, never in a URL, and are
// never printed. They may be given as flags or, to keep them out of shell
// history and ps, in WSR_KEY and WSR_HOST_KEY.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
	"wsrouter/client"

	"github.com/coder/websocket"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "hostclient:", err)
		}
		os.Exit(1)
	}
}

// config is what the flags say.
type config struct {
	router  *url.URL // http or https base of the router
	mode    string
	id      string
	key     string
	hostKey string
	timeout time.Duration
	msgs    []string // client messages from the command line
}

func parseFlags(args []string, stderr io.Writer) (*config, error) {
	c := &config{}
	fs := flag.NewFlagSet("hostclient", flag.ContinueOnError)
	fs.SetOutput(stderr)
	routerURL := fs.String("router", "http://localhost:8741", "router base URL (http, https, ws or wss)")
	fs.StringVar(&c.mode, "mode", "demo", "demo, register, host, client or remove")
	fs.StringVar(&c.id, "id", "", "registration id (host, client, remove)")
	fs.StringVar(&c.key, "key", os.Getenv("WSR_KEY"), "registration key (default $WSR_KEY)")
	fs.StringVar(&c.hostKey, "host-key", os.Getenv("WSR_HOST_KEY"), "registration host key (default $WSR_HOST_KEY)")
	fs.DurationVar(&c.timeout, "timeout", 10*time.Second, "how long to wait for each HTTP call and each reply")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: hostclient [flags] [message ...]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	c.msgs = fs.Args()

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

	need := func(ok bool, what string) error {
		if !ok {
			return fmt.Errorf("-mode %s needs %s", c.mode, what)
		}
		return nil
	}
	switch c.mode {
	case "demo":
		// Makes its own registration and keys.
	case "register":
		err = need(c.key != "" && c.hostKey != "", "-key and -host-key (or WSR_KEY and WSR_HOST_KEY)")
	case "host", "client":
		err = need(c.id != "" && c.key != "", "-id and -key (or WSR_KEY)")
	case "remove":
		err = need(c.id != "" && c.key != "" && c.hostKey != "", "-id, -key and -host-key (or WSR_KEY and WSR_HOST_KEY)")
	default:
		err = fmt.Errorf("-mode %q: want demo, register, host, client or remove", c.mode)
	}
	return c, err
}

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	c, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	switch c.mode {
	case "register":
		id, err := register(ctx, c)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, id)
		return nil
	case "remove":
		if err := remove(ctx, c); err != nil {
			return err
		}
		fmt.Fprintln(stdout, "removed", c.id)
		return nil
	case "host":
		ws, err := dial(ctx, c, "host", stdout)
		if err != nil {
			return err
		}
		return serveHost(ctx, ws, stdout)
	case "client":
		ws, err := dial(ctx, c, "client", stdout)
		if err != nil {
			return err
		}
		msgs := c.msgs
		if len(msgs) == 0 {
			fmt.Fprintln(stdout, "client: type messages, one a line; end with Ctrl-D")
			return runClient(ctx, ws, stdinLines(stdin), c.timeout, false, stdout)
		}
		return runClient(ctx, ws, sliceLines(msgs), c.timeout, false, stdout)
	}
	return demo(ctx, c, stdout)
}

// demo runs the whole exchange in one process.
func demo(ctx context.Context, c *config, out io.Writer) (err error) {
	c.key, c.hostKey = rand.Text(), rand.Text()
	c.id, err = register(ctx, c)
	if err != nil {
		return err
	}
	fmt.Fprintln(out, "registered", c.id)
	removed := false
	defer func() {
		// Remove even when something failed or ctx is done, so that the
		// demo leaves nothing behind; the router would drop it after its
		// grace period anyway.
		if removed {
			return
		}
		rctx, cancel := context.WithTimeout(context.Background(), c.timeout)
		defer cancel()
		if rerr := remove(rctx, c); rerr != nil {
			err = errors.Join(err, rerr)
			return
		}
		fmt.Fprintln(out, "removed", c.id)
	}()

	// The host joins first: a member only receives what is sent after it
	// joined, so the client must not talk before a host is there.
	host, err := dial(ctx, c, "host", out)
	if err != nil {
		return err
	}
	hostDone := make(chan error, 1)
	go func() { hostDone <- serveHost(ctx, host, out) }()

	cl, err := dial(ctx, c, "client", out)
	if err != nil {
		host.Close()
		<-hostDone
		return err
	}
	msgs := c.msgs
	if len(msgs) == 0 {
		msgs = []string{"hello", "how are you?", "wsrouter says hi"}
	}
	if err := runClient(ctx, cl, sliceLines(msgs), c.timeout, true, out); err != nil {
		host.Close()
		<-hostDone
		return err
	}

	// Removing the registration closes the host with 4000, which ends
	// serveHost cleanly.
	rctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	if err := remove(rctx, c); err != nil {
		host.Close()
		<-hostDone
		return err
	}
	removed = true
	err = <-hostDone
	fmt.Fprintln(out, "removed", c.id)
	return err
}

// serveHost answers every message with its upper-cased text (binary comes
// back unchanged) until the registration is removed, the router closes the
// connection for good, or ctx is done. conn reconnects by itself meanwhile.
func serveHost(ctx context.Context, conn *client.Conn, out io.Writer) error {
	defer conn.Close()
	for {
		m, err := conn.Read(ctx)
		if err != nil {
			return ended(ctx, "host", err, out)
		}
		reply := m.Data
		if m.Type == websocket.MessageText {
			reply = []byte(strings.ToUpper(string(m.Data)))
		}
		fmt.Fprintf(out, "host:   got %q, replying %q\n", m.Data, reply)
		if err := conn.Write(ctx, m.Type, reply); err != nil {
			return ended(ctx, "host", err, out)
		}
	}
}

// runClient sends each line and waits up to timeout for a reply before the
// next one, printing every reply as it arrives. With several hosts each
// message gets several replies; they are all printed. A missing reply is an
// error when strict, and only reported otherwise (no host may be there yet).
func runClient(ctx context.Context, conn *client.Conn, lines <-chan string, timeout time.Duration, strict bool, out io.Writer) error {
	defer conn.Close()
	replies := make(chan struct{}, 64)
	readErr := make(chan error, 1)
	go func() {
		for {
			m, err := conn.Read(ctx)
			if err != nil {
				readErr <- err
				return
			}
			fmt.Fprintf(out, "client: got  %q\n", m.Data)
			select {
			case replies <- struct{}{}:
			default: // extra replies nobody waits for
			}
		}
	}()

	for {
		var line string
		var ok bool
		select {
		case line, ok = <-lines:
		case err := <-readErr:
			// Closed for good while idle, e.g. the registration was removed.
			return ended(ctx, "client", err, out)
		case <-ctx.Done():
			return nil
		}
		if !ok {
			return nil
		}
		// Drop replies to earlier messages that came late or twice.
		for len(replies) > 0 {
			<-replies
		}
		fmt.Fprintf(out, "client: sent %q\n", line)
		wctx, cancel := context.WithTimeout(ctx, timeout)
		err := conn.Write(wctx, websocket.MessageText, []byte(line))
		cancel()
		if err != nil {
			return ended(ctx, "client", err, out)
		}
		t := time.NewTimer(timeout)
		select {
		case <-replies:
			t.Stop()
		case err := <-readErr:
			t.Stop()
			return ended(ctx, "client", err, out)
		case <-t.C:
			if strict {
				return fmt.Errorf("client: no reply to %q within %v", line, timeout)
			}
			fmt.Fprintf(out, "client: no reply within %v; is a host connected?\n", timeout)
		case <-ctx.Done():
			t.Stop()
			return nil
		}
	}
}

// ended turns the error that ended a connection into the program's result:
// ctx done, Close, and the registration being removed are normal ends;
// everything else is explained.
func ended(ctx context.Context, who string, err error, out io.Writer) error {
	switch {
	case ctx.Err() != nil, errors.Is(err, client.ErrClosed):
		return nil
	case errors.Is(err, client.ErrRemoved):
		fmt.Fprintf(out, "%-7s closed: 4000 registration removed\n", who+":")
		return nil
	}
	return fmt.Errorf("%s: %w", who, err)
}

// dial joins registration c.id as role, with the key in the X-Key header.
// The connection stays up across drops (the client library reconnects),
// and each new session is reported.
func dial(ctx context.Context, c *config, role string, out io.Writer) (*client.Conn, error) {
	dctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	conn, err := client.Dial(dctx, client.Options{URL: c.router.String(), ID: c.id, Key: c.key, Role: role,
		OnState: func(s client.State) {
			switch s.Kind {
			case client.Connected:
				fmt.Fprintf(out, "%-7s connected, connection id %s\n", role+":", s.ConnID)
			case client.Reconnecting:
				fmt.Fprintf(out, "%-7s %v; reconnecting in %v\n", role+":", s.Err, s.Delay.Round(time.Millisecond))
			}
		}})
	if err != nil {
		return nil, fmt.Errorf("%s: connect: %w", role, err)
	}
	return conn, nil
}

// register creates a hostclient registration with c's keys and returns its id.
func register(ctx context.Context, c *config) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	id, err := client.Register(ctx, c.router.String(), client.Registration{Type: "hostclient", Key: c.key, HostKey: c.hostKey})
	if err != nil {
		return "", fmt.Errorf("register: %w", err)
	}
	return id, nil
}

// remove deletes registration c.id; every member is closed with 4000.
func remove(ctx context.Context, c *config) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	if err := client.Remove(ctx, c.router.String(), c.id, c.key, c.hostKey); err != nil {
		return fmt.Errorf("remove: %w", err)
	}
	return nil
}

// sliceLines returns msgs as a closed channel.
func sliceLines(msgs []string) <-chan string {
	ch := make(chan string, len(msgs))
	for _, m := range msgs {
		ch <- m
	}
	close(ch)
	return ch
}

// stdinLines sends the non-empty lines of r until EOF. The reading goroutine
// may outlive the client, blocked on a terminal; the program is ending then.
func stdinLines(r io.Reader) <-chan string {
	ch := make(chan string)
	go func() {
		defer close(ch)
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			if line := strings.TrimSpace(sc.Text()); line != "" {
				ch <- line
			}
		}
	}()
	return ch
}
