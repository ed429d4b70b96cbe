// Package api holds kiln's REST contract: openapi.yaml and the types and
// client generated from it by `make generate` (api.gen.go, never edited by
// hand).
package api

//go:generate go tool oapi-codegen -config oapi-codegen.yaml openapi.yaml
