package test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/internal/testkit"
)

// A built image is not only pushed: `kiln run` boots its converted root
// filesystem in a microVM and prints what its CMD prints.
func TestKilnRunBootsABuiltImage(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM")
	}
	builder := testkit.BuilderImage(t)
	s := startServer(t, withArgs("--builder-image", builder.Dir))
	base := s.base()
	mustSucceed(t, s, s.admin, s.build(s.admin, submission{
		files: map[string]string{"Dockerfile": fmt.Sprintf(`FROM %s
ENV GREETING=hello
WORKDIR /srv
RUN echo from-the-image > /srv/msg
CMD ["/bin/sh", "-c", "echo $GREETING $(cat msg) in $(pwd)"]
`, base)},
		fields: [][2]string{{"tags", "runme:1"}},
	}))

	out, code := s.kiln(s.admin, "run", "runme:1")
	if code != 0 || !strings.Contains(out, "hello from-the-image in /srv") {
		t.Fatalf("kiln run runme:1: exit %d\n%s", code, out)
	}
	out, code = s.kiln(s.admin, "run", "-e", "X=7", "runme:1", "--", "sh", "-c", "echo err-$X >&2; exit 3")
	if code != 3 || !strings.Contains(out, "err-7") {
		t.Errorf("kiln run with a command: exit %d\n%s", code, out)
	}
	if out, code = s.kiln(s.admin, "run", "no/such:image"); code == 0 || !strings.Contains(out, "no image") {
		t.Errorf("kiln run of a missing image: exit %d\n%s", code, out)
	}
}
