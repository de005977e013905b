package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"sort"
	"strings"
)

// Servers under test.
const (
	kindWsrouter  = "wsrouter"
	kindReference = "reference"
)

// result is what one run of a scenario measured on one server.
type result struct {
	// figures are the numbers that get medians and ratios. Names carry
	// their unit (_per_s, _us, _ms, _mb, _kb).
	figures map[string]float64
	// notes are everything else worth keeping: close codes seen, errors
	// by kind, server metrics.
	notes map[string]any
	// anomalies are one-line descriptions of what should not have
	// happened (loss, unexpected closes, failed connects, server log
	// errors).
	anomalies []string
}

func newResult() *result {
	return &result{figures: map[string]float64{}, notes: map[string]any{}}
}

// set records a figure, to 6 significant digits: more would be noise.
func (r *result) set(name string, v float64) { r.figures[name] = roundSig(v, 6) }

// roundSig rounds v to n significant digits.
func roundSig(v float64, n int) float64 {
	if v == 0 || math.IsNaN(v) || math.IsInf(v, 0) {
		return v
	}
	return round(v, n-1-int(math.Floor(math.Log10(math.Abs(v)))))
}

func (r *result) anomaly(format string, args ...any) {
	r.anomalies = append(r.anomalies, fmt.Sprintf(format, args...))
}

// runEach measures each variant in turn against the same server, so that
// their ratios come from one run, and keeps each one's figures and notes
// under "_<variant>" and its anomalies prefixed with its name. It stops at
// the first variant that fails.
func runEach(variants []string, run func(variant string) (*result, error)) (*result, error) {
	res := newResult()
	for _, v := range variants {
		r, err := run(v)
		for k, f := range r.figures {
			res.set(k+"_"+v, f)
		}
		for k, n := range r.notes {
			res.notes[k+"_"+v] = n
		}
		for _, a := range r.anomalies {
			res.anomaly("%s: %s", v, a)
		}
		if err != nil {
			return res, fmt.Errorf("%s: %w", v, err)
		}
	}
	return res, nil
}

// targetRecord is one server's part of one run, as written to JSON.
type targetRecord struct {
	Figures   map[string]float64 `json:"figures,omitempty"`
	Notes     map[string]any     `json:"notes,omitempty"`
	Anomalies []string           `json:"anomalies,omitempty"`
	Error     string             `json:"error,omitempty"`
}

func figuresOf(t *targetRecord) map[string]float64 {
	if t == nil {
		return nil
	}
	return t.Figures
}

// runRecord is one run: each server once, in Order.
type runRecord struct {
	Run     int                      `json:"run"`
	Order   []string                 `json:"order"`
	Targets map[string]*targetRecord `json:"targets"`
	// Ratio is wsrouter's figure over the reference's, null where the
	// reference's is 0 or either is missing.
	Ratio map[string]*float64 `json:"ratio,omitempty"`
}

// report is the JSON line.
type report struct {
	Scenario   string              `json:"scenario"`
	Started    string              `json:"started"`
	Machine    map[string]any      `json:"machine"`
	Params     map[string]any      `json:"params"`
	Common     map[string]any      `json:"common"`
	ServerArgs map[string][]string `json:"server_args"`
	ServerEnv  []string            `json:"server_env"`
	// Labels name the two servers where the reference is not the
	// broadcaster (relay: "direct" and "relay"), and ReferenceMode is the
	// hidden mode that served as the reference.
	Labels        map[string]string `json:"labels,omitempty"`
	ReferenceMode string            `json:"reference_mode,omitempty"`
	Runs          []runRecord       `json:"runs"`
	// Median is, per server, the median of each figure over the runs
	// that produced it, and their ratio.
	Median map[string]map[string]float64 `json:"median"`
	Ratio  map[string]*float64           `json:"ratio"`
	// Goals are the scenario's targets checked against the medians.
	Goals     []goal   `json:"goals,omitempty"`
	Anomalies []string `json:"anomalies"`
}

// goal is one target a scenario should meet, such as "relay p99 under 2 ms
// at -c 1", checked against the medians.
type goal struct {
	Name string `json:"name"`
	// Applies is false when the run's parameters are not the ones the
	// target is stated for; Met is then still computed, for information.
	Applies bool `json:"applies"`
	// Status is "met" or "MISSED"; "met, but not applicable (…)" or
	// "missed, but …" where Applies is false; "unknown (…)" when a figure
	// is missing.
	Status string `json:"status"`
	// Value is the measured figure (a ratio or a latency), Limit the bound.
	Value *float64 `json:"value"`
	Limit float64  `json:"limit"`
	Unit  string   `json:"unit,omitempty"`
	Met   *bool    `json:"met"`
}

// label returns what the summary calls a server.
func (rep *report) label(kind string) string {
	if l := rep.Labels[kind]; l != "" {
		return l
	}
	return kind
}

