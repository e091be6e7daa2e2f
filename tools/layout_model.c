/* layout_model.c: how the layout of int8 expert rows bounds a one-token matvec's read rate.
 *
 * Why: lowmem's host kernels (lowmem/simd_kernels.py) read an int8 expert matrix,
 * stored row-major with row_pad bytes after each row (docs/FORMAT.md section 7), as
 * 16-row x 64-column strips: 16 row streams that advance 64 bytes per call. This
 * model runs that access pattern and arithmetic in plain C beside the same work on
 * a copy in which each 16 x 64 tile is contiguous (1 KiB, the interleaved rows of
 * llama.cpp's repacked formats), and beside a sequential read of the same bytes,
 * in one process, alternating (the VMs here are noisy). It answers whether a
 * format change could lift the kernels toward the read before anyone writes one
 * (figures: docs/PERFORMANCE.md section 3, "Session 15").
 *
 * Variants, each over K x N int8 weights split by rows between the threads:
 *   read        sequential AVX-512 sum of the row-major bytes (the floor)
 *   rows-fp32   lowmem's fp32 kernel: sign-extend, convert, FMA with x[k] broadcast;
 *               16-row strips, prefetch 256 bytes ahead along each row
 *   tiles-fp32  the same arithmetic on the tiled copy
 *   rows-vnni   one vpdpbusd per 64 bytes (the int8-activation kernels' core op)
 *   tiles-vnni  the same on the tiled copy
 * The tiled variants must produce the rows variants' outputs bit for bit (same
 * order of operations); the program checks that and exits 1 if not.
 *
 * Build and run (AVX-512 F/BW/VNNI; K a multiple of 16 x threads, N of 64):
 *   gcc -O2 -march=native -pthread tools/layout_model.c -o /tmp/layout_model
 *   /tmp/layout_model [K=24576] [N=32768] [repeats=7] [threads=2]
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { READ, ROWS_FP32, TILES_FP32, ROWS_VNNI, TILES_VNNI, VARIANTS };
static const char *NAMES[VARIANTS] = {"read", "rows-fp32", "tiles-fp32", "rows-vnni",
                                      "tiles-vnni"};
enum { TILE_ROWS = 16, STRIP = 64, ROW_PAD = 64, PREFETCH = 256, MAX_THREADS = 64 };

static size_t K, N, RS;            /* rows, columns, row stride (N + ROW_PAD) */
static int THREADS, VARIANT;
static signed char *rows, *tiles;  /* (K, RS) row-major; (K/16, N/64, 16, 64) tiled */
static float *xs;                  /* (K,) activations */
static float *outs[MAX_THREADS];   /* (N,) per thread */
static volatile long long sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static __m512 widen(const signed char *p) {  /* 16 int8 -> 16 exact float32 */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* One 16 x 64 block at column j: fp32 (FMA chains in registers) or VNNI, then
   added to out. row(r) is the address of the block's row r. */
#define BLOCK(row, PF)                                                                    \
    do {                                                                                  \
        if (fp32) {                                                                       \
            __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), \
                           _mm512_setzero_ps()};                                          \
            for (int r = 0; r < TILE_ROWS; r++) {                                         \
                const signed char *q = row(r);                                            \
                PF;                                                                       \
                __m512 xv = _mm512_set1_ps(xs[k + r]);                                    \
                for (int c = 0; c < 4; c++) a[c] = _mm512_fmadd_ps(xv, widen(q + 16 * c), a[c]); \
            }                                                                             \
            for (int c = 0; c < 4; c++)                                                   \
                _mm512_store_ps(out + j + 16 * c, _mm512_add_ps(_mm512_load_ps(out + j + 16 * c), a[c])); \
        } else {                                                                          \
            __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(),               \
                            _mm512_setzero_si512(), _mm512_setzero_si512()};              \
            for (int r = 0; r < TILE_ROWS; r++) {                                         \
                const signed char *q = row(r);                                            \
                PF;                                                                       \
                a[r & 3] = _mm512_dpbusd_epi32(a[r & 3], xq, _mm512_loadu_si512(q));      \
            }                                                                             \
            for (int c = 0; c < 4; c++)                                                   \
                _mm512_store_ps(out + j + 16 * c, _mm512_add_ps(_mm512_load_ps(out + j + 16 * c), _mm512_cvtepi32_ps(a[c]))); \
        }                                                                                 \
    } while (0)

/* Row r of the block at (k, j): in the row-major copy; in the tiled copy. */
#define ROW_OF(r) (rows + (k + (r)) * RS + j)
#define TILE_OF(r) (tile_row + j * TILE_ROWS + (size_t)(r) * STRIP)

