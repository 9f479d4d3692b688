// The publish-wait-combine of the shared-memory collectives (shards/shm_collectives.py) in one call,
// instead of ~10 torch ops and a Python wait loop per collective (a decode step makes ten).
//
// Segment layout (see shm_collectives.py): int64 seq[N] at the start of the header; slots of
// slot_bytes each at slots + (parity * N + rank) * slot_bytes, parity = call % 2.
// A rank copies its tensor into its slot, publishes `call` in seq[rank], and yields its core until
// every rank has published `call` (never sleeping: waking a sleeper costs more than a whole
// collective on these machines). The sum runs rank by rank, one pass per rank, so every rank adds
// in the same order and gets bit-identical results (the reassociation -ffast-math allows cannot
// reorder passes over memory).
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int all_published(const int64_t *seq, int64_t n, int64_t call) {
    for (int64_t r = 0; r < n; r++)
        if (__atomic_load_n(&seq[r], __ATOMIC_ACQUIRE) < call) return 0;
    return 1;
}

static char *slot(char *slots, int64_t slot_bytes, int64_t n, int64_t rank, int64_t call) {
    return slots + ((call % 2) * n + rank) * slot_bytes;
}

// Copy `nbytes` from `src` into this rank's slot for `call`, publish, wait for every rank.
// 0 when all have published; -1 past timeout_ns (the caller raises).
int shm_publish_and_wait(int64_t *seq, char *slots, int64_t slot_bytes, int64_t n, int64_t rank, int64_t call,
                         const void *src, int64_t nbytes, int64_t timeout_ns) {
    memcpy(slot(slots, slot_bytes, n, rank, call), src, (size_t)nbytes);
    __atomic_store_n(&seq[rank], call, __ATOMIC_RELEASE);
    int64_t started = 0;
    for (int64_t spins = 0; !all_published(seq, n, call); spins++) {
        sched_yield();
        if ((spins & 255) == 0) {
            int64_t t = now_ns();
            if (!started)
                started = t;
            else if (t - started > timeout_ns)
                return -1;
        }
    }
    return 0;
}

// All-reduce (sum) of `numel` floats in `data`, in place: publish, wait, then sum the ranks' slots in
// rank order into `data`.
int shm_all_reduce_f32(int64_t *seq, char *slots, int64_t slot_bytes, int64_t n, int64_t rank, int64_t call,
                       float *data, int64_t numel, int64_t timeout_ns) {
    int64_t nbytes = numel * (int64_t)sizeof(float);
    if (shm_publish_and_wait(seq, slots, slot_bytes, n, rank, call, data, nbytes, timeout_ns)) return -1;
    memcpy(data, slot(slots, slot_bytes, n, 0, call), (size_t)nbytes);
    for (int64_t r = 1; r < n; r++) {
        const float *part = (const float *)slot(slots, slot_bytes, n, r, call);
        for (int64_t i = 0; i < numel; i++) data[i] += part[i];
    }
    return 0;
}
