package registry

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	"github.com/sirupsen/logrus"
)

var (
	logrusOnce   sync.Once
	logrusTarget atomic.Pointer[slog.Logger]
)

// routeLogrus sends the logrus standard logger, which distribution logs to
// and which kiln cannot replace per app, into l.
func routeLogrus(l *slog.Logger) {
	logrusTarget.Store(l)
	logrusOnce.Do(func() {
		std := logrus.StandardLogger()
		std.AddHook(slogHook{})
		std.SetOutput(io.Discard)
	})
}

type slogHook struct{}

func (slogHook) Levels() []logrus.Level { return logrus.AllLevels }

func (slogHook) Fire(e *logrus.Entry) error {
	l := logrusTarget.Load()
	if l == nil {
		return nil
	}
	ctx := context.Background()
	level := slogLevel(e)
	if !l.Enabled(ctx, level) {
		return nil
	}
	attrs := make([]slog.Attr, 0, len(e.Data))
	for k, v := range e.Data {
		if k == "go.version" || k == "instance.id" {
			continue
		}
		if err, ok := v.(error); ok {
			attrs = append(attrs, slog.String(k, err.Error()))
			continue
		}
		attrs = append(attrs, slog.String(k, fmt.Sprint(v)))
	}
	l.LogAttrs(ctx, level, e.Message, attrs...)
	return nil
}

// slogLevel maps distribution's levels onto kiln's: its Info is per-request
// chatter, and a 401 challenge or a client's 404 is normal protocol flow,
// not a warning for the operator.
func slogLevel(e *logrus.Entry) slog.Level {
	switch {
	case e.Level >= logrus.InfoLevel:
		return slog.LevelDebug
	case strings.HasPrefix(e.Message, "error authorizing context"):
		return slog.LevelDebug
	case e.Message == "response completed with error":
		if code, ok := e.Data["err.code"].(errcode.ErrorCode); ok && code.Descriptor().HTTPStatusCode < 500 {
			return slog.LevelDebug
		}
		return slog.LevelError
	case e.Level == logrus.WarnLevel:
		return slog.LevelWarn
	default:
		return slog.LevelError
	}
}
