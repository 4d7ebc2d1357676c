// The launch side of the CPU emulator (gz-kernel-emu): runs a kernel over a grid the way the GPU
// would, one block after another, the threads of a block as cooperative fibers on the calling OS
// thread. Each fiber gets its stack once per launch (makecontext; entered once with setcontext)
// and then loops over the grid's blocks; every later switch is _setjmp/_longjmp, which unlike
// swapcontext makes no signal-mask system call (built with -U_FORTIFY_SOURCE: glibc's checked
// longjmp refuses a jump to another stack). A fiber runs until it finishes or waits at a barrier (__syncthreads, or the
// warp-wide exchange behind __shfl_down_sync); the scheduler then resumes the next one, so
// barriers and shuffles have their CUDA meaning, and a barrier some threads never reach is
// reported as a deadlock instead of hanging. The launch checks CUDA's limits on the grid and
// block (as cuLaunchKernel would refuse them).

#include <pthread.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
#include <ucontext.h>

#include "cuda_emu.h"

namespace gz_emu {
thread_local uint3 thread_idx;
thread_local uint3 block_idx;
thread_local dim3 block_dim;
thread_local dim3 grid_dim;

namespace {

// Each fiber's stack: STACK_BYTES usable above one inaccessible guard page, so an overflow is a
// SIGSEGV at once, never a silent write into the neighbouring fiber's stack.
constexpr size_t STACK_BYTES = 256 * 1024;

size_t page_bytes() {
    const long p = sysconf(_SC_PAGESIZE);
    return p > 0 ? (size_t)p : 4096;
}

// The usable part of a new guarded stack, or null.
char *stack_alloc() {
    const size_t page = page_bytes();
    void *m = mmap(nullptr, page + STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    if (mprotect(m, page, PROT_NONE) != 0) {
        munmap(m, page + STACK_BYTES);
        return nullptr;
    }
    return (char *)m + page;
}

void stack_free(char *usable) {
    if (usable == nullptr) return;
    const size_t page = page_bytes();
    munmap(usable - page, page + STACK_BYTES);
}

// Stacks are kept per OS thread from launch to launch (mapping and guarding 256 of them per
// launch costs more than many small kernels), and unmapped when the thread exits (a pthread key
// destructor: no C++ runtime needed).
struct StackPool {
    char **stacks;
    unsigned int count;
};

pthread_key_t pool_key;
pthread_once_t pool_once = PTHREAD_ONCE_INIT;

void pool_destroy(void *p) {
    StackPool *pool = (StackPool *)p;
    for (unsigned int i = 0; i < pool->count; ++i) stack_free(pool->stacks[i]);
    free(pool->stacks);
    free(pool);
}

void pool_key_create() { pthread_key_create(&pool_key, pool_destroy); }

// At least n guarded stacks for this thread, or null.
char **stacks_for(unsigned int n) {
    pthread_once(&pool_once, pool_key_create);
    StackPool *pool = (StackPool *)pthread_getspecific(pool_key);
    if (pool == nullptr) {
        pool = (StackPool *)calloc(1, sizeof(StackPool));
        if (pool == nullptr || pthread_setspecific(pool_key, pool) != 0) {
            free(pool);
            return nullptr;
        }
    }
    if (pool->count < n) {
        char **grown = (char **)realloc(pool->stacks, n * sizeof(char *));
        if (grown == nullptr) return nullptr;
        pool->stacks = grown;
        while (pool->count < n) {
            char *st = stack_alloc();
            if (st == nullptr) return nullptr;
            pool->stacks[pool->count++] = st;
        }
    }
    return pool->stacks;
}

struct Barrier {
    unsigned int expected = 0, arrived = 0;
    uint64_t generation = 0;
};

struct Fiber {
    ucontext_t start;
    jmp_buf env;
    char *stack = nullptr;
    uint3 tid;
    unsigned int linear = 0;
    bool started = false;
    bool done = false;
};

struct Launch {
    jmp_buf scheduler;
    // arrays of `threads` fibers, (threads + 31) / 32 warp barriers and `threads` exchange
    // slots (calloc: the runtime needs only the C library, no C++ one)
    Fiber *fibers = nullptr;
    Fiber *current = nullptr;
    Barrier block_barrier;
    Barrier *warp_barriers = nullptr;
    float *exchange = nullptr;
    unsigned int threads = 0;
    bool progressed = false;
    void (*body)(void *) = nullptr;
    void *data = nullptr;
};

thread_local Launch *active = nullptr;

void wait(Barrier &b) {
    Launch *l = active;
    const uint64_t g = b.generation;
    l->progressed = true;
    if (++b.arrived == b.expected) {
        b.arrived = 0;
        ++b.generation;
        return;
    }
    while (b.generation == g) {
        Fiber *f = l->current;
        if (_setjmp(f->env) == 0) _longjmp(l->scheduler, 1);
    }
}

// A fiber's whole life: one CUDA thread of every block the scheduler resumes it for. It never
// returns; after the last block it stays parked and its stack is freed.
void fiber_main() {
    for (;;) {
        Launch *l = active;
        l->body(l->data);
        Fiber *f = l->current;
        f->done = true;
        l->progressed = true;
        if (_setjmp(f->env) == 0) _longjmp(l->scheduler, 1);
    }
}

// Runs fiber f until it finishes its thread or waits at a barrier.
void resume(Launch &l, Fiber &f) {
    l.current = &f;
    thread_idx = f.tid;
    if (_setjmp(l.scheduler) != 0) return;
    if (!f.started) {
        f.started = true;
        setcontext(&f.start);
    }
    _longjmp(f.env, 1);
}

} // namespace

void sync_threads() { wait(active->block_barrier); }

float shfl_down(float v, unsigned int delta, int width) {
    Launch *l = active;
    const unsigned int lin = l->current->linear, warp = lin / 32, lane = lin % 32;
    l->exchange[lin] = v;
    wait(l->warp_barriers[warp]);
    const unsigned int w = width > 0 && width <= 32 ? (unsigned int)width : 32;
    const unsigned int src = lin + delta;
    // CUDA: a source lane outside the thread's width-segment leaves the value unchanged
    const float r = (lane % w) + delta < w && src < l->threads ? l->exchange[src] : v;
    wait(l->warp_barriers[warp]);
    return r;
}

} // namespace gz_emu

using namespace gz_emu;

static int fail(char *err, size_t len, const char *msg) {
    if (err != nullptr && len > 0) snprintf(err, len, "%s", msg);
    return 1;
}

// Runs body(data) once per CUDA thread of grid x block. Returns 0, or 1 with a message in err.
// reverse != 0 runs the blocks, and the threads within each block, in the opposite order: a
// kernel whose result depends on the order (two threads writing one element, a block reading
// what another writes) then gives a different result.
extern "C" int gz_emu_launch(const uint32_t grid[3], const uint32_t block[3], void (*body)(void *), void *data,
                             int reverse, char *err, size_t err_len) {
    char msg[256];
    if (active != nullptr) return fail(err, err_len, "nested launch on one thread");
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || block[0] == 0 || block[1] == 0 || block[2] == 0) {
        snprintf(msg, sizeof msg, "empty launch: grid (%u, %u, %u), block (%u, %u, %u)", grid[0], grid[1], grid[2],
                 block[0], block[1], block[2]);
        return fail(err, err_len, msg);
    }
    if (grid[0] > 0x7fffffffu || grid[1] > 65535 || grid[2] > 65535) {
        snprintf(msg, sizeof msg, "grid (%u, %u, %u) exceeds CUDA's limits (2^31-1, 65535, 65535)", grid[0], grid[1],
                 grid[2]);
        return fail(err, err_len, msg);
    }
    const uint64_t threads = (uint64_t)block[0] * block[1] * block[2];
    if (block[0] > 1024 || block[1] > 1024 || block[2] > 64 || threads > 1024) {
        snprintf(msg, sizeof msg, "block (%u, %u, %u) exceeds CUDA's limits (1024 threads, z <= 64)", block[0],
                 block[1], block[2]);
        return fail(err, err_len, msg);
    }
    Launch l;
    l.threads = (unsigned int)threads;
    l.body = body;
    l.data = data;
    const unsigned int warps = (l.threads + 31) / 32;
    l.fibers = (Fiber *)calloc(threads, sizeof(Fiber));
    l.warp_barriers = (Barrier *)calloc(warps, sizeof(Barrier));
    l.exchange = (float *)calloc(threads, sizeof(float));
    if (l.fibers == nullptr || l.warp_barriers == nullptr || l.exchange == nullptr) {
        free(l.fibers);
        free(l.warp_barriers);
        free(l.exchange);
        return fail(err, err_len, "out of memory for the launch");
    }
    l.block_barrier.expected = l.threads;
    for (unsigned int w = 0; w < warps; ++w) l.warp_barriers[w].expected = w + 1 < warps ? 32 : l.threads - 32 * w;
    char **stacks = stacks_for(l.threads);
    if (stacks == nullptr) {
        free(l.fibers);
        free(l.warp_barriers);
        free(l.exchange);
        return fail(err, err_len, "out of memory for fiber stacks");
    }
    for (unsigned int i = 0; i < l.threads; ++i) {
        Fiber &f = l.fibers[i];
        f.linear = i;
        f.tid = {i % block[0], (i / block[0]) % block[1], i / (block[0] * block[1])};
        f.stack = stacks[i];
        getcontext(&f.start);
        f.start.uc_stack.ss_sp = f.stack;
        f.start.uc_stack.ss_size = STACK_BYTES;
        f.start.uc_link = nullptr;
        makecontext(&f.start, fiber_main, 0);
    }
    active = &l;
    block_dim = {block[0], block[1], block[2]};
    grid_dim = {grid[0], grid[1], grid[2]};
    int rc = 0;
    const uint64_t blocks = (uint64_t)grid[0] * grid[1] * grid[2];
    for (uint64_t q = 0; q < blocks && rc == 0; ++q) {
        {
            {
                const uint64_t b = reverse ? blocks - 1 - q : q;
                const uint32_t bx = (uint32_t)(b % grid[0]), by = (uint32_t)((b / grid[0]) % grid[1]),
                               bz = (uint32_t)(b / ((uint64_t)grid[0] * grid[1]));
                block_idx = {bx, by, bz};
                l.block_barrier.arrived = 0;
                for (unsigned int w = 0; w < warps; ++w) l.warp_barriers[w].arrived = 0;
                for (unsigned int i = 0; i < l.threads; ++i) l.fibers[i].done = false;
                unsigned int live = l.threads;
                while (live > 0) {
                    l.progressed = false;
                    for (unsigned int i = 0; i < l.threads; ++i) {
                        Fiber &f = l.fibers[reverse ? l.threads - 1 - i : i];
                        if (f.done) continue;
                        resume(l, f);
                        if (f.done) --live;
                    }
                    if (!l.progressed && live > 0) {
                        snprintf(msg, sizeof msg,
                                 "deadlock in block (%u, %u, %u): %u of %u threads wait at a barrier that the "
                                 "others (finished or waiting elsewhere) never reach",
                                 bx, by, bz, live, l.threads);
                        rc = fail(err, err_len, msg);
                        break;
                    }
                }
            }
        }
    }
    active = nullptr;
    l.current = nullptr;
    free(l.fibers);
    free(l.warp_barriers);
    free(l.exchange);
    return rc;
}

// For the runtime's own tests (src/lib.rs), which run Rust closures as kernels.
extern "C" uint32_t gz_emu_thread_idx(void) { return thread_idx.x; }
extern "C" uint32_t gz_emu_block_idx(void) { return block_idx.x + grid_dim.x * (block_idx.y + grid_dim.y * block_idx.z); }
extern "C" void gz_emu_sync_threads(void) { sync_threads(); }
extern "C" float gz_emu_shfl_down(float v, uint32_t delta, int32_t width) { return shfl_down(v, delta, width); }
