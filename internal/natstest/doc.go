// Package natstest runs a real NATS server with JetStream inside the test
// process, for tests, demos and benchmarks: the same server haven runs
// against in production, never a mock.
//
// A Server listens on 127.0.0.1 and keeps its JetStream store in a directory
// the caller chooses; Restart brings up a new server on the same port and
// store, so clients see a server crash and return, and JetStream state
// survives. New wraps Start for tests and shuts the server down in t.Cleanup.
package natstest
