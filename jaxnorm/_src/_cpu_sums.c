/* Framed sums for XLA's CPU backend, both in one read of x, and layer, RMS
   and batch norm's forward passes, fused (see cpu_sums.py, and
   jaxnorm_row_norm and jaxnorm_column_norm below).

   For x of shape (P, R, C) (float32 or bfloat16) and a frame f of shape
   (P, C) (float32), row-major, writes
       s1[p, c] = sum_r (x[p, r, c] - f[p, c])
       s2[p, c] = sum_r (x[p, r, c] - f[p, c])^2.
   C >= 16: column sums (batch norm), vectors of 16 columns; C == 1: row sums
   (layer norm), vectors of 16 values along the row. XLA's CPU reductions
   take sum(x) and sum(x * x) at memory speed, but a broadcast frame
   subtracted inside them costs 1.4-1.7x that pair; this loop takes both
   framed sums in the time of the plain pair or less.

   Rounding: BLOCK rows (or BLOCK vectors of a row) are summed in float32,
   then added into float64 accumulators, so the error does not grow with R.

   Called through XLA's original custom-call interface (no XLA headers): the
   shape arrives as an opaque string. Inputs of 2**20 values or more are
   split over a few threads, each with its own accumulators. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define BLOCK 16
#define MAX_THREADS 4
#define VALUES_PER_THREAD (1 << 19)

typedef float vec16 __attribute__((vector_size(64)));

/* An unaligned vector load (a macro: a function returning a vector of 64
   bytes has a different ABI in each target_clones variant). */
#define LOAD16(v, p) memcpy(&(v), (p), sizeof(vec16))

/* Loads of 16 bfloat16 values as 16 floats (a bfloat16 is the top half of
   a float32), and one such value. */
typedef uint16_t vecu16 __attribute__((vector_size(32)));
typedef uint32_t vecu32 __attribute__((vector_size(64)));
#define LOAD16_BF16(v, p)                                      \
  do {                                                         \
    vecu16 h_;                                                 \
    memcpy(&h_, (p), sizeof h_);                               \
    vecu32 w_ = __builtin_convertvector(h_, vecu32) << 16;     \
    memcpy(&(v), &w_, sizeof(vec16));                          \
  } while (0)

static inline float bf16_to_float(uint16_t h) {
  uint32_t w = (uint32_t)h << 16;
  float v;
  memcpy(&v, &w, sizeof v);
  return v;
}

#define FLOAT_ID(v) (v)

/* Column sums take 64 columns at a time (8 vector accumulators) where the
   CPU has 32 vector registers (AVX-512), 32 otherwise. Alone, against 32 at
   a time (interleaved, 41 rounds): 8x8x8x64 21 -> 19 us, 32x16x16x128 231 ->
   202 us, 64x32x32x128 1103 -> 962 us. */
static int wide_cols = -1;

/* slab_sums_*: adds the framed sums of rows [r0, r1) of one (R, C) slab into
   a1, a2. row_sums_*: adds those of one row of R values into *a1, *a2 (C == 1:
   the statistics of layer norm), 16 lanes along the row, BLOCK vectors per
   float32 partial. One version per input type (float32, bfloat16). */
#define DEFINE_SUMS(NAME, T, LOADX, TOF) \
/* Adds the framed sums of rows [r0, r1) of one (R, C) slab into a1, a2. */ \
__attribute__((target_clones("avx512f", "avx2", "default"))) \
static void slab_sums_##NAME(const T* x, const float* f, int64_t C, int64_t r0, int64_t r1, \
                      double* a1, double* a2) { \
  for (int64_t r = r0; r < r1; r += BLOCK) { \
    int64_t re = r + BLOCK < r1 ? r + BLOCK : r1; \
    int64_t c = 0; \
    for (; wide_cols && c + 64 <= C; c += 64) { \
      vec16 f0, f1, f2, f3, x0, x1, x2, x3; \
      LOAD16(f0, f + c); \
      LOAD16(f1, f + c + 16); \
      LOAD16(f2, f + c + 32); \
      LOAD16(f3, f + c + 48); \
      vec16 p0 = {0}, p1 = {0}, q0 = {0}, q1 = {0}, p2 = {0}, p3 = {0}, q2 = {0}, q3 = {0}; \
      for (int64_t i = r; i < re; i++) { \
        LOADX(x0, x + i * C + c); \
        LOADX(x1, x + i * C + c + 16); \
        LOADX(x2, x + i * C + c + 32); \
        LOADX(x3, x + i * C + c + 48); \
        vec16 d0 = x0 - f0, d1 = x1 - f1, d2 = x2 - f2, d3 = x3 - f3; \
        p0 += d0; \
        p1 += d1; \
        p2 += d2; \
        p3 += d3; \
        q0 += d0 * d0; \
        q1 += d1 * d1; \
        q2 += d2 * d2; \
        q3 += d3 * d3; \
      } \
      for (int k = 0; k < 16; k++) { \
        a1[c + k] += p0[k]; \
        a1[c + 16 + k] += p1[k]; \
        a1[c + 32 + k] += p2[k]; \
        a1[c + 48 + k] += p3[k]; \
        a2[c + k] += q0[k]; \
        a2[c + 16 + k] += q1[k]; \
        a2[c + 32 + k] += q2[k]; \
        a2[c + 48 + k] += q3[k]; \
      } \
    } \
    for (; c + 32 <= C; c += 32) { \
      vec16 f0, f1, x0, x1; \
      LOAD16(f0, f + c); \
      LOAD16(f1, f + c + 16); \
      vec16 p0 = {0}, p1 = {0}, q0 = {0}, q1 = {0}; \
      for (int64_t i = r; i < re; i++) { \
        LOADX(x0, x + i * C + c); \
        LOADX(x1, x + i * C + c + 16); \
        vec16 d0 = x0 - f0, d1 = x1 - f1; \
        p0 += d0; \
        p1 += d1; \
        q0 += d0 * d0; \
        q1 += d1 * d1; \
      } \
      for (int k = 0; k < 16; k++) { \
        a1[c + k] += p0[k]; \
        a1[c + 16 + k] += p1[k]; \
        a2[c + k] += q0[k]; \
        a2[c + 16 + k] += q1[k]; \
      } \
    } \
    for (; c + 16 <= C; c += 16) { \
      vec16 f0, x0, p0 = {0}, q0 = {0}; \
      LOAD16(f0, f + c); \
      for (int64_t i = r; i < re; i++) { \
        LOADX(x0, x + i * C + c); \
        vec16 d0 = x0 - f0; \
        p0 += d0; \
        q0 += d0 * d0; \
      } \
      for (int k = 0; k < 16; k++) { \
        a1[c + k] += p0[k]; \
        a2[c + k] += q0[k]; \
      } \
    } \
    for (; c < C; c++) { \
      float p = 0.f, q = 0.f; \
      for (int64_t i = r; i < re; i++) { \
        float d = TOF(x[i * C + c]) - f[c]; \
        p += d; \
        q += d * d; \
      } \
      a1[c] += p; \
      a2[c] += q; \
    } \
  } \
} \
 \
/* Adds the framed sums of one row of R values into *a1, *a2 (C == 1: the \
   statistics of layer norm). 16 lanes along the row; BLOCK vectors per \
   float32 partial. */ \
