/* A stand-in for libcuda.so.1 with the CUDA checkpoint calls, for tests on machines
 * without a GPU (tests/test_cudackpt.py compiles it with cc). It checks what the real
 * driver checks of gpud's ctypes arguments: the structs' layout as NVIDIA's cuda.h declares
 * them, and reserved fields zero. Built with -DOLD_DRIVER it is a driver without the API.
 * Written for gpud from the documented declarations; no NVIDIA code. */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

#ifndef CUDA_VERSION_STUB
#define CUDA_VERSION_STUB 13000
#endif

int cuDriverGetVersion(int *v) { *v = CUDA_VERSION_STUB; return 0; }
static int inited;
int cuInit(unsigned int flags) { inited = 1; return flags ? 1 : 0; }
int cuGetErrorName(int rc, const char **s) { (void)rc; *s = "CUDA_ERROR_STUB_ODD"; return 0; }

#ifndef OLD_DRIVER
typedef struct { unsigned int timeoutMs; unsigned int reserved0; uint64_t reserved1[7]; } LockArgs;
typedef struct { uint64_t reserved[8]; } PlainArgs;
typedef struct { unsigned char oldUuid[16]; unsigned char newUuid[16]; } GpuPair;
typedef struct {
    GpuPair *gpuPairs;
    unsigned int gpuPairsCount;
    char reserved[52 - sizeof(GpuPair *)];
    uint64_t reserved1;
} RestoreArgs;
_Static_assert(sizeof(LockArgs) == 64, "lock"); _Static_assert(sizeof(RestoreArgs) == 64, "r");

enum { RUNNING, LOCKED, CHECKPOINTED, FAILED };
#define NPID 64
static int pids[NPID], states[NPID], npids;
static int fail_step = -1, fail_rc;  /* 0 lock 1 checkpoint 2 restore 3 unlock 4 state */
static unsigned int last_timeout;
static unsigned int last_pairs;
static GpuPair last_pair;

static int zero(const void *p, size_t n) {
    const unsigned char *c = p;
    for (size_t i = 0; i < n; i++) if (c[i]) return 0;
    return 1;
}
static int *slot(int pid) {
    for (int i = 0; i < npids; i++) if (pids[i] == pid) return &states[i];
    return NULL;
}
static int failing(int step) {
    if (fail_step == step) { fail_step = -1; return fail_rc; }
    return 0;
}

/* test controls */
void stub_add(int pid) { pids[npids] = pid; states[npids++] = RUNNING; }
void stub_fail(int step, int rc) { fail_step = step; fail_rc = rc; }
unsigned int stub_last_timeout(void) { return last_timeout; }
unsigned int stub_last_pairs(GpuPair *out) { *out = last_pair; return last_pairs; }
int stub_inited(void) { return inited; }

int cuCheckpointProcessGetState(int pid, int *state) {
    int rc = failing(4); if (rc) return rc;
    if (!inited) return 3;
    int *s = slot(pid); if (!s) return 1;
    *state = *s; return 0;
}
int cuCheckpointProcessLock(int pid, LockArgs *a) {
    int rc = failing(0); if (rc) return rc;
    int *s = slot(pid); if (!s) return 1;
    if (a && (a->reserved0 || !zero(a->reserved1, sizeof a->reserved1))) return 1;
    last_timeout = a ? a->timeoutMs : 0;
    if (*s != RUNNING) return 401;
    *s = LOCKED; return 0;
}
int cuCheckpointProcessCheckpoint(int pid, PlainArgs *a) {
    int rc = failing(1); if (rc) return rc;
    int *s = slot(pid); if (!s) return 1;
    if (a && !zero(a, sizeof *a)) return 1;
    if (*s != LOCKED) return 401;
    *s = CHECKPOINTED; return 0;
}
int cuCheckpointProcessRestore(int pid, RestoreArgs *a) {
    int rc = failing(2); if (rc) return rc;
    int *s = slot(pid); if (!s) return 1;
    if (a && (!zero(a->reserved, sizeof a->reserved) || a->reserved1)) return 1;
    if (a && (a->gpuPairsCount > 0) != (a->gpuPairs != NULL)) return 1;
    last_pairs = a ? a->gpuPairsCount : 0;
    if (last_pairs) last_pair = a->gpuPairs[0];
    if (*s != CHECKPOINTED) return 401;
    *s = LOCKED; return 0;
}
int cuCheckpointProcessUnlock(int pid, PlainArgs *a) {
    int rc = failing(3); if (rc) return rc;
    int *s = slot(pid); if (!s) return 1;
    if (a && !zero(a, sizeof *a)) return 1;
    if (*s != LOCKED) return 401;
    *s = RUNNING; return 0;
}
int cuCheckpointProcessGetRestoreThreadId(int pid, int *tid) {
    if (!slot(pid)) return 1;
    *tid = pid + 1; return 0;
}
#endif
