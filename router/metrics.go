package router

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"wsrouter/registry"
	"wsrouter/router/token"
)

// metrics holds the router's Prometheus metrics on a registry of its own, so
// that several routers (tests) never collide. No label carries a
// registration id or an address: cardinality stays fixed.
type metrics struct {
	prom *prometheus.Registry

	created   *prometheus.CounterVec   // by type
	removed   *prometheus.CounterVec   // by cause
	closes    *prometheus.CounterVec   // by code
	limited   *prometheus.CounterVec   // by endpoint
	refusals  *prometheus.CounterVec   // by endpoint and status
	sends     *prometheus.CounterVec   // POST /send by result
	storeErrs *prometheus.CounterVec   // store failures by operation
	hookCalls *prometheus.HistogramVec // webhook calls by event and result
	keyChecks *prometheus.HistogramVec
	tokens    *prometheus.CounterVec // tokens checked, by result
	minted    prometheus.Counter
	relays    *prometheus.CounterVec
	relayDur  prometheus.Histogram

	// Pre-resolved children: the per-message path does no label lookups.
	msgsIn, msgsOut, bytesIn, bytesOut [2]prometheus.Counter // [text, binary]
}

func newMetrics() *metrics {
	m := &metrics{
		prom: prometheus.NewRegistry(),
		created: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wsrouter_registrations_created_total",
			Help: "Registrations created, by type.",
		}, []string{"type"}),
		removed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wsrouter_registrations_removed_total",
			Help: "Registrations removed, by cause (admin, gc, ttl, shutdown).",
		}, []string{"cause"}),
		closes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wsrouter_closes_total",
			Help: "Connections closed by the server, by close code (ping_timeout, write_failed: dropped without a close frame).",
		}, []string{"code"}),
		limited: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wsrouter_rate_limited_total",
			Help: "Requests refused with 429, by endpoint.",
		}, []string{"endpoint"}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wsrouter_refusals_total",
			Help: "Requests to /register, /connect, /remove, the backend API and /stats answered with an error status, by endpoint and status (relay requests are in wsrouter_relay_requests_total).",
		}, []string{"endpoint", "status"}),
		hookCalls: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "wsrouter_webhook_call_seconds",
			Help:    "Webhook calls, by event (connect, message, close) and result (ok, refused, retried, failed, dropped), and how long each took.",
			Buckets: []float64{.001, .005, .01, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"event", "result"}),
		storeErrs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wsrouter_store_errors_total",
			Help: "Failures of the registrations' store (the -data file), by operation: register, remove (a /remove), or the store's own (GC and TTL removals, retried).",
		}, []string{"op"}),
		sends: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wsrouter_send_requests_total",
			Help: "POST /send requests, by result: ok, or the error status.",
		}, []string{"result"}),
		keyChecks: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "wsrouter_key_check_seconds",
			Help:    "Key checks, by how they were decided (bcrypt, remembered, or shared: waited for a bcrypt of the same key), waiting for a hash worker included.",
			Buckets: []float64{.00001, .0001, .001, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"how"}),
		tokens: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wsrouter_token_checks_total",
			Help: "Tokens checked on /connect and /relay, by result: ok, or why refused (malformed, algorithm, signature, expired, not_yet_valid, audience, scope). A request refused before its token is checked (lockout, unknown id, a bad parameter) is not counted.",
		}, []string{"result"}),
		minted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "wsrouter_tokens_issued_total",
			Help: "Tokens minted by POST /token.",
		}),
		relays: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wsrouter_relay_requests_total",
			Help: "Relay requests, by HTTP status answered.",
		}, []string{"status"}),
		relayDur: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "wsrouter_relay_duration_seconds",
			Help:    "Relay request latency, from request to answer.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
	}
	msgs := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "wsrouter_messages_total",
		Help: "Data messages, by direction (in: read from a sender; out: queued to a receiver) and frame type.",
	}, []string{"direction", "type"})
	bytes := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "wsrouter_message_bytes_total",
		Help: "Data message payload bytes, by direction and frame type.",
	}, []string{"direction", "type"})
	m.tokens.WithLabelValues("ok")
	for _, r := range token.Reasons {
		m.tokens.WithLabelValues(string(r))
	}
	for i, typ := range []string{"text", "binary"} {
		m.msgsIn[i] = msgs.WithLabelValues("in", typ)
		m.msgsOut[i] = msgs.WithLabelValues("out", typ)
		m.bytesIn[i] = bytes.WithLabelValues("in", typ)
		m.bytesOut[i] = bytes.WithLabelValues("out", typ)
	}
	m.prom.MustRegister(m.created, m.removed, m.closes, m.limited, m.refusals, m.sends, m.storeErrs, m.hookCalls, m.keyChecks,
		m.tokens, m.minted, m.relays, m.relayDur, msgs, bytes,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// registerLive adds the gauges read from the registry at scrape time:
// registrations by type and members by role. Counting at scrape time keeps
// join and leave free of metric bookkeeping.
func (m *metrics) registerLive(reg *registry.Registry) {
	regsDesc := prometheus.NewDesc("wsrouter_registrations", "Live registrations, by type.", []string{"type"}, nil)
	membersDesc := prometheus.NewDesc("wsrouter_members", "Connected members, by role.", []string{"role"}, nil)
	m.prom.MustRegister(collectorFunc{
		descs: []*prometheus.Desc{regsDesc, membersDesc},
		collect: func(ch chan<- prometheus.Metric) {
			var lobbies, hostclients, pubsubs, hosts, clients, members int
			reg.Each(func(r *registry.Registration) {
				switch r.Type {
				case registry.Lobby:
					lobbies++
				case registry.PubSub:
					pubsubs++
				default:
					hostclients++
				}
				h, c, mb := r.Counts()
				hosts, clients, members = hosts+h, clients+c, members+mb
			})
			g := func(d *prometheus.Desc, v int, label string) {
				ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v), label)
			}
			g(regsDesc, hostclients, "hostclient")
			g(regsDesc, lobbies, "lobby")
			g(regsDesc, pubsubs, "pubsub")
			g(membersDesc, hosts, "host")
			g(membersDesc, clients, "client")
			g(membersDesc, members, "member")
		},
	})
}

