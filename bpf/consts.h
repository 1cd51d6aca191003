/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* consts.h: sizes and flag bits shared by the programs and, through bpf2go,
 * by the Go loader. */
#pragma once

/* Sockets that can be paired at once: two per proxied connection. The
 * process's open-file limit (20,000 here) bounds the real number. */
#define MAX_SOCKETS 65536

/* Backends the byte counters have room for; routing refuses more. */
#define MAX_BACKENDS 4096

/* Client IPs the affinity map remembers; the least recently used are
 * evicted beyond this. */
#define MAX_AFFINITY (1 << 20)

/* Longest backend id kept in the backends and affinity maps. */
#define BACKEND_ID_LEN 48

/* flow.state: the top bit says the direction is armed (bytes are redirected
 * to the peer); the next says the verdict saw the remote's bare FIN, so the
 * count is final (every skb before it went through the verdict first); the
 * other 62 bits count every byte the verdict has seen on this socket,
 * redirected or passed. */
#define FLOW_ARMED (1ULL << 63)
#define FLOW_FIN (1ULL << 62)
#define FLOW_COUNT_MASK (FLOW_FIN - 1)

/* Why the verdict returned what it returned; one per-CPU counter each. */
enum verdict_reason {
	VERDICT_REDIRECTED = 0,      /* bytes went to the peer's send path */
	VERDICT_PASS_UNPAIRED = 1,   /* socket has no pairing entry */
	VERDICT_PASS_UNARMED = 2,    /* pairing not armed yet or paused: userspace forwards */
	VERDICT_PASS_PEER_GONE = 3,  /* redirect failed: the peer left the sockhash */
	VERDICT_PASS_BAD_FLOW = 4,   /* pairing names a flow slot out of range or owned by another socket */
	VERDICT_DROP_EMPTY = 5,      /* no payload (a bare FIN): nothing to move */
	VERDICT_REASONS = 6,
};
