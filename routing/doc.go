// Package routing is edgeproxy's decision core: it reads the backend table
// from routing.db, resolves a client's country, and picks the backend a new
// connection goes to.
//
// It is pure Go on purpose. Nothing here opens a socket or touches BPF, so
// every rule can be tested without root, and `edgeproxy route` can explain a
// decision with exactly the code the proxy runs.
//
// The pieces:
//
//   - [LoadTable] reads and validates routing.db into an immutable [Table].
//   - [Store] holds the current Table and hot-reloads it when the database
//     changes; readers never lock.
//   - [Pick] is the allocation-free hot path; [Explain] returns the same
//     decision with every backend's score or exclusion.
//   - [Geo] and [GeoSource] map a client address to an ISO country code, from
//     a MaxMind or ip-location-db .mmdb file or the embedded default.
package routing
