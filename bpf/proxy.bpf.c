// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* proxy.bpf.c: the stream verdict that splices a client socket to its
 * backend socket inside the kernel. Maps are in maps.h. */

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#include "maps.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Keep these types in BTF so bpf2go generates their Go twins. */
const enum verdict_reason *unused_verdict_reason __attribute__((unused));

static __always_inline void count_verdict(enum verdict_reason reason)
{
	__u32 key = reason;
	__u64 *slot = bpf_map_lookup_elem(&verdicts, &key);

	if (slot)
		*slot += 1; /* per-CPU: no atomic needed */
}

static __always_inline void count_backend_bytes(__u32 counter, __u64 len)
{
	__u64 *slot = bpf_map_lookup_elem(&backend_bytes, &counter);

	if (slot)
		*slot += len;
}

/* own_flow is the flow slot of the socket whose cookie is cookie, or NULL
 * when the pairing names a slot out of range or one another socket owns
 * now (userspace deletes the pairings of closed sockets in batches, a tick
 * later, so a stale entry may name a reused descriptor's slot). */
static __always_inline struct flow *own_flow(struct pairing *pair, __u64 cookie)
{
	__u32 slot = pair->flow;
	struct flow *flow = bpf_map_lookup_elem(&flows, &slot);

	if (!flow || flow->cookie != cookie)
		return NULL;
	return flow;
}

SEC("sk_skb/stream_verdict")
int splice_verdict(struct __sk_buff *skb)
{
	__u64 cookie;
	struct pairing *pair;
	struct flow *flow;
	__u64 before;

	cookie = bpf_get_socket_cookie(skb);
	pair = bpf_map_lookup_elem(&pairings, &cookie);
	if (skb->len == 0) {
		/* A bare FIN. TCP has already taken its meaning (the socket is
		 * shut for reading), so dropping the empty skb loses nothing.
		 * Redirected or passed, it could land in a psock backlog whose
		 * worker reads a zero-byte transfer as a broken pipe and sets
		 * EPIPE on the socket. Userspace propagates the FIN itself once
		 * every byte before it has reached the peer; the FIN bit tells
		 * it the count is final without a recv to prove it. */
		if (pair && (flow = own_flow(pair, cookie)))
			__sync_fetch_and_or(&flow->state, FLOW_FIN);
		count_verdict(VERDICT_DROP_EMPTY);
		return SK_DROP;
	}
	if (!pair) {
		/* Not ours to move: leave the bytes in the socket's own queue. */
		count_verdict(VERDICT_PASS_UNPAIRED);
		return SK_PASS;
	}
	flow = own_flow(pair, cookie);
	if (!flow) {
		count_verdict(VERDICT_PASS_BAD_FLOW);
		return SK_PASS;
	}

	/* Count first, then decide on the armed bit we counted under: userspace
	 * arms with a compare-and-swap on the same word, so every byte is
	 * either counted before arming (passed, forwarded by userspace in
	 * order) or after it (redirected), never lost between the two. */
	before = __sync_fetch_and_add(&flow->state, (__u64)skb->len);
	if (!(before & FLOW_ARMED)) {
		count_verdict(VERDICT_PASS_UNARMED);
		return SK_PASS;
	}

	if (bpf_sk_redirect_hash(skb, &sockets, &pair->peer_cookie, 0) != SK_PASS) {
		/* The peer closed and left the sockhash. Returning the helper's
		 * SK_DROP would throw away bytes TCP already acknowledged; keep
		 * them readable here, userspace is tearing the connection down. */
		count_verdict(VERDICT_PASS_PEER_GONE);
		return SK_PASS;
	}
	count_backend_bytes(pair->counter, skb->len);
	count_verdict(VERDICT_REDIRECTED);
	return SK_PASS;
}
