// Package proto holds haven's wire-format definitions (haven.proto) and the
// generated Go code in havenpb; the envelope that frames a chunk on the
// stream (version, compression) lives in proto/wire.
package proto

//go:generate go run github.com/bufbuild/buf/cmd/buf@v1.75.0 generate