__attribute__((target_clones("avx512f", "avx2", "default"))) \
static void row_sums_##NAME(const T* x, float f, int64_t R, double* a1, double* a2) { \
  double u[16] = {0}, v[16] = {0}; \
  vec16 fv, xv; \
  for (int k = 0; k < 16; k++) fv[k] = f; \
  int64_t r = 0; \
  while (r + 16 <= R) { \
    vec16 p0 = {0}, q0 = {0}; \
    int64_t end = r + 16 * BLOCK <= R ? r + 16 * BLOCK : R - (R - r) % 16; \
    for (; r < end; r += 16) { \
      LOADX(xv, x + r); \
      vec16 d = xv - fv; \
      p0 += d; \
      q0 += d * d; \
    } \
    for (int k = 0; k < 16; k++) { \
      u[k] += p0[k]; \
      v[k] += q0[k]; \
    } \
  } \
  double su = 0, sv = 0; \
  for (int k = 0; k < 16; k++) { \
    su += u[k]; \
    sv += v[k]; \
  } \
  for (; r < R; r++) { \
    double d = (double)(TOF(x[r]) - f); \
    su += d; \
    sv += d * d; \
  } \
  *a1 += su; \
  *a2 += sv; \
}

DEFINE_SUMS(f32, float, LOAD16, FLOAT_ID)
DEFINE_SUMS(bf16, uint16_t, LOAD16_BF16, bf16_to_float)

typedef struct {
  const void* x;
  int bf16;       /* x holds bfloat16 values (else float32) */
  const float* f;
  int64_t R, C;
  int64_t p0, p1; /* slabs [p0, p1) */
  int64_t r0, r1; /* rows of each slab */
  double* acc;    /* 2 C doubles */
  float* s1;      /* where slab p's sums go: s1 + p C; NULL: leave them in acc */
  float* s2;
} job;

static void run_job(void* arg) {
  job* j = arg;
  for (int64_t p = j->p0; p < j->p1; p++) {
    memset(j->acc, 0, (size_t)(2 * j->C) * sizeof(double));
    double* a1 = j->acc;
    double* a2 = j->acc + j->C;
    if (j->bf16) {
      const uint16_t* x = (const uint16_t*)j->x + p * j->R * j->C;
      if (j->C == 1) {
        row_sums_bf16(x + j->r0, j->f[p], j->r1 - j->r0, a1, a2);
      } else {
        slab_sums_bf16(x, j->f + p * j->C, j->C, j->r0, j->r1, a1, a2);
      }
    } else {
      const float* x = (const float*)j->x + p * j->R * j->C;
      if (j->C == 1) {
        row_sums_f32(x + j->r0, j->f[p], j->r1 - j->r0, a1, a2);
      } else {
        slab_sums_f32(x, j->f + p * j->C, j->C, j->r0, j->r1, a1, a2);
      }
    }
    if (j->s1 != NULL) {
      for (int64_t c = 0; c < j->C; c++) {
        j->s1[p * j->C + c] = (float)j->acc[c];
        j->s2[p * j->C + c] = (float)j->acc[j->C + c];
      }
    }
  }
}

/* Pauses before a waiting thread sleeps (wait_while): some tens of
   microseconds. */
#define SPINS 2000

/* Waits while *word == seen: a short spin (the other threads are usually
   running and close), then asleep in the kernel (futex), so that the thread
   waited for can take this core. A spin alone (with sched_yield every 64
   pauses) held the core: inside ResNet-18's training step with the opt-in
   column backward pass, where XLA runs another thunk on the other core, the
   calls took 46 ms per step with it and 34 ms with this wait (jax.profiler
   trace, batch 8); the helper had queued behind that thunk. */
static void wait_while(int* word, int seen) {
  for (int i = 0; i < SPINS; i++) {
    if (__atomic_load_n(word, __ATOMIC_ACQUIRE) != seen) return;
    __builtin_ia32_pause();
  }
  while (__atomic_load_n(word, __ATOMIC_ACQUIRE) == seen) {
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
  }
}

static void wake_all(int* word) {
  syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, MAX_THREADS, NULL, NULL, 0);
}

/* Helper threads for large inputs, started on first use and kept (starting
   threads on every call cost more than the split saved at a few MB). One
   call at a time uses them (pool_lock, taken with trylock): a call that finds
   them busy runs its jobs on its own thread. A forked child starts new ones.
   XLA's runtime does not run two custom calls of one program at once (two
   calls on halves of the rows measured as slow as one), and its reductions
   use both cores, so below VALUES_PER_THREAD per thread one thread is used. */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static sem_t pool_go[MAX_THREADS];
static int pool_helpers = 0;
/* The jobs of the call that holds pool_lock, and its counts (atomic). */
static void (*pool_fn)(void*);
static char* pool_jobs;
static size_t pool_size;
static int pool_n;
static int pool_next;     /* the next job to claim */
static int pool_awake;    /* helpers that have woken for this call */
static int pool_finished; /* helpers done with this call */

/* Runs the call's jobs, one claim at a time, until none is left. */
static void pool_work(void) {
  int i;
  while ((i = __atomic_fetch_add(&pool_next, 1, __ATOMIC_ACQ_REL)) < pool_n) {
    pool_fn(pool_jobs + (size_t)i * pool_size);
  }
}

static void* helper_main(void* arg) {
  int h = (int)(intptr_t)arg;
  for (;;) {
    while (sem_wait(&pool_go[h]) != 0) {
    }
    __atomic_add_fetch(&pool_awake, 1, __ATOMIC_ACQ_REL);
    pool_work();
    __atomic_add_fetch(&pool_finished, 1, __ATOMIC_ACQ_REL);
    wake_all(&pool_finished);
  }
  return NULL;
}

static void pool_after_fork(void) {
  pool_helpers = 0;
  pthread_mutex_init(&pool_lock, NULL);
}

static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

/* Under pool_lock: up to `want` helpers, as many as could be started. */
static int pool_grow(int want) {
  while (pool_helpers < want) {
    int h = pool_helpers;
    pthread_t id;
    sem_init(&pool_go[h], 0, 0);
    if (pthread_create(&id, NULL, helper_main, (void*)(intptr_t)h) != 0) break;
    pthread_detach(id);
    pool_helpers++;
  }
  return pool_helpers < want ? pool_helpers : want;
}

/* Takes up to `want` helpers for one call: how many it got (0 when another
   call holds them; then pool_lock is not held). */
static int pool_take(int want) {
  if (want < 1) return 0;
  pthread_once(&pool_once, pool_init);
  if (pthread_mutex_trylock(&pool_lock) != 0) return 0;
  int helpers = pool_grow(want);
  if (helpers == 0) pthread_mutex_unlock(&pool_lock);
  return helpers;
}

/* Runs fn on the n jobs at `jobs` (each `size` bytes) with `helpers` taken
   helpers, waits for all of them and gives the helpers back. The calling
   thread runs job 0 (the merging job of a call whose jobs wait for each
   other, which then has as many jobs as threads), and every thread then
   claims the jobs left, so a job whose helper has not woken yet (its core
   busy with another thunk XLA runs at the same time) does not wait for it.

   The calling thread then waits for every helper to have woken and
   finished (the jobs' memory is its own): with wait_while (a short spin,
   then the futex) while all of them are running, which is when they are
   about to finish, and asleep at once otherwise, giving up the core to a
   helper that has still to wake. Not asleep at once always: a thread that
   sleeps leaves its core idle, which on a VM is slow to wake, for this call
   and for XLA's next thunk. Against Flax's time (benchmarks/run.py
   --sweep's cases, one build with switches, 300 rounds in random order),
   semaphore wait -> this: BN train fwd 32x16x16x128 0.90 -> 0.81, with a
   ReLU after it 0.97 -> 0.90, LN and RMS fwd 256x768 0.48 / 0.50 -> 0.40 /
   0.41; the spin makes the difference (taking the jobs left alone: 0.88,
   0.98, 0.46, 0.48). At 8192x1024, where XLA runs another thunk next to the
   call, every variant read the same (0.45-0.46 for LN fwd+bwd). */
