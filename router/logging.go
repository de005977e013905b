package router

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Events an attacker can cause at will (wrong keys, refused upgrades,
// lockouts) are logged, but each kind at most logBurst lines at once and
// logRate a second after that, so a flood cannot flood the log. The next
// line of a kind after a quiet spell says how many were left out.
const (
	logRate  = 1
	logBurst = 10
)

// limitedLog writes rate-limited log lines, per kind of event.
type limitedLog struct {
	log *slog.Logger

	mu    sync.Mutex
	kinds map[string]*logKind // guarded by mu; a handful of fixed kinds
}

type logKind struct {
	lim        *rate.Limiter
	suppressed int // guarded by limitedLog.mu
}

func newLimitedLog(log *slog.Logger) *limitedLog {
	return &limitedLog{log: log, kinds: map[string]*logKind{}}
}

func (l *limitedLog) warn(kind, msg string, args ...any) {
	l.write(slog.LevelWarn, kind, msg, args...)
}

func (l *limitedLog) error(kind, msg string, args ...any) {
	l.write(slog.LevelError, kind, msg, args...)
}

func (l *limitedLog) info(kind, msg string, args ...any) {
	l.write(slog.LevelInfo, kind, msg, args...)
}

func (l *limitedLog) write(level slog.Level, kind, msg string, args ...any) {
	if !l.log.Enabled(context.Background(), level) {
		return
	}
	l.mu.Lock()
	k := l.kinds[kind]
	if k == nil {
		k = &logKind{lim: rate.NewLimiter(logRate, logBurst)}
		l.kinds[kind] = k
	}
	if !k.lim.AllowN(time.Now(), 1) {
		k.suppressed++
		l.mu.Unlock()
		return
	}
	n := k.suppressed
	k.suppressed = 0
	l.mu.Unlock()
	if n > 0 {
		args = append(args, "suppressed", n)
	}
	l.log.Log(context.Background(), level, msg, args...)
}
