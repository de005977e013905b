// Package dashboard is the router's own web page (docs/protocol.md §14.2): an
// operator's live view of registrations, members and message rates, fed by
// the server-wide info stream and /stats. Its HTML, CSS and JavaScript are
// embedded in the binary; nothing is fetched from elsewhere and nothing is
// built.
package dashboard

import (
	"embed"
	"net/http"
	"path"
)

//go:embed assets
var assets embed.FS

// files maps the page's paths to their asset and content type.
var files = map[string]struct{ name, typ string }{
	"/dashboard":           {"assets/index.html", "text/html; charset=utf-8"},
	"/dashboard/app.js":    {"assets/app.js", "text/javascript; charset=utf-8"},
	"/dashboard/style.css": {"assets/style.css", "text/css; charset=utf-8"},
}

// Paths lists the paths Handler serves.
func Paths() []string {
	out := make([]string, 0, len(files))
	for p := range files {
		out = append(out, p)
	}
	return out
}

// Handler serves the page. The admin token never reaches it: the page asks
// for it and keeps it in the browser's sessionStorage. The policy lets the
// page load only its own files and talk only to its own origin.
func Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f, ok := files[path.Clean(r.URL.Path)]
		if !ok {
			http.NotFound(w, r)
			return
		}
		b, err := assets.ReadFile(f.name)
		if err != nil {
			http.Error(w, "missing asset", http.StatusInternalServerError)
			return
		}
		h := w.Header()
		h.Set("Content-Type", f.typ)
		h.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-cache")
		w.Write(b)
	})
}
