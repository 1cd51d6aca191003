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
	__u64 state;  /* FLOW_ARMED | FLOW_FIN | count of bytes seen by the verdict */
	__u64 cookie; /* the socket that owns the slot now: a pairing left behind
	               * by a closed socket whose fd was reused names the slot
	               * but not this cookie, and is ignored */
};

/* One backend of the routing table the proxy is using, at its stable slot.
 * An mmapable array: userspace stores the live connection count with no
 * system call, and bpftool shows the table as the proxy sees it. */
struct backend_info {
	char id[BACKEND_ID_LEN];   /* empty: slot unused (backend deleted) */
	__u8 addr[16];             /* IPv6, or IPv4 as ::ffff:a.b.c.d */
	__u16 port;
	__u8 healthy;
	__u8 _pad0;
	__u32 weight;
	__u32 soft_limit;
	__u32 hard_limit;
	__u32 active;              /* connections open or being dialled */
	__u32 _pad1;
};

/* A client address: IPv6, or IPv4 as ::ffff:a.b.c.d, so a mapped address
 * and its IPv4 form are the same client. */
struct client_key {
	__u8 addr[16];
};

/* Where a client is bound and when the binding was last used. */
struct binding {
	char backend_id[BACKEND_ID_LEN];
	__u64 last_used_unix_ns;
};
