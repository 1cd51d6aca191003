/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* structs.h: map keys and values; bpf2go generates their Go twins. */
#pragma once

/* Value of the pairing map, keyed by a socket's cookie. */
struct pairing {
	__u64 peer_cookie; /* the other socket of the connection */
	__u32 flow;        /* slot in flows[] for bytes this socket receives */
	__u32 counter;     /* slot in backend_bytes[]: backend * 2 + direction */
};

/* One direction of a connection: the bytes one socket receives. Lives in an
 * mmapable array so userspace reads it and compare-and-swaps the armed bit
 * without a system call. */
struct flow {
	__u64 state; /* FLOW_ARMED | count of bytes seen by the verdict */
};