// summarise fills Median, Ratio and Anomalies from Runs.
func (rep *report) summarise() {
	rep.Median = map[string]map[string]float64{}
	rep.Anomalies = []string{}
	for _, kind := range []string{kindReference, kindWsrouter} {
		vals := map[string][]float64{}
		for _, rr := range rep.Runs {
			t := rr.Targets[kind]
			if t == nil {
				continue
			}
			for k, v := range t.Figures {
				vals[k] = append(vals[k], v)
			}
			for _, a := range t.Anomalies {
				rep.Anomalies = append(rep.Anomalies, fmt.Sprintf("run %d %s: %s", rr.Run, rep.label(kind), a))
			}
			if t.Error != "" {
				rep.Anomalies = append(rep.Anomalies, fmt.Sprintf("run %d %s: error: %s", rr.Run, rep.label(kind), t.Error))
			}
		}
		if len(vals) == 0 {
			continue
		}
		med := map[string]float64{}
		for k, vs := range vals {
			med[k] = median(vs)
		}
		rep.Median[kind] = med
	}
	rep.Ratio = ratios(rep.Median[kindWsrouter], rep.Median[kindReference])
}

// median returns the median of vs (the mean of the middle two for an even
// count).
func median(vs []float64) float64 {
	s := append([]float64(nil), vs...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// ratios returns ws/ref for every figure of ws; nil (JSON null) where the
// reference's is missing or 0, as no finite ratio exists.
func ratios(ws, ref map[string]float64) map[string]*float64 {
	if ws == nil || ref == nil {
		return nil
	}
	out := map[string]*float64{}
	for k, w := range ws {
		r, ok := ref[k]
		if !ok || r == 0 {
			out[k] = nil
			continue
		}
		v := round(w/r, 4)
		out[k] = &v
	}
	return out
}

// round rounds v to n decimals after the point (n may be negative).
func round(v float64, n int) float64 {
	p := math.Pow(10, float64(n))
	return math.Round(v*p) / p
}

// write prints the JSON line and then the human summary.
func (rep *report) write(w io.Writer, title string) error {
	b, err := json.Marshal(rep)
	if err != nil {
		return err
	}
	if _, err := fmt.Fprintf(w, "%s\n", b); err != nil {
		return err
	}

	var sb strings.Builder
	fmt.Fprintf(&sb, "\n%s — %v, %d run(s)%s\n", title, rep.Common["duration"], len(rep.Runs),
		map[bool]string{true: ", medians", false: ""}[len(rep.Runs) > 1])
	src := "unknown source"
	if rev, ok := rep.Machine["server_vcs_revision"].(string); ok {
		src = rev[:min(12, len(rev))]
		if dirty, _ := rep.Machine["server_vcs_modified"].(bool); dirty {
			src += "+changes"
		}
	}
	fmt.Fprintf(&sb, "machine: %v × %v, load %v; %v (server %v, %s)\n",
		rep.Machine["nproc"], rep.Machine["cpu_model"], rep.Machine["loadavg_at_start"],
		rep.Machine["go_version"], rep.Machine["server_go_version"], src)
	names := map[string]bool{}
	for _, m := range rep.Median {
		for k := range m {
			names[k] = true
		}
	}
	if len(rep.Labels) > 0 {
		fmt.Fprintf(&sb, "ratio: %s / %s\n", rep.label(kindWsrouter), rep.label(kindReference))
	}
	fmt.Fprintf(&sb, "%-30s %14s %14s %9s\n", "figure", rep.label(kindReference), rep.label(kindWsrouter), "ratio")
	for _, k := range sortedKeys(names) {
		fmt.Fprintf(&sb, "%-30s %14s %14s %9s\n", k,
			fmtFig(rep.Median[kindReference], k), fmtFig(rep.Median[kindWsrouter], k), fmtRatio(rep.Ratio[k]))
	}
	if len(rep.Goals) > 0 {
		sb.WriteString("targets:\n")
		for _, g := range rep.Goals {
			v := "-"
			if g.Value != nil {
				v = fmt.Sprintf("%.4g%s", *g.Value, g.Unit)
			}
			fmt.Fprintf(&sb, "  %-46s %9s  %s\n", g.Name, v, g.Status)
		}
	}
	if len(rep.Anomalies) == 0 {
		sb.WriteString("anomalies: none\n")
	} else {
		sb.WriteString("anomalies:\n")
		for _, a := range rep.Anomalies {
			fmt.Fprintf(&sb, "  - %s\n", a)
		}
	}
	_, err = io.WriteString(w, sb.String())
	return err
}

func fmtFig(m map[string]float64, k string) string {
	v, ok := m[k]
	if !ok {
		return "-"
	}
	switch a := math.Abs(v); {
	case a == 0:
		return "0"
	case a >= 1000:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.3g", v)
	}
}

func fmtRatio(r *float64) string {
	if r == nil {
		return "-"
	}
	return fmt.Sprintf("%.2f", *r)
}