static void pool_run(void (*fn)(void*), void* jobs, size_t size, int n, int helpers) {
  char* at = jobs;
  if (helpers == 0) {
    for (int t = 0; t < n; t++) fn(at + (size_t)t * size);
    return;
  }
  pool_fn = fn;
  pool_jobs = at;
  pool_size = size;
  pool_n = n;
  __atomic_store_n(&pool_next, 1, __ATOMIC_RELAXED);
  __atomic_store_n(&pool_awake, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&pool_finished, 0, __ATOMIC_RELAXED);
  for (int h = 0; h < helpers; h++) sem_post(&pool_go[h]);
  fn(at);
  pool_work();
  int done;
  while ((done = __atomic_load_n(&pool_finished, __ATOMIC_ACQUIRE)) < helpers) {
    if (__atomic_load_n(&pool_awake, __ATOMIC_ACQUIRE) == helpers) {
      wait_while(&pool_finished, done);
    } else {
      syscall(SYS_futex, &pool_finished, FUTEX_WAIT_PRIVATE, done, NULL, NULL, 0);
    }
  }
  pthread_mutex_unlock(&pool_lock);
}

/* Runs fn on the n jobs at `jobs`, on the helpers it can take. */
static void run_jobs(void (*fn)(void*), void* jobs, size_t size, int n) {
  pool_run(fn, jobs, size, n, pool_take(n - 1));
}

static int cpu_count(void) {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? (int)n : 1;
}

/* Threads for `total` values at `per_thread` values each and at most
   `pieces` (the independent parts of the work): 1 to MAX_THREADS. */
static int threads_for(int64_t total, int64_t per_thread, int64_t pieces) {
  int threads = cpu_count();
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (threads > total / per_thread) threads = (int)(total / per_thread);
  if (threads > pieces) threads = (int)pieces;
  return threads < 1 ? 1 : threads;
}

/* Reads up to n comma-separated integers of the opaque string into v. */
static void parse_opaque(const char* opaque, size_t opaque_len, int64_t* v, int n) {
  char buf[96];
  size_t len = opaque_len < sizeof buf - 1 ? opaque_len : sizeof buf - 1;
  memcpy(buf, opaque, len);
  buf[len] = '\0';
  char* at = buf;
  for (int i = 0; i < n; i++) {
    v[i] = strtoll(at, &at, 10);
    if (*at != ',') break;
    at++;
  }
}

/* The opaque string "A,B,F" of the fused calls: two sizes and the flags. */
static int parse_sizes_and_flags(const char* opaque, size_t opaque_len, int64_t* a,
                                 int64_t* b) {
  int64_t v[3] = {0, 0, 0};
  parse_opaque(opaque, opaque_len, v, 3);
  *a = v[0];
  *b = v[1];
  return (int)v[2];
}

/* XLA custom call, API_VERSION_STATUS_RETURNING_UNIFIED (the status is not
   used). opaque: "P,R,C,T": T is 0 for float32 x, 1 for bfloat16 x. */
void jaxnorm_framed_column_sums(void* out, const void** in, const char* opaque,
                                size_t opaque_len, void* status) {
  (void)status;
  const void* x = in[0];
  const float* f = in[1];
  float* s1 = ((void**)out)[0];
  float* s2 = ((void**)out)[1];
  int64_t v[4] = {0, 0, 0, 0};
  parse_opaque(opaque, opaque_len, v, 4);
  int64_t P = v[0], R = v[1], C = v[2];
  int bf16 = (int)v[3];
  if (wide_cols < 0) wide_cols = __builtin_cpu_supports("avx512f") ? 1 : 0;
  if (P <= 0 || C <= 0) return;

  /* One slab: threads take rows (whole BLOCKs); several: they take slabs. */
  int split_rows = P == 1;
  int threads = threads_for(P * R * C, VALUES_PER_THREAD, split_rows ? R / BLOCK : P);

  double small[2 * 256];
  size_t n_acc = (size_t)(2 * C * threads);
  double* acc = n_acc <= 2 * 256 ? small : malloc(n_acc * sizeof(double));
  if (acc == NULL) {
    for (int64_t i = 0; i < P * C; i++) s1[i] = s2[i] = __builtin_nanf("");
    return;
  }
  job jobs[MAX_THREADS];
  int64_t blocks = (R + BLOCK - 1) / BLOCK;
  for (int t = 0; t < threads; t++) {
    job j = {x, bf16, f, R, C, 0, P, 0, R, acc + 2 * C * t, s1, s2};
    if (split_rows) {
      j.r0 = blocks * t / threads * BLOCK;
      j.r1 = t + 1 == threads ? R : blocks * (t + 1) / threads * BLOCK;
      j.s1 = j.s2 = NULL;
    } else {
      j.p0 = P * t / threads;
      j.p1 = P * (t + 1) / threads;
    }
    jobs[t] = j;
  }
  run_jobs(run_job, jobs, sizeof(job), threads);
  if (split_rows) { /* P == 1: add the threads' accumulators */
    for (int64_t c = 0; c < C; c++) {
      double u = 0, v = 0;
      for (int t = 0; t < threads; t++) {
        u += acc[2 * C * t + c];
        v += acc[2 * C * t + C + c];
      }
      s1[c] = (float)u;
      s2[c] = (float)v;
    }
  }
  if (acc != small) free(acc);
}

/* Layer and RMS norm forward on rows, fused: each row's statistics and its
   output in one read of x and one write of y (the row is in cache for the
   second pass over it). XLA's program, and Flax's, read x twice.

   x: (P, R) float32; eps: one float32; scale, bias: R float32 each when
   present. Writes y (P, R), mean (P), var (P), all float32, with the
   statistics of moments.block_moments: the frame f is the median of the
   row's first, middle and last values (their mean for R == 2), s1 and s2 are
   row_sums_f32's framed sums, mean_off = s1 / R, var = s2 / R - mean_off^2
   (in float64, clamped at 0), mean = f + mean_off, and
       y = ((x - f) - mean_off) * (rsqrt(var + eps) * scale) + bias
   (exact at any offset: x - f is exact near f). RMS: f = 0, var is the mean
   square, mean 0, and y = x * (rsqrt(var + eps) * scale). */

/* A frame this far from the mean, mean_off^2 > REFRAME * var, has cost the
   float32 partial sums of squares digits (they carry n (var + mean_off^2)):
   the sums are taken again in a frame at the mean. The median of three
   values is that far only with outliers or heavy tails at the probed
   places (for Gaussian data about twice in 10^8); the loss below it is at
   most a factor 16, as in the plain sums' test of moments.py (factor 2). */
#define REFRAME 15.0

#define ROW_SCALE 1
#define ROW_BIAS 2
#define ROW_RMS 4
/* Rows need no merge across threads, so they are split from fewer values
   than the sums above: 256x768 (LN / RMS fwd against Flax) 0.90 / 0.80 with
   2^19 values per thread, 0.70 / 0.44 with 2^16; 2^14 made 64x768 slower
   (0.31 -> 0.46; interleaved, 31 rounds). */
#define ROW_VALUES_PER_THREAD (1 << 16)

typedef struct {
  const float* x;
  float* y;
  float* mean;
  float* var;
  const float* scale; /* NULL: no scale */
  const float* bias;  /* NULL: no bias */
  float eps;
  int rms;
  int64_t R;
  int64_t p0, p1; /* rows [p0, p1) */
} row_job;

