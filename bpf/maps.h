/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* maps.h: every map of the data plane, each with who writes it and when. */
#pragma once

#include "consts.h"
#include "structs.h"

/* socket cookie -> socket; written by userspace when a connection is
 * paired, emptied by the kernel when a socket closes. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u64);
	__type(value, __u64);
} sockets SEC(".maps");

/* socket cookie -> its peer and slots; written by userspace on pair (both
 * sockets in one batch), deleted by userspace on close. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u64);
	__type(value, struct pairing);
} pairings SEC(".maps");

/* flow slot -> arming state and byte count; userspace owns the armed bit
 * (compare-and-swap through mmap), the verdict adds each skb's length. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u32);
	__type(value, struct flow);
} flows SEC(".maps");

/* backend * 2 + direction (0: client to backend, 1: backend to client) ->
 * bytes redirected; read and summed by the metrics collector. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_BACKENDS * 2);
	__type(key, __u32);
	__type(value, __u64);
} backend_bytes SEC(".maps");

/* enum verdict_reason -> number of skbs; read by the metrics collector. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, VERDICT_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} verdicts SEC(".maps");

/* backend slot -> backend; written by userspace on every routing reload
 * and on every connection open and close (the active count, via mmap). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct backend_info);
} backends SEC(".maps");

/* client address -> binding; written by userspace when a client is routed,
 * swept by userspace once a binding outlives its TTL. Survives restarts:
 * a new process reuses the pinned map. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_AFFINITY);
	__type(key, struct client_key);
	__type(value, struct binding);
} affinity SEC(".maps");
