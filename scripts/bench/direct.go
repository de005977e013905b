package main

import (
	"context"
	"errors"
	"flag"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"
)

// directServerMode is the hidden first argument that runs the relay
// scenario's reference: the device's /reading handler served directly by a
// plain net/http server, what a caller would get if it could reach the
// device without the router in between.
const directServerMode = "directserver"

// readingPath is the device route the relay scenario asks for.
const readingPath = "/reading"

// appendReading appends the JSON reading both the relay host and the direct
// server answer with, like examples/device's /reading. The values are fixed
// but for the uptime, so that the body is the same size on both.
func appendReading(b []byte, uptime time.Duration) []byte {
	b = append(b, `{"temperature":21.5,"humidity":40,"uptime_s":`...)
	b = strconv.AppendInt(b, int64(uptime/time.Second), 10)
	return append(b, '}')
}

// directServer answers GET /reading with the reading and /healthz with ok;
// query parameters (the key the relay needs) are ignored.
type directServer struct{ start time.Time }

func (s *directServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/healthz":
		w.Write([]byte("ok"))
	case readingPath:
		if r.Method != http.MethodGet {
			w.Header().Set("Allow", "GET")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		body := appendReading(make([]byte, 0, 64), time.Since(s.start))
		h := w.Header()
		h["Content-Type"] = []string{"application/json"}
		h["Content-Length"] = []string{strconv.Itoa(len(body))}
		w.Write(body)
	default:
		http.NotFound(w, r)
	}
}

// runDirectServer serves until ctx is done (SIGINT or SIGTERM), then exits
// 0.
func runDirectServer(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet(directServerMode, flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:0", "listen address")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: &directServer{start: time.Now()}, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	if err := srv.Close(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