static inline float median3(float a, float b, float c) {
  float lo = a < b ? a : b, hi = a < b ? b : a;
  return c < lo ? lo : (c > hi ? hi : c);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
static void row_output(const float* x, float* y, int64_t R, float f, float off, float rstd,
                       const float* s, const float* b, int rms) {
  vec16 fv, ov, rv, xv, sv, bv;
  for (int k = 0; k < 16; k++) {
    fv[k] = f;
    ov[k] = off;
    rv[k] = rstd;
  }
  int64_t r = 0;
  for (; r + 16 <= R; r += 16) {
    LOAD16(xv, x + r);
    vec16 mv = rv;
    if (s != NULL) {
      LOAD16(sv, s + r);
      mv = rv * sv;
    }
    vec16 t = rms ? xv * mv : ((xv - fv) - ov) * mv;
    if (b != NULL) {
      LOAD16(bv, b + r);
      t = t + bv;
    }
    memcpy(y + r, &t, sizeof t);
  }
  for (; r < R; r++) {
    float m = s != NULL ? rstd * s[r] : rstd;
    float t = rms ? x[r] * m : ((x[r] - f) - off) * m;
    y[r] = b != NULL ? t + b[r] : t;
  }
}

static void run_row_job(void* arg) {
  row_job* j = arg;
  int64_t R = j->R;
  for (int64_t p = j->p0; p < j->p1; p++) {
    const float* x = j->x + p * R;
    float f = 0.f;
    if (!j->rms) {
      f = R == 1 ? x[0] : (R == 2 ? (x[0] + x[1]) * 0.5f : median3(x[0], x[R / 2], x[R - 1]));
    }
    double s1 = 0, s2 = 0;
    row_sums_f32(x, f, R, &s1, &s2);
    double m = j->rms ? 0 : s1 / (double)R;
    double var = s2 / (double)R - m * m;
    if (!j->rms && m * m > REFRAME * var) { /* the row is in cache: sum it again */
      f = f + (float)m;
      s1 = s2 = 0;
      row_sums_f32(x, f, R, &s1, &s2);
      m = s1 / (double)R;
      var = s2 / (double)R - m * m;
    }
    if (var < 0) var = 0; /* keeps NaN */
    float off = (float)m;
    float rstd = (float)(1.0 / sqrt(var + (double)j->eps));
    j->mean[p] = j->rms ? 0.f : f + off;
    j->var[p] = (float)var;
    row_output(x, j->y + p * R, R, f, off, rstd, j->scale, j->bias, j->rms);
  }
}

/* XLA custom call (as jaxnorm_framed_column_sums). Operands x, eps, scale,
   bias (scale and bias one float each when absent); results y, mean, var.
   opaque: "P,R,F", F a sum of ROW_SCALE, ROW_BIAS, ROW_RMS. */
void jaxnorm_row_norm(void* out, const void** in, const char* opaque, size_t opaque_len,
                      void* status) {
  (void)status;
  int64_t P, R;
  int flags = parse_sizes_and_flags(opaque, opaque_len, &P, &R);
  if (P <= 0 || R <= 0) return;
  int threads = threads_for(P * R, ROW_VALUES_PER_THREAD, P);
  row_job jobs[MAX_THREADS];
  for (int t = 0; t < threads; t++) {
    row_job j = {in[0],
                 ((void**)out)[0],
                 ((void**)out)[1],
                 ((void**)out)[2],
                 flags & ROW_SCALE ? in[2] : NULL,
                 flags & ROW_BIAS ? in[3] : NULL,
                 *(const float*)in[1],
                 (flags & ROW_RMS) != 0,
                 R,
                 P * t / threads,
                 P * (t + 1) / threads};
    jobs[t] = j;
  }
  run_jobs(run_row_job, jobs, sizeof(row_job), threads);
}

/* Layer and RMS norm's backward pass on float32 rows (P rows of R values),
   fused: per row, the statistics' framed sums and the cotangent's two sums
   in one read of x and g, then dx from the same row while it is in cache,
   and the parameters' gradients added into per-thread accumulators. XLA's
   program (and Flax's) reads x and g at least twice per row from memory.

   With gs = g * scale, d = x - f (f the row's frame as in the forward pass;
   0 for RMS), m = <d>, r = rsqrt(var + eps), A = <gs> and
   B = <gs d> - m A = <gs (x - mean)> (float64 from float32 partials):
       dx = r gs + (d - m) (-r^3 B) - r A     (A = m = 0 for RMS)
            (+ gm / R + (d - m) 2 gv / R with ROW_STATS: the statistics'
            cotangents gm, gv of the row),
       dscale = sum over rows of g (d - m) r,  dbias = sum over rows of g.
   The frame is checked as in run_row_job (REFRAME). */
#define ROW_DSCALE 8
#define ROW_DBIAS 16
/* The cotangents of the statistics (mean, var) are operands 4 and 5: each
   adds gm / R + (x - mean) 2 gv / R to dx (gm unused for RMS). */
#define ROW_STATS 32
/* x, g and dx are bfloat16: each row is converted to float32 in a scratch
   buffer (in cache), and dx rounded to nearest even on the way out. */
#define ROW_BF16 64

typedef struct {
  const float* x;
  const float* g;
  float* dx;
  const float* scale; /* NULL: no scale */
  float eps;
  int rms;
  int64_t R;
  int64_t p0, p1;
  double* ds; /* R doubles each, NULL when not wanted */
  double* db;
  float* ps;  /* R floats each: partial sums over up to BLOCK rows */
  float* pb;
  const float* gm; /* P: the statistics' cotangents, NULL without */
  const float* gv;
  int bf16;        /* x, g, dx hold bfloat16 values (then as uint16_t) */
} row_grad_job;

__attribute__((target_clones("avx512f", "avx2", "default")))
static void bf16_row_to_float(const uint16_t* h, float* f, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    vec16 v;
    LOAD16_BF16(v, h + i);
    memcpy(f + i, &v, sizeof v);
  }
  for (; i < n; i++) f[i] = bf16_to_float(h[i]);
}

/* Rounds to nearest even; NaN stays a (quiet) NaN. */
__attribute__((target_clones("avx512f", "avx2", "default")))
static void float_row_to_bf16(const float* f, uint16_t* h, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    vecu32 w;
    memcpy(&w, f + i, sizeof w);
    vecu32 hi = w >> 16;
    vecu32 r = (w + 0x7FFFu + (hi & 1u)) >> 16;
    vecu32 nan = (vecu32)((w & 0x7FFFFFFFu) > 0x7F800000u);
    r = (r & ~nan) | ((hi | 0x40u) & nan);
    vecu16 out = __builtin_convertvector(r, vecu16);
    memcpy(h + i, &out, sizeof out);
  }
  for (; i < n; i++) {
    uint32_t w;
    memcpy(&w, f + i, sizeof w);
    h[i] = (w & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)((w >> 16) | 0x40u)
                                          : (uint16_t)((w + 0x7FFFu + ((w >> 16) & 1u)) >> 16);
  }
}

/* Adds sum(d), sum(d^2), sum(gs), sum(gs d) of one row (d = x - f). */
__attribute__((target_clones("avx512f", "avx2", "default")))
static void row_grad_sums(const float* x, const float* g, const float* s, float f, int64_t R,
                          double* out) {
  double u[4][16] = {{0}};
  vec16 fv, xv, gv, sv;
  for (int k = 0; k < 16; k++) fv[k] = f;
  int64_t r = 0;
  while (r + 16 <= R) {
    vec16 p1 = {0}, p2 = {0}, p3 = {0}, p4 = {0};
    int64_t end = r + 16 * BLOCK <= R ? r + 16 * BLOCK : R - (R - r) % 16;
    for (; r < end; r += 16) {
      LOAD16(xv, x + r);
      LOAD16(gv, g + r);
      if (s != NULL) {
        LOAD16(sv, s + r);
        gv = gv * sv;
      }
      vec16 d = xv - fv;
      p1 += d;
      p2 += d * d;
      p3 += gv;
      p4 += gv * d;
    }
    for (int k = 0; k < 16; k++) {
      u[0][k] += p1[k];
      u[1][k] += p2[k];
      u[2][k] += p3[k];
      u[3][k] += p4[k];
    }
  }
  double t[4] = {0, 0, 0, 0};
  for (int i = 0; i < 4; i++) {
    for (int k = 0; k < 16; k++) t[i] += u[i][k];
  }
  for (; r < R; r++) {
    double d = (double)(x[r] - f);
    double gs = s != NULL ? (double)(g[r] * s[r]) : (double)g[r];
    t[0] += d;
    t[1] += d * d;
    t[2] += gs;
    t[3] += gs * d;
  }
  for (int i = 0; i < 4; i++) out[i] = t[i];
}

