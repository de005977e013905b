package registry

import (
	"encoding/json"
	"errors"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// recordJSON is a Record as stores keep it: the data file and a cluster's
// bucket share this form.
type recordJSON struct {
	ID          string    `json:"id"`
	Type        string    `json:"type"`
	Created     time.Time `json:"created"`
	KeyHash     []byte    `json:"key_hash"`
	HostKeyHash []byte    `json:"host_key_hash"`
	Generation  uint64    `json:"generation"`
	// Webhook settings, absent when none (a schema 1 addition of the data
	// file that older records simply lack).
	WebhookURL    string `json:"webhook_url,omitempty"`
	WebhookSecret []byte `json:"webhook_secret,omitempty"`
	WebhookEvents uint8  `json:"webhook_events,omitempty"`
}

// MarshalRecord returns rec as a store keeps it: JSON.
func MarshalRecord(rec Record) ([]byte, error) {
	return json.Marshal(recordJSON{rec.ID, rec.Type.String(), rec.Created.UTC(), rec.KeyHash, rec.HostKeyHash, rec.Generation,
		rec.Webhook.URL, rec.Webhook.Secret, rec.Webhook.Events})
}

// ErrMalformed is UnmarshalRecord's error for JSON that is not a whole
// record: no id, an unknown type, no generation, or keys that are not
// bcrypt hashes.
var ErrMalformed = errors.New("malformed record")

// UnmarshalRecord reads what MarshalRecord wrote, and checks it.
func UnmarshalRecord(b []byte) (Record, error) {
	var r recordJSON
	if err := json.Unmarshal(b, &r); err != nil {
		return Record{}, err
	}
	typ, ok := ParseType(r.Type)
	if !ok || r.ID == "" || r.Generation == 0 || !isHash(r.KeyHash) || !isHash(r.HostKeyHash) {
		return Record{}, ErrMalformed
	}
	return Record{
		ID: r.ID, Type: typ, Created: r.Created, KeyHash: r.KeyHash,
		HostKeyHash: r.HostKeyHash, Generation: r.Generation,
		Webhook: Webhook{URL: r.WebhookURL, Secret: r.WebhookSecret, Events: r.WebhookEvents},
	}, nil
}

// isHash reports whether b is a bcrypt hash (a garbage one would fail every
// key check, silently).
func isHash(b []byte) bool {
	_, err := bcrypt.Cost(b)
	return err == nil
}
