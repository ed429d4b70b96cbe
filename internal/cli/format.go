package cli

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"text/template"
	"time"

	"github.com/spf13/cobra"
)

// humanSize renders a byte count with binary units: "0 B", "512 B",
// "1.5 KiB", "23.4 MiB".
func humanSize(n int64) string {
	if n < 1024 {
		return fmt.Sprintf("%d B", n)
	}
	units := []string{"KiB", "MiB", "GiB", "TiB", "PiB"}
	v := float64(n)
	for _, u := range units {
		v /= 1024
		if v < 1024 || u == units[len(units)-1] {
			if v >= 100 {
				return fmt.Sprintf("%.0f %s", v, u)
			}
			return fmt.Sprintf("%.1f %s", v, u)
		}
	}
	panic("unreachable")
}

// humanAge renders how long ago t was, compactly: "12s", "5m", "3h", "4d".
func humanAge(now, t time.Time) string {
	d := now.Sub(t)
	switch {
	case d < 0:
		return "0s"
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

// humanUntil renders when a deadline such as an expiry falls, relative to
// now: "in 23h", "expired 2d ago".
func humanUntil(now, t time.Time) string {
	if t.After(now) {
		return "in " + humanAge(t, now)
	}
	return "expired " + humanAge(now, t) + " ago"
}

// shortDigest keeps the algorithm and 12 hex digits, like docker's IMAGE ID.
func shortDigest(d string) string {
	algo, hex, ok := strings.Cut(d, ":")
	if !ok || len(hex) <= 12 {
		return d
	}
	return algo + ":" + hex[:12]
}

func deref[T any](p *T) (v T) {
	if p != nil {
		v = *p
	}
	return v
}

// orDash shows an empty table cell as "-".
func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func newTable(w io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
}

// printJSON writes v indented, for --json output.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// seconds renders a step duration the way buildx does: "1.2s".
func seconds(d time.Duration) string {
	if d < 0 {
		d = 0
	}
	return fmt.Sprintf("%.1fs", d.Seconds())
}

// listOutput is how a list command prints its rows: --format and -q.
type listOutput struct {
	format string
	quiet  bool
	tmpl   *template.Template
}

// addListOutputFlags registers --format and -q/--quiet; key says what -q
// prints ("IDs", "names", "scopes").
func addListOutputFlags(c *cobra.Command, o *listOutput, key string) {
	c.Flags().StringVar(&o.format, "format", "table",
		"table, json (one JSON object per line, as the API gives it), or a Go template over each row's JSON fields, such as '{{.name}}\\t{{.size}}'")
	c.Flags().BoolVarP(&o.quiet, "quiet", "q", false, "print only the "+key+", one per line")
}

// check validates the flags before anything is sent.
func (o *listOutput) check(cmd *cobra.Command) error {
	switch {
	case o.quiet && cmd.Flags().Changed("format") && o.format != "table":
		return usageError(cmd, "-q and --format %s do not go together: -q prints only one column", o.format)
	case o.format == "table" || o.format == "json":
		return nil
	case !strings.Contains(o.format, "{{"):
		return usageError(cmd, "invalid --format %q: use table, json or a Go template such as '{{.id}}'", o.format)
	}
	// As docker: a \t or \n typed in the shell's quotes means a tab or
	// a newline.
	text := strings.NewReplacer(`\t`, "\t", `\n`, "\n").Replace(o.format)
	t, err := template.New("format").Funcs(templateFuncs).Parse(text)
	if err != nil {
		return usageError(cmd, "invalid --format template: %v", err)
	}
	o.tmpl = t
	return nil
}

// printRows prints rows (API objects) as o says: key gives a row's -q
// value, table prints them as a table.
func printRows[T any](w io.Writer, o *listOutput, rows []T, key func(T) string, table func(io.Writer, []T) error) error {
	switch {
	case o.quiet:
		for _, r := range rows {
			fmt.Fprintln(w, key(r))
		}
		return nil
	case o.format == "json":
		enc := json.NewEncoder(w)
		for _, r := range rows {
			if err := enc.Encode(r); err != nil {
				return err
			}
		}
		return nil
	case o.tmpl != nil:
		for _, r := range rows {
			if err := execTemplate(w, o.tmpl, r); err != nil {
				return err
			}
		}
		return nil
	}
	return table(w, rows)
}

// execTemplate runs t over v's JSON form (so fields have the API's
// names: {{.name}}, {{.image_digest}}) and ends the output with a
// newline, as docker's --format does.
func execTemplate(w io.Writer, t *template.Template, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber() // sizes print as 1234567, not 1.234567e+06
	var obj any
	if err := dec.Decode(&obj); err != nil {
		return err
	}
	var buf bytes.Buffer
	if err := t.Execute(&buf, obj); err != nil {
		return fmt.Errorf("--format template: %w", err)
	}
	buf.WriteByte('\n')
	_, err = w.Write(buf.Bytes())
	return err
}

// templateFuncs are the functions --format templates may call, besides
// text/template's own.
var templateFuncs = template.FuncMap{
	"json": func(v any) (string, error) {
		b, err := json.Marshal(v)
		return string(b), err
	},
	"join":  func(sep string, v []any) string { return joinAny(v, sep) },
	"upper": strings.ToUpper,
	"lower": strings.ToLower,
	// size renders a byte count as the tables do: {{size .size}}.
	"size": func(v any) string {
		switch n := v.(type) {
		case json.Number:
			i, err := n.Int64()
			if err == nil {
				return humanSize(i)
			}
		case nil:
			return "-"
		}
		return fmt.Sprint(v)
	},
	// short shortens a digest as the tables do: {{short .digest}}.
	"short": func(v any) string {
		s, _ := v.(string)
		return shortDigest(s)
	},
}

func joinAny(v []any, sep string) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = fmt.Sprint(x)
	}
	return strings.Join(parts, sep)
}