__attribute__((target_clones("avx512f", "avx2", "default")))
static void row_grad_output(const float* x, const float* g, const float* s, float* dx,
                            int64_t R, float f, float m, float r, float c1, float c0,
                            float* ps, float* pb) {
  vec16 fv, mv, rv, c1v, c0v, xv, gv, sv;
  for (int k = 0; k < 16; k++) {
    fv[k] = f;
    mv[k] = m;
    rv[k] = r;
    c1v[k] = c1;
    c0v[k] = c0;
  }
  int64_t i = 0;
  for (; i + 16 <= R; i += 16) {
    LOAD16(xv, x + i);
    LOAD16(gv, g + i);
    vec16 gs = gv;
    if (s != NULL) {
      LOAD16(sv, s + i);
      gs = gv * sv;
    }
    vec16 c = (xv - fv) - mv;
    vec16 t = rv * gs + c * c1v + c0v;
    memcpy(dx + i, &t, sizeof t);
    if (ps != NULL) {
      vec16 a;
      LOAD16(a, ps + i);
      a += gv * (c * rv);
      memcpy(ps + i, &a, sizeof a);
    }
    if (pb != NULL) {
      vec16 a;
      LOAD16(a, pb + i);
      a += gv;
      memcpy(pb + i, &a, sizeof a);
    }
  }
  for (; i < R; i++) {
    float gs = s != NULL ? g[i] * s[i] : g[i];
    float c = (x[i] - f) - m;
    dx[i] = r * gs + c * c1 + c0;
    if (ps != NULL) ps[i] += g[i] * (c * r);
    if (pb != NULL) pb[i] += g[i];
  }
}

static void flush_partials(double* acc, float* part, int64_t R) {
  for (int64_t i = 0; i < R; i++) {
    acc[i] += part[i];
    part[i] = 0.f;
  }
}

static void run_row_grad_job(void* arg) {
  row_grad_job* j = arg;
  int64_t R = j->R;
  int in_block = 0;
  float* scratch = NULL; /* bfloat16: x, g and dx of one row in float32 */
  if (j->bf16) {
    scratch = malloc((size_t)(3 * R) * sizeof(float));
    if (scratch == NULL) {
      uint16_t* dx = (uint16_t*)(void*)j->dx;
      for (int64_t i = j->p0 * R; i < j->p1 * R; i++) dx[i] = 0x7FC0; /* NaN */
      return;
    }
  }
  for (int64_t p = j->p0; p < j->p1; p++) {
    const float* x = j->x + p * R;
    const float* g = j->g + p * R;
    float* dx_row = j->dx + p * R;
    if (j->bf16) {
      bf16_row_to_float((const uint16_t*)(const void*)j->x + p * R, scratch, R);
      bf16_row_to_float((const uint16_t*)(const void*)j->g + p * R, scratch + R, R);
      x = scratch;
      g = scratch + R;
      dx_row = scratch + 2 * R;
    }
    float f = 0.f;
    if (!j->rms) {
      f = R == 1 ? x[0] : (R == 2 ? (x[0] + x[1]) * 0.5f : median3(x[0], x[R / 2], x[R - 1]));
    }
    double t[4];
    row_grad_sums(x, g, j->scale, f, R, t);
    double m = j->rms ? 0 : t[0] / (double)R;
    double var = t[1] / (double)R - m * m;
    if (!j->rms && m * m > REFRAME * var) { /* as in run_row_job */
      f = f + (float)m;
      row_grad_sums(x, g, j->scale, f, R, t);
      m = t[0] / (double)R;
      var = t[1] / (double)R - m * m;
    }
    if (var < 0) var = 0; /* keeps NaN */
    double r = 1.0 / sqrt(var + (double)j->eps);
    double A = j->rms ? 0 : t[2] / (double)R;
    double B = t[3] / (double)R - m * A;
    double c1 = -r * r * r * B, c0 = -r * A;
    if (j->gv != NULL) {
      c1 += 2.0 * (double)j->gv[p] / (double)R;
      if (!j->rms) c0 += (double)j->gm[p] / (double)R;
    }
    row_grad_output(x, g, j->scale, dx_row, R, f, (float)m, (float)r, (float)c1, (float)c0,
                    j->ps, j->pb);
    if (j->bf16) float_row_to_bf16(dx_row, (uint16_t*)(void*)j->dx + p * R, R);
    if (++in_block == BLOCK) {
      if (j->ps != NULL) flush_partials(j->ds, j->ps, R);
      if (j->pb != NULL) flush_partials(j->db, j->pb, R);
      in_block = 0;
    }
  }
  if (j->ps != NULL) flush_partials(j->ds, j->ps, R);
  if (j->pb != NULL) flush_partials(j->db, j->pb, R);
  free(scratch);
}

/* The results of a backward call (dx, then dscale and dbias as `flags` say;
   one result, dx alone, is passed as the buffer itself, not a tuple). */
typedef struct {
  float* dx;
  float* dscale; /* NULL: not asked for */
  float* dbias;
} grad_results;

static grad_results grad_results_of(void* out, int flags) {
  void** outs = out;
  int tuple = (flags & (ROW_DSCALE | ROW_DBIAS)) != 0;
  grad_results g = {tuple ? outs[0] : out, flags & ROW_DSCALE ? outs[1] : NULL,
                    flags & ROW_DBIAS ? outs[flags & ROW_DSCALE ? 2 : 1] : NULL};
  return g;
}

/* NaN in every result (n values of dx, k of each parameter gradient): what
   a backward call returns when it cannot allocate its accumulators. */
static void grad_results_nan(grad_results g, int64_t n, int64_t k, int bf16) {
  for (int64_t i = 0; i < n; i++) {
    if (bf16) {
      ((uint16_t*)(void*)g.dx)[i] = 0x7FC0;
    } else {
      g.dx[i] = __builtin_nanf("");
    }
  }
  for (int64_t i = 0; i < k; i++) {
    if (g.dscale != NULL) g.dscale[i] = __builtin_nanf("");
    if (g.dbias != NULL) g.dbias[i] = __builtin_nanf("");
  }
}

/* XLA custom call. Operands x, g, eps, scale (one float when absent), and
   with ROW_STATS gm, gv (P each); results dx, then dscale if ROW_DSCALE,
   then dbias if ROW_DBIAS. opaque: "P,R,F", F a sum of ROW_SCALE, ROW_RMS,
   ROW_DSCALE, ROW_DBIAS, ROW_STATS. */
