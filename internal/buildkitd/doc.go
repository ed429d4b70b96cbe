// Package buildkitd starts and stops one private buildkitd whose root is a
// build's cache volume, and holds the mount and cgroup cleanup that goes
// with it. The process runtime (on the host) and the guest agent (inside a
// builder VM) both run their daemons through it, so the daemon's config,
// GC bounds and shutdown behave the same in both places.
package buildkitd
