package router

import (
	"context"
	"errors"
	"time"

	"wsrouter/registry"
	"wsrouter/router/webhook"
)

// This file connects the webhook client (router/webhook) to the edge: the
// settings a /register asks for, the connect event before a member joins,
// and each connection's message and close events.

// WebhookConfig is the operator's webhook settings (docs/protocol.md §11).
type WebhookConfig struct {
	// Allow is -webhook-allow: host patterns, IPs and CIDRs. Empty means
	// webhooks are off: a /register that asks for one gets 400.
	Allow string
	// Timeout bounds each call; 0 means 5 s.
	Timeout time.Duration
	// Retries is how many times a failed message or close event is tried
	// again; 0 means 5, negative none.
	Retries int
	// Queue is how many of one connection's events may wait before its
	// reader stops reading; 0 means 64.
	Queue int
	// MaxCalls bounds the calls in flight for the whole process; 0 means
	// 64.
	MaxCalls int
	// Backoff is the first retry's delay; 0 means 0.5 s (tests shorten
	// it).
	Backoff time.Duration
}

var (
	errWebhookRefused = errors.New("refused by the registration's backend")
	errWebhookFailed  = errors.New("the registration's backend did not answer")
)

// webhookSpec reads /register's webhook, webhook_secret and webhook_events.
func (rt *Router) webhookSpec(p *params) (registry.Webhook, error) {
	var wh registry.Webhook
	u, err := p.get("webhook")
	if err != nil {
		return wh, err
	}
	secret, err := p.get("webhook_secret")
	if err != nil {
		return wh, err
	}
	events, err := p.get("webhook_events")
	if err != nil {
		return wh, err
	}
	if u == "" {
		if secret != "" || events != "" {
			return wh, paramError("webhook_secret and webhook_events need a webhook")
		}
		return wh, nil
	}
	if err := rt.hookAllow.CheckURL(u); err != nil {
		return wh, paramError("%v", err)
	}
	if len(secret) < webhook.MinSecret || len(secret) > webhook.MaxSecret {
		return wh, paramError("webhook_secret: %d to %d bytes", webhook.MinSecret, webhook.MaxSecret)
	}
	ev, err := webhook.ParseEvents(events)
	if err != nil {
		return wh, paramError("%v", err)
	}
	return registry.Webhook{URL: u, Secret: []byte(secret), Events: uint8(ev)}, nil
}

// hookSettings are reg's webhook settings for the client.
func hookSettings(reg *registry.Registration) webhook.Settings {
	w := reg.Webhook
	return webhook.Settings{URL: w.URL, Secret: w.Secret, Events: webhook.Events(w.Events)}
}

// hookEvent is the part of every event that names the member.
func hookEvent(reg *registry.Registration, connID string, role registry.Role, name, remoteAddr string) webhook.Event {
	return webhook.Event{
		Registration: reg.ID, Conn: connID, Role: role.String(), Name: name,
		RemoteAddr: remoteAddr, Time: time.Now().UTC(),
	}
}

// connectHook asks the registration's backend whether the member may join
// (fail closed); it returns the name the backend gave, if any.
func (rt *Router) connectHook(ctx context.Context, reg *registry.Registration, ev webhook.Event) (string, error) {
	s := hookSettings(reg)
	if !s.Wants(webhook.Connect) {
		return "", nil
	}
	v := rt.hooks.Connect(ctx, s, ev)
	switch {
	case v.Refused:
		return "", errWebhookRefused
	case !v.Admit:
		return "", errWebhookFailed
	case v.Name != "" && !validName(v.Name):
		// A backend's mistake: fail closed rather than drop the name.
		return "", errWebhookFailed
	}
	return v.Name, nil
}

// startHooks starts c's message and close events, if its registration wants
// them.
func (c *conn) startHooks() {
	s := hookSettings(c.reg)
	if !s.Wants(webhook.Message) && !s.Wants(webhook.Close) {
		return
	}
	c.hookEvents = s.Events
	c.hookQueue = c.rt.hooks.NewQueue(c.rt.baseCtx, s, c.rt.cfg.Webhooks.Queue)
}

// hookMessage queues a message event, waiting while the queue is full: the
// reader does not read on, so the sender is slowed and nothing is lost.
func (c *conn) hookMessage(ctx context.Context, msg registry.Message) {
	if c.hookQueue == nil || c.hookEvents&webhook.Message == 0 {
		return
	}
	c.hookQueue.Push(ctx, webhook.MessageEvent(c.hookEvent(), msg.Binary, msg.Data))
}

// endHooks queues the close event (how the connection ended) and lets the
// queue drain on its own.
func (c *conn) endHooks(closure registry.Closure) {
	if c.hookQueue == nil {
		return
	}
	var last *webhook.Event
	if c.hookEvents&webhook.Close != 0 {
		ev := webhook.CloseEvent(c.hookEvent(), closure.Code, closure.Reason)
		last = &ev
	}
	c.hookQueue.Close(c.rt.baseCtx, last)
}

func (c *conn) hookEvent() webhook.Event {
	return hookEvent(c.reg, c.id, c.role, c.name, c.remoteAddr)
}
