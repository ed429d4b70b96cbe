#!/usr/bin/env bash
# make run: start kiln serve, build examples/hello through it, show the
# result, then keep serving until Ctrl-C.
set -euo pipefail
addr=$1 data=$2
cd "$(dirname "$0")/.."

bin/kiln serve --listen "$addr" --data "$data" &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null' EXIT INT TERM

export KILN_ADDR="http://$addr"
for _ in $(seq 100); do
	curl -fsS "$KILN_ADDR/healthz" >/dev/null 2>&1 && break
	kill -0 $server 2>/dev/null || { echo "kiln serve exited; see its log above" >&2; exit 1; }
	sleep 0.2
done
export KILN_TOKEN=$(cat "$data/admin.token")

# No public registry is needed: the base image is busybox from Debian's
# busybox-static, built FROM scratch and pushed into kiln's own registry.
base=$(mktemp -d)
cp /bin/busybox examples/busybox/Dockerfile "$base/"
echo "== building the base image base/busybox from $base"
bin/kiln build --progress plain -t base/busybox:latest "$base"
rm -rf "$base"

echo "== building examples/hello"
bin/kiln build -t hello:latest --build-arg REGISTRY="$addr" examples/hello
echo
echo "== images in kiln's registry"
bin/kiln images ls
echo
echo "Pull it with any OCI client, e.g.:"
echo "  skopeo inspect --tls-verify=false --creds kiln:\$(cat $data/admin.token) docker://$addr/hello:latest"
echo "kiln keeps serving on http://$addr — press Ctrl-C to stop."
wait $server
