// Package builds is the build domain: it validates submissions, records
// builds and their events, queues them on River, and runs them — taking
// the scope's cache volume, then a global slot, then handing a job to the
// runtime. Cancel, timeout and server restarts all end in exactly one
// terminal state per build.
package builds
