package store

// SSHAgent is one ssh-agent id a build's RUN --mount=type=ssh steps may
// use (kiln build --ssh ID). Only the id is stored: an agent is forwarded
// from the client through the build's ssh session, and key files (Keys)
// are held in memory only, like secrets.
type SSHAgent struct {
	ID string `json:"id"`
	// Keys: served from key files the client sent with the submission,
	// not from the client's agent.
	Keys bool `json:"keys,omitempty"`
}

// SSHIDs are the build's ssh agent ids, in order.
func (o BuildOptions) SSHIDs() []string {
	ids := make([]string, len(o.SSH))
	for i, a := range o.SSH {
		ids[i] = a.ID
	}
	return ids
}
