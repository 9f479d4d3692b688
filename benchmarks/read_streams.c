/* The roofline's memory read: n floats at p summed as `streams` in-order streams side by side, stream s
   reading the s-th contiguous 1/streams of the buffer, 8 floats of each in turn. One stream is what a
   tensor sum reads; the C kernels' matmul loop reads four at once (rows_times_weight_block.h), which
   one core of an AMD EPYC reads ~1.4x faster. Returns the sum, so that the reads cannot be left out.
   Built as the kernels are (shards/kernels/native.py's load_source, from benchmarks/read_bandwidth.py);
   the vector type keeps the loop vectorised whatever the flags. */

#include <stdint.h>
#include <string.h>

typedef float floats8 __attribute__((vector_size(32)));

enum { MAX_STREAMS = 16 };

double read_streams(const float *p, int64_t n, int64_t streams) {
    if (streams < 1 || streams > MAX_STREAMS) return 0.0;
    const int64_t chunk = n / streams / 8 * 8;
    floats8 acc[MAX_STREAMS];
    memset(acc, 0, sizeof acc);
    for (int64_t i = 0; i < chunk; i += 8)
        for (int64_t s = 0; s < streams; s++) {
            floats8 v;
            memcpy(&v, p + s * chunk + i, sizeof v);
            acc[s] += v;
        }
    double total = 0.0;
    for (int64_t s = 0; s < streams; s++)
        for (int j = 0; j < 8; j++) total += acc[s][j];
    return total;
}