// collectorFunc is a prometheus.Collector from a function.
type collectorFunc struct {
	descs   []*prometheus.Desc
	collect func(chan<- prometheus.Metric)
}

func (c collectorFunc) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
}

func (c collectorFunc) Collect(ch chan<- prometheus.Metric) { c.collect(ch) }

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.prom, promhttp.HandlerOpts{})
}

func typeIndex(msg registry.Message) int {
	if msg.Binary {
		return 1
	}
	return 0
}

func (m *metrics) messageIn(msg registry.Message) {
	i := typeIndex(msg)
	m.msgsIn[i].Inc()
	m.bytesIn[i].Add(float64(len(msg.Data)))
}

func (m *metrics) messagesOut(msg registry.Message, receivers int) {
	if receivers == 0 {
		return
	}
	i := typeIndex(msg)
	m.msgsOut[i].Add(float64(receivers))
	m.bytesOut[i].Add(float64(receivers * len(msg.Data)))
}

func (m *metrics) registered(t registry.Type) { m.created.WithLabelValues(t.String()).Inc() }

func (m *metrics) removedBy(c registry.Cause) { m.removed.WithLabelValues(c.String()).Inc() }

func (m *metrics) closed(code int) {
	label := strconv.Itoa(code)
	switch code {
	case codePingTimeout:
		label = "ping_timeout"
	case codeWriteFailed:
		label = "write_failed"
	}
	m.closes.WithLabelValues(label).Inc()
}

func (m *metrics) webhookCall(event, result string, d time.Duration) {
	m.hookCalls.WithLabelValues(event, result).Observe(d.Seconds())
}

func (m *metrics) storeFailed(op string) { m.storeErrs.WithLabelValues(op).Inc() }

func (m *metrics) sent(result string) { m.sends.WithLabelValues(result).Inc() }

func (m *metrics) rateLimited(endpoint string) { m.limited.WithLabelValues(endpoint).Inc() }

func (m *metrics) refused(endpoint string, status int) {
	m.refusals.WithLabelValues(endpoint, strconv.Itoa(status)).Inc()
}

func (m *metrics) keyChecked(how registry.KeyCheck, d time.Duration) {
	label := "bcrypt"
	switch how {
	case registry.KeyRemembered:
		label = "remembered"
	case registry.KeyShared:
		label = "shared"
	}
	m.keyChecks.WithLabelValues(label).Observe(d.Seconds())
}

func (m *metrics) relayed(status int, d time.Duration) {
	m.relays.WithLabelValues(strconv.Itoa(status)).Inc()
	m.relayDur.Observe(d.Seconds())
}
