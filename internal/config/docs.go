package config

import (
	"fmt"
	"strings"
)

// Markdown renders docs/configuration.md from the settings table, so the
// documentation cannot drift from the code (a test compares them; `make
// generate` rewrites the file).
func Markdown() string {
	var b strings.Builder
	b.WriteString("# kiln serve configuration\n\n")
	b.WriteString("<!-- generated from internal/config by `make generate`; do not edit -->\n\n")
	b.WriteString("Every setting has a config-file key (YAML; dots are nesting), an environment\n")
	b.WriteString("variable and a flag. Precedence: flag, environment, config file (`--config`\n")
	b.WriteString("or `KILN_CONFIG`), default. Sizes take a bare number of bytes or units\n")
	b.WriteString("(`512MiB`, `20GiB`).\n\n")
	b.WriteString("| key | environment | flag | default | meaning |\n| --- | --- | --- | --- | --- |\n")
	for _, k := range Keys() {
		fmt.Fprintf(&b, "| `%s` | `%s` | `%s` | `%s` | %s |\n", k[0], k[1], k[2], k[3], k[4])
	}
	b.WriteString("\nExample `kiln.yaml`:\n\n```yaml\ndata: /var/lib/kiln\nlisten: 0.0.0.0:7070\nmax_concurrent_builds: 4\nlimits:\n  timeout_seconds:\n    max: 7200\ncache:\n  volume_size: 50GiB\n  max_total_bytes: 500GiB\n```\n")
	return b.String()
}