static void *work(void *arg) {
    long id = (long)arg;
    size_t k0 = id * K / THREADS, k1 = (id + 1) * K / THREADS;
    if (VARIANT == READ) {
        const __m512i *p = (const __m512i *)(rows + k0 * RS);
        size_t n = (k1 - k0) * RS / 64;
        __m512i a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_si512();
        for (size_t i = 0; i + 8 <= n; i += 8)
            for (int u = 0; u < 8; u++) a[u] = _mm512_add_epi64(a[u], _mm512_load_si512(p + i + u));
        for (int u = 1; u < 8; u++) a[0] = _mm512_add_epi64(a[0], a[u]);
        sink += _mm512_reduce_add_epi64(a[0]);
        return 0;
    }
    float *out = outs[id];
    memset(out, 0, N * sizeof(float));
    int fp32 = VARIANT == ROWS_FP32 || VARIANT == TILES_FP32;
    __m512i xq = _mm512_set1_epi32(0x01020304);  /* u8 activations 4, 3, 2, 1 */
    for (size_t k = k0; k < k1; k += TILE_ROWS) {
        const signed char *tile_row = tiles + k * N;
        for (size_t j = 0; j < N; j += STRIP) {
            if (VARIANT == ROWS_FP32 || VARIANT == ROWS_VNNI) {
                BLOCK(ROW_OF, _mm_prefetch((const char *)q + PREFETCH, _MM_HINT_T0));
            } else {
                BLOCK(TILE_OF, (void)0);
            }
        }
    }
    return 0;
}

static double run(int variant) {
    pthread_t th[MAX_THREADS];
    VARIANT = variant;
    double t0 = now();
    for (long i = 0; i < THREADS; i++) pthread_create(&th[i], 0, work, (void *)i);
    for (int i = 0; i < THREADS; i++) pthread_join(th[i], 0);
    return (double)K * N / (now() - t0) / 1e9;  /* GB/s of weight bytes */
}

/* Outputs of variant a and b, per thread, bit for bit. */
static int same_outputs(int a, int b, float **saved) {
    run(a);
    for (int i = 0; i < THREADS; i++) memcpy(saved[i], outs[i], N * sizeof(float));
    run(b);
    for (int i = 0; i < THREADS; i++)
        if (memcmp(saved[i], outs[i], N * sizeof(float))) return 0;
    return 1;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    K = argc > 1 ? strtoul(argv[1], 0, 10) : 24576;
    N = argc > 2 ? strtoul(argv[2], 0, 10) : 32768;
    int repeats = argc > 3 ? atoi(argv[3]) : 7;
    THREADS = argc > 4 ? atoi(argv[4]) : 2;
    if (THREADS < 1 || THREADS > MAX_THREADS || repeats < 1 || repeats > 1000 || !K || !N ||
        K % (TILE_ROWS * THREADS) || N % STRIP) {
        fprintf(stderr, "layout_model: expected K a multiple of %d x threads, N of %d, "
                "1..1000 repeats, 1..%d threads; got K %zu N %zu repeats %d threads %d\n",
                TILE_ROWS, STRIP, MAX_THREADS, K, N, repeats, THREADS);
        return 2;
    }
    RS = N + ROW_PAD;
    rows = aligned_alloc(4096, (K * RS + 4095) / 4096 * 4096);  /* sizes: alignment multiples */
    tiles = aligned_alloc(4096, (K * N + 4095) / 4096 * 4096);
    xs = malloc(K * sizeof(float));
    float *saved[MAX_THREADS];
    if (!rows || !tiles || !xs) { fprintf(stderr, "layout_model: out of memory\n"); return 2; }
    for (int i = 0; i < THREADS; i++) {
        outs[i] = aligned_alloc(64, N * sizeof(float));
        saved[i] = malloc(N * sizeof(float));
    }
    for (size_t k = 0; k < K; k++) {
        xs[k] = 1.0f / (float)(k + 1);
        for (size_t n = 0; n < RS; n++)  /* pseudo-random int8 in [-127, 127], pad 0 */
            rows[k * RS + n] = n < N ? (signed char)((k * 7919 + n * 104729) % 255 - 127) : 0;
        for (size_t n = 0; n < N; n++)   /* tile (k/16, n/64), row k%16, column n%64 */
            tiles[(k / TILE_ROWS) * TILE_ROWS * N + (n / STRIP) * TILE_ROWS * STRIP +
                  (k % TILE_ROWS) * STRIP + n % STRIP] = rows[k * RS + n];
    }
    int ok = same_outputs(ROWS_FP32, TILES_FP32, saved) && same_outputs(ROWS_VNNI, TILES_VNNI, saved);
    double gbps[VARIANTS][1000];
    for (int r = 0; r < repeats; r++)
        for (int v = 0; v < VARIANTS; v++) gbps[v][r] = run(v);
    printf("layout_model: K %zu x N %zu int8 (%.0f MB), %d threads, %d repeats\n", K, N,
           K * N / 1e6, THREADS, repeats);
    printf("%-11s %8s %8s %8s %8s\n", "variant", "GB/s", "min", "max", "x read");
    double read = 0;
    for (int v = 0; v < VARIANTS; v++) {
        qsort(gbps[v], repeats, sizeof(double), cmp);
        double med = gbps[v][repeats / 2];
        if (v == READ) read = med;
        printf("%-11s %8.1f %8.1f %8.1f %8.2f\n", NAMES[v], med, gbps[v][0],
               gbps[v][repeats - 1], med / read);
    }
    printf("tiles give the rows' outputs bit for bit: %s\n", ok ? "yes" : "NO");
    return ok ? 0 : 1;
}