void jaxnorm_row_norm_grad(void* out, const void** in, const char* opaque, size_t opaque_len,
                           void* status) {
  (void)status;
  int64_t P, R;
  int flags = parse_sizes_and_flags(opaque, opaque_len, &P, &R);
  grad_results res = grad_results_of(out, flags);
  float *dscale = res.dscale, *dbias = res.dbias;
  if (R <= 0) return;
  if (P <= 0) {
    for (int64_t i = 0; i < R; i++) {
      if (dscale != NULL) dscale[i] = 0.f;
      if (dbias != NULL) dbias[i] = 0.f;
    }
    return;
  }
  int threads = threads_for(P * R, ROW_VALUES_PER_THREAD, P);
  int params = (dscale != NULL) + (dbias != NULL);
  /* Per thread: R doubles and R floats for each wanted parameter. */
  size_t per = (size_t)R * (sizeof(double) + sizeof(float));
  char* mem = params ? calloc((size_t)threads * (size_t)params, per) : NULL;
  if (params && mem == NULL) {
    grad_results_nan(res, P * R, R, (flags & ROW_BF16) != 0);
    return;
  }
  row_grad_job jobs[MAX_THREADS];
  for (int t = 0; t < threads; t++) {
    char* at = mem == NULL ? NULL : mem + (size_t)t * (size_t)params * per;
    double* ds = NULL;
    double* db = NULL;
    float* ps = NULL;
    float* pb = NULL;
    if (dscale != NULL) {
      ds = (double*)at;
      ps = (float*)(at + (size_t)R * sizeof(double));
      at += per;
    }
    if (dbias != NULL) {
      db = (double*)at;
      pb = (float*)(at + (size_t)R * sizeof(double));
    }
    row_grad_job j = {in[0], in[1], res.dx,
                      flags & ROW_SCALE ? in[3] : NULL,
                      *(const float*)in[2],
                      (flags & ROW_RMS) != 0,
                      R,
                      P * t / threads,
                      P * (t + 1) / threads,
                      ds, db, ps, pb,
                      flags & ROW_STATS ? in[4] : NULL,
                      flags & ROW_STATS ? in[5] : NULL,
                      (flags & ROW_BF16) != 0};
    jobs[t] = j;
  }
  run_jobs(run_row_grad_job, jobs, sizeof(row_grad_job), threads);
  for (int64_t i = 0; i < R; i++) {
    double s = 0, b = 0;
    for (int t = 0; t < threads; t++) {
      if (dscale != NULL) s += jobs[t].ds[i];
      if (dbias != NULL) b += jobs[t].db[i];
    }
    if (dscale != NULL) dscale[i] = (float)s;
    if (dbias != NULL) dbias[i] = (float)b;
  }
  free(mem);
}

/* Batch norm's training forward pass on channels-last data (one slab, x of
   shape (R, C), C >= 16), fused: the column sums of each thread's rows, one
   merge, then the output of the same rows by the same thread, so the second
   read of x comes from that core's cache where it fits there. XLA's program
   (and Flax's) runs the sums and the output as separate loops. Opt-in
   (cpu_sums.forward_enabled): XLA's output step fuses with a ReLU after it,
   and this call's output cannot.

   x: (R, C) float32; f: (C) the frame; eps: one float32; scale, bias: C
   float32 each when present. Writes y (R, C), mean (C) and var (C), all
   float32: mean_off = s1 / R, var = s2 / R - mean_off^2 (float64, clamped
   at 0), mean = f + mean_off and
       y = ((x - f) - mean_off) * (rsqrt(var + eps) * scale) + bias. */

/* Two threads pay off from fewer values here than for the sums alone: the
   second pass reads what the same core just summed. BN train fwd f32 against
   Flax with 2^19 / 2^16 values per thread (interleaved, 31 rounds):
   16x16x16x64 1.16 / 0.55, 16x16x16x128 1.44 / 0.78, 32x16x16x128 0.87 /
   0.83. */
#define COL_VALUES_PER_THREAD (1 << 16)

typedef struct {
  int threads;
  int arrived; /* threads done with their sums (atomic) */
  int go;      /* the merged statistics are ready (atomic) */
} col_barrier;

/* Thread t's sums are in. The calling thread (t == 0) then waits for every
   thread's (helpers are running by now, or this call runs all jobs itself in
   order) and returns 1: it merges them and calls barrier_release. A helper
   waits for that release and returns 0. */
static int barrier_arrive(col_barrier* bar, int t) {
  int now = __atomic_add_fetch(&bar->arrived, 1, __ATOMIC_ACQ_REL);
  if (t == 0) {
    while (now < bar->threads) {
      wait_while(&bar->arrived, now);
      now = __atomic_load_n(&bar->arrived, __ATOMIC_ACQUIRE);
    }
    return 1;
  }
  wake_all(&bar->arrived);
  wait_while(&bar->go, 0);
  return 0;
}

static void barrier_release(col_barrier* bar) {
  __atomic_store_n(&bar->go, 1, __ATOMIC_RELEASE);
  if (bar->threads > 1) wake_all(&bar->go);
}

typedef struct {
  const float* x;
  float* y;
  float* f; /* C: the frame (the input's, or one at the mean, see REFRAME) */
  float* mean;
  float* var;
  const float* scale; /* NULL: no scale */
  const float* bias;  /* NULL: no bias */
  float eps;
  int64_t R, C;
  int64_t r0, r1;   /* this thread's rows */
  double* acc;      /* 2 C doubles per thread, thread t's at acc + 2 C t */
  float* mul;       /* C: rsqrt(var + eps) * scale */
  float* off;       /* C: mean_off */
  int t;
  col_barrier* bar;
} col_job;

__attribute__((target_clones("avx512f", "avx2", "default")))
static void col_output(const float* x, float* y, int64_t C, int64_t r0, int64_t r1,
                       const float* f, const float* off, const float* mul, const float* b) {
  for (int64_t r = r0; r < r1; r++) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) {
      vec16 xv, fv, ov, mv, t;
      LOAD16(xv, xr + c);
      LOAD16(fv, f + c);
      LOAD16(ov, off + c);
      LOAD16(mv, mul + c);
      t = ((xv - fv) - ov) * mv;
      if (b != NULL) {
        vec16 bv;
        LOAD16(bv, b + c);
        t = t + bv;
      }
      memcpy(yr + c, &t, sizeof t);
    }
    for (; c < C; c++) {
      float t = ((xr[c] - f[c]) - off[c]) * mul[c];
      yr[c] = b != NULL ? t + b[c] : t;
    }
  }
}

/* The statistics of every column from the first `n` threads'
   accumulators, in the frame j->f: j->off, j->mul, j->mean, j->var. Whether
   some column's frame is far from its mean (REFRAME). */
static int col_merge(col_job* j, int n) {
  int64_t C = j->C;
  int far = 0;
  for (int64_t c = 0; c < C; c++) {
    double s1 = 0, s2 = 0;
    for (int t = 0; t < n; t++) {
      s1 += j->acc[2 * C * t + c];
      s2 += j->acc[2 * C * t + C + c];
    }
    double m = s1 / (double)j->R;
    double var = s2 / (double)j->R - m * m;
    if (m * m > REFRAME * var) far = 1;
    if (var < 0) var = 0; /* keeps NaN */
    float rstd = (float)(1.0 / sqrt(var + (double)j->eps));
    j->off[c] = (float)m;
    j->mul[c] = j->scale != NULL ? rstd * j->scale[c] : rstd;
    j->mean[c] = j->f[c] + (float)m;
    j->var[c] = (float)var;
  }
  return far;
}

static void run_col_job(void* arg) {
  col_job* j = arg;
  int64_t C = j->C;
  double* mine = j->acc + 2 * C * j->t;
  memset(mine, 0, (size_t)(2 * C) * sizeof(double));
  slab_sums_f32(j->x, j->f, C, j->r0, j->r1, mine, mine + C);
  if (barrier_arrive(j->bar, j->t)) {
    if (col_merge(j, j->bar->threads)) {
      /* A frame far from its column's mean: all columns again, in frames
         at their means, on this thread (rare: outliers at the probes). */
      for (int64_t c = 0; c < C; c++) {
        if (isfinite(j->off[c])) j->f[c] += j->off[c];
      }
      memset(j->acc, 0, (size_t)(2 * C) * sizeof(double));
      slab_sums_f32(j->x, j->f, C, 0, j->R, j->acc, j->acc + C);
      col_merge(j, 1);
    }
    barrier_release(j->bar);
  }
  col_output(j->x, j->y, C, j->r0, j->r1, j->f, j->off, j->mul, j->bias);
}

/* XLA custom call. Operands x, f, eps, scale, bias (scale and bias one float
   each when absent); results y, mean, var. opaque: "R,C,F", F a sum of
   ROW_SCALE and ROW_BIAS. */
void jaxnorm_column_norm(void* out, const void** in, const char* opaque, size_t opaque_len,
                         void* status) {
  (void)status;
  int64_t R, C;
  int flags = parse_sizes_and_flags(opaque, opaque_len, &R, &C);
  if (R <= 0 || C <= 0) return;
  if (wide_cols < 0) wide_cols = __builtin_cpu_supports("avx512f") ? 1 : 0;
  int64_t total = R * C;
  int threads = threads_for(total, COL_VALUES_PER_THREAD, R / BLOCK);
  /* Every job waits for the others' sums, so all of them must run at once:
     as many jobs as threads this call gets. */
  int helpers = pool_take(threads - 1);
  threads = helpers + 1;
  double* acc = malloc((size_t)(2 * C * threads) * sizeof(double));
  float* mul = malloc((size_t)(3 * C) * sizeof(float));
  float* y = ((void**)out)[0];
  float* mean = ((void**)out)[1];
  float* var = ((void**)out)[2];
  if (acc == NULL || mul == NULL) {
    if (helpers > 0) pthread_mutex_unlock(&pool_lock);
    free(acc);
    free(mul);
    for (int64_t i = 0; i < total; i++) y[i] = __builtin_nanf("");
    for (int64_t c = 0; c < C; c++) mean[c] = var[c] = __builtin_nanf("");
    return;
  }
  float* frame = mul + 2 * C;
  memcpy(frame, in[1], (size_t)C * sizeof(float));
  col_barrier bar = {threads, 0, 0};
  col_job jobs[MAX_THREADS];
  int64_t blocks = (R + BLOCK - 1) / BLOCK;
  for (int t = 0; t < threads; t++) {
    col_job j = {in[0], y, frame, mean, var,
                 flags & ROW_SCALE ? in[3] : NULL,
                 flags & ROW_BIAS ? in[4] : NULL,
                 *(const float*)in[2], R, C,
                 blocks * t / threads * BLOCK,
                 t + 1 == threads ? R : blocks * (t + 1) / threads * BLOCK,
                 acc, mul, mul + C, t, &bar};
    jobs[t] = j;
  }
  pool_run(run_col_job, jobs, sizeof(col_job), threads, helpers);
  free(acc);
  free(mul);
}

/* Batch norm's training backward pass on channels-last data (one slab, x of
   shape (R, C), C >= 16), fused as the forward pass is: each thread takes
   the four column sums of its rows, sum(d), sum(d^2), sum(g), sum(g d) with
   d = x - f (f: per column the median of rows 0, R/2 and R - 1), in one read
   of x and g; the calling thread merges them (float64); each thread then
   writes dx for its own rows, which its core has just read. With
   m = <d>, r = rsqrt(var + eps), k = r scale,
   B = <g d> - m <g> = <g (x - mean)>:
       dx = k g + (d - m) (-k r^2 B) - k <g>  (+ gm / R + (d - m) 2 gv / R,
            ROW_STATS),
       dscale = R r B,  dbias = R <g>. */
typedef struct {
  const float* x;
  const float* g;
  float* dx;
  float* f;           /* C: the frame */
  const float* scale; /* NULL: no scale */
  float* dscale;      /* NULL: not wanted */
  float* dbias;
  float eps;
  int64_t R, C;
  int64_t r0, r1;
  double* acc;  /* 4 C doubles per thread, thread t's at acc + 4 C t */
  float* coef;  /* 4 C floats: m, k, c1, c0 per column */
  const float* gm; /* C: the statistics' cotangents, NULL without */
  const float* gv;
  int t;
  col_barrier* bar;
} col_grad_job;

#define COL_GRAD_GROUP(K)                          \
  LOAD16(xv, xr + c + 16 * K);                     \
  LOAD16(gv, gr + c + 16 * K);                     \
  {                                                \
    vec16 d = xv - f##K;                           \
    p##K += d;                                     \
    q##K += d * d;                                 \
    s##K += gv;                                    \
    t##K += gv * d;                                \
  }

#define COL_GRAD_FLUSH(K)                          \
  for (int k = 0; k < 16; k++) {                   \
    a[c + 16 * K + k] += p##K[k];                  \
    a[C + c + 16 * K + k] += q##K[k];              \
    a[2 * C + c + 16 * K + k] += s##K[k];          \
    a[3 * C + c + 16 * K + k] += t##K[k];          \
  }

/* Adds the four sums of rows [r0, r1) into a (4 C doubles). */
__attribute__((target_clones("avx512f", "avx2", "default")))
static void col_grad_sums(const float* x, const float* g, const float* f, int64_t C,
                          int64_t r0, int64_t r1, double* a) {
  for (int64_t r = r0; r < r1; r += BLOCK) {
    int64_t re = r + BLOCK < r1 ? r + BLOCK : r1;
    int64_t c = 0;
    for (; c + 32 <= C; c += 32) {
      vec16 f0, f1, xv, gv;
      LOAD16(f0, f + c);
      LOAD16(f1, f + c + 16);
      vec16 p0 = {0}, q0 = {0}, s0 = {0}, t0 = {0}, p1 = {0}, q1 = {0}, s1 = {0}, t1 = {0};
      for (int64_t i = r; i < re; i++) {
        const float* xr = x + i * C;
        const float* gr = g + i * C;
        COL_GRAD_GROUP(0)
        COL_GRAD_GROUP(1)
      }
      COL_GRAD_FLUSH(0)
      COL_GRAD_FLUSH(1)
    }
    for (; c + 16 <= C; c += 16) {
      vec16 f0, xv, gv;
      LOAD16(f0, f + c);
      vec16 p0 = {0}, q0 = {0}, s0 = {0}, t0 = {0};
      for (int64_t i = r; i < re; i++) {
        const float* xr = x + i * C;
        const float* gr = g + i * C;
        COL_GRAD_GROUP(0)
      }
      COL_GRAD_FLUSH(0)
    }
    for (; c < C; c++) {
      float p = 0.f, q = 0.f, s = 0.f, t = 0.f;
      for (int64_t i = r; i < re; i++) {
        float d = x[i * C + c] - f[c], gi = g[i * C + c];
        p += d;
        q += d * d;
        s += gi;
        t += gi * d;
      }
      a[c] += p;
      a[C + c] += q;
      a[2 * C + c] += s;
      a[3 * C + c] += t;
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
static void col_grad_output(const float* x, const float* g, float* dx, int64_t C, int64_t r0,
                            int64_t r1, const float* f, const float* coef) {
  const float *m = coef, *k = coef + C, *c1 = coef + 2 * C, *c0 = coef + 3 * C;
  for (int64_t r = r0; r < r1; r++) {
    const float* xr = x + r * C;
    const float* gr = g + r * C;
    float* out = dx + r * C;
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) {
      vec16 xv, gv, fv, mv, kv, av, bv;
      LOAD16(xv, xr + c);
      LOAD16(gv, gr + c);
      LOAD16(fv, f + c);
      LOAD16(mv, m + c);
      LOAD16(kv, k + c);
      LOAD16(av, c1 + c);
      LOAD16(bv, c0 + c);
      vec16 t = kv * gv + ((xv - fv) - mv) * av + bv;
      memcpy(out + c, &t, sizeof t);
    }
    for (; c < C; c++) out[c] = k[c] * gr[c] + ((xr[c] - f[c]) - m[c]) * c1[c] + c0[c];
  }
}

/* The coefficients of every column from the first `n` threads' sums, in
   the frame j->f; whether some column's frame is far from its mean. */
static int col_grad_merge(col_grad_job* j, int n) {
  int64_t C = j->C;
  double R = (double)j->R;
  int far = 0;
  for (int64_t c = 0; c < C; c++) {
    double s[4] = {0, 0, 0, 0};
    for (int t = 0; t < n; t++) {
      for (int i = 0; i < 4; i++) s[i] += j->acc[4 * C * t + i * C + c];
    }
    double m = s[0] / R;
    double var = s[1] / R - m * m;
    if (m * m > REFRAME * var) far = 1;
    if (var < 0) var = 0; /* keeps NaN */
    double r = 1.0 / sqrt(var + (double)j->eps);
    double A = s[2] / R;
    double B = s[3] / R - m * A;
    double k = j->scale != NULL ? r * (double)j->scale[c] : r;
    double c1 = -k * r * r * B, c0 = -k * A;
    if (j->gv != NULL) {
      c1 += 2.0 * (double)j->gv[c] / R;
      c0 += (double)j->gm[c] / R;
    }
    j->coef[c] = (float)m;
    j->coef[C + c] = (float)k;
    j->coef[2 * C + c] = (float)c1;
    j->coef[3 * C + c] = (float)c0;
    if (j->dscale != NULL) j->dscale[c] = (float)(R * r * B);
    if (j->dbias != NULL) j->dbias[c] = (float)s[2];
  }
  return far;
}

static void run_col_grad_job(void* arg) {
  col_grad_job* j = arg;
  int64_t C = j->C;
  double* mine = j->acc + 4 * C * j->t;
  memset(mine, 0, (size_t)(4 * C) * sizeof(double));
  col_grad_sums(j->x, j->g, j->f, C, j->r0, j->r1, mine);
  if (barrier_arrive(j->bar, j->t)) { /* as in run_col_job */
    if (col_grad_merge(j, j->bar->threads)) {
      for (int64_t c = 0; c < C; c++) {
        if (isfinite(j->coef[c])) j->f[c] += j->coef[c];
      }
      memset(j->acc, 0, (size_t)(4 * C) * sizeof(double));
      col_grad_sums(j->x, j->g, j->f, C, 0, j->R, j->acc);
      col_grad_merge(j, 1);
    }
    barrier_release(j->bar);
  }
  col_grad_output(j->x, j->g, j->dx, C, j->r0, j->r1, j->f, j->coef);
}

/* XLA custom call. Operands x, g, eps, scale (one float when absent), and
   with ROW_STATS gm, gv (C each); results dx, then dscale if ROW_DSCALE,
   then dbias if ROW_DBIAS. opaque: "R,C,F", F a sum of ROW_SCALE,
   ROW_DSCALE, ROW_DBIAS, ROW_STATS. */
void jaxnorm_column_norm_grad(void* out, const void** in, const char* opaque,
                              size_t opaque_len, void* status) {
  (void)status;
  int64_t R, C;
  int flags = parse_sizes_and_flags(opaque, opaque_len, &R, &C);
  grad_results res = grad_results_of(out, flags);
  if (R <= 0 || C <= 0) return;
  int threads = threads_for(R * C, COL_VALUES_PER_THREAD, R / BLOCK);
  int helpers = pool_take(threads - 1);
  threads = helpers + 1;
  double* acc = malloc((size_t)(4 * C * threads) * sizeof(double));
  float* coef = malloc((size_t)(5 * C) * sizeof(float));
  if (acc == NULL || coef == NULL) {
    if (helpers > 0) pthread_mutex_unlock(&pool_lock);
    free(acc);
    free(coef);
    grad_results_nan(res, R * C, C, 0);
    return;
  }
  const float* x = in[0];
  float* frame = coef + 4 * C;
  for (int64_t c = 0; c < C; c++) {
    frame[c] = R == 1 ? x[c] : (R == 2 ? (x[c] + x[C + c]) * 0.5f
                                       : median3(x[c], x[(R / 2) * C + c], x[(R - 1) * C + c]));
  }
  col_barrier bar = {threads, 0, 0};
  col_grad_job jobs[MAX_THREADS];
  int64_t blocks = (R + BLOCK - 1) / BLOCK;
  for (int t = 0; t < threads; t++) {
    col_grad_job j = {x, in[1], res.dx, frame,
                      flags & ROW_SCALE ? in[3] : NULL,
                      res.dscale, res.dbias,
                      *(const float*)in[2], R, C,
                      blocks * t / threads * BLOCK,
                      t + 1 == threads ? R : blocks * (t + 1) / threads * BLOCK,
                      acc, coef,
                      flags & ROW_STATS ? in[4] : NULL,
                      flags & ROW_STATS ? in[5] : NULL,
                      t, &bar};
    jobs[t] = j;
  }
  pool_run(run_col_grad_job, jobs, sizeof(col_grad_job), threads, helpers);
  free(acc);
  free(coef);
}

/* The statistics of moments.block_moments from sums that ran in JAX's
   operations (derivative programs, where this file's sums made the ResNet-18
   step slower), with the second look the loops here take (REFRAME): x
   (P, R, C) float32 or bfloat16 as in jaxnorm_framed_column_sums, and per
   (P, C) the frame f and the framed sums s1, s2, float32. Writes a frame g,
   the mean offset m from it and the sum of squared deviations q: g = f,
   m = s1 / R and q = s2 - R m^2 (float64, clamped at 0, NaN kept); where some
   frame is far from its mean (m^2 > REFRAME q / R), every slab's sums are
   taken again in the frame g = f + m (float32), and m = s1' / R,
   q = s2' - R m^2 in it. Otherwise the call reads the 4 P C statistics
   only: the check costs a call, not a pass over x. NaN statistics never
   count as far. opaque: "P,R,C,T" (as jaxnorm_framed_column_sums). */
void jaxnorm_refine_moments(void* out, const void** in, const char* opaque,
                            size_t opaque_len, void* status) {
  const float* f = in[1];
  const float* s1 = in[2];
  const float* s2 = in[3];
  float* g = ((void**)out)[0];
  float* m = ((void**)out)[1];
  float* q = ((void**)out)[2];
  int64_t v[4] = {0, 0, 0, 0};
  parse_opaque(opaque, opaque_len, v, 4);
  int64_t n = v[0] * v[2];
  double R = (double)v[1];
  int far = 0;
  for (int64_t i = 0; i < n; i++) {
    double mi = (double)s1[i] / R;
    double qi = (double)s2[i] - R * mi * mi;
    if (qi < 0) qi = 0; /* keeps NaN */
    if (mi * mi > REFRAME * (qi / R)) far = 1;
    g[i] = f[i];
    m[i] = (float)mi;
    q[i] = (float)qi;
  }
  if (!far) return;
  float* sums = malloc((size_t)(2 * n) * sizeof(float));
  if (sums == NULL) return; /* keeps the first look */
  for (int64_t i = 0; i < n; i++) g[i] = f[i] + m[i];
  void* results[2] = {sums, sums + n};
  const void* operands[2] = {in[0], g};
  jaxnorm_framed_column_sums(results, operands, opaque, opaque_len, status);
  for (int64_t i = 0; i < n; i++) {
    double a = (double)sums[i] / R;
    double d = (double)sums[n + i] - R * a * a;
    m[i] = (float)a;
    q[i] = d < 0 ? 0.f : (float)d; /* keeps NaN */
  }
  free(sums);
}

/* A module only so that setuptools builds and installs the library; Python
   finds the function with ctypes (cpu_sums.py). */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_sums",
                                    "Framed sums for XLA's CPU backend.", -1, NULL,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cpu_sums(void) { return PyModule_Create(&module); }
