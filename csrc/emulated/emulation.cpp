// The scheduler behind emulation.h: each thread of a CUDA block is a fiber.
//
// A block runs in passes. In a pass every runnable fiber runs, in thread order,
// until it waits at a barrier (__syncthreads or a warp shuffle) or returns; a fiber
// that stops hands over directly to the next runnable one, the last back to the
// scheduler. Between passes the scheduler releases a barrier every participant has
// reached (one warp's rendezvous, else the block barrier: see release_barriers) and
// reports anything a GPU would not do (see emulation.h) as an error. The order is
// fixed, so emulated results are deterministic.
//
// Fibers are kept in a pool across blocks and launches (one stack each, mmap'd with
// a guard page) and each runs an endless loop: run the launch's body, mark itself
// done, switch out. On x86-64 a switch is a few instructions of assembly (callee-saved
// registers, MXCSR and the x87 control word); elsewhere ucontext.
//
// Sanitizers. AddressSanitizer is told about every stack switch. ThreadSanitizer gets
// one fiber per pool slot and switches with no implicit synchronisation, so the only
// happens-before edges between emulated threads are the ones CUDA guarantees: a
// barrier (every arrival releases, every departure acquires), the launch (the host's
// writes before it, the kernel's writes after it) and the start of a block (blocks run
// one after another here and share the `static` storage that stands in for
// __shared__: each starts after everything the earlier ones did). A missing
// __syncthreads is then a reported data race.
#define INFOMAX_CUDA_EMULATED 1
#include "emulation.h"

#include <c10/util/Exception.h>
#include <sys/mman.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#endif

#if defined(__SANITIZE_THREAD__)
// NB: the scheduler's own bookkeeping (fiber states, the shuffle slots) is ordered by
// the annotations above, not by what TSAN can see: do not instrument it.
#define INFOMAX_EMU_RUNTIME __attribute__((no_sanitize_thread, noinline))
#else
#define INFOMAX_EMU_RUNTIME __attribute__((noinline))
#endif

#if defined(__x86_64__)
// void infomax_emu_switch(void** save_sp, void* load_sp): saves the callee-saved state
// on the current stack, stores its stack pointer in *save_sp, and resumes the context
// whose stack pointer is load_sp.
extern "C" void infomax_emu_switch(void** save_sp, void* load_sp);
// First frame of a fiber: calls r13(r12) and never returns.
extern "C" void infomax_emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .hidden infomax_emu_switch
  .globl infomax_emu_switch
  .type infomax_emu_switch, @function
infomax_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size infomax_emu_switch, .-infomax_emu_switch

  .p2align 4
  .hidden infomax_emu_trampoline
  .globl infomax_emu_trampoline
  .type infomax_emu_trampoline, @function
infomax_emu_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size infomax_emu_trampoline, .-infomax_emu_trampoline
)");
#endif

namespace infomax_ext {
namespace emu {

const Coords* g_coords = nullptr;

namespace {

constexpr unsigned kMaxThreads = 1024;  // per block, as on every CUDA GPU since sm_20
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr size_t kStackBytes = size_t(512) << 10;  // sanitizers' frames are larger
#else
constexpr size_t kStackBytes = size_t(128) << 10;
#endif
constexpr size_t kGuardBytes = 4096;

enum class State { kRunnable, kAtSync, kAtShuffle, kDone, kFailed };

// A saved execution context: a fiber's, or the scheduler's (the launching OS thread's).
struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
#if defined(__SANITIZE_THREAD__)
  void* tsan = nullptr;
#endif
#if defined(__SANITIZE_ADDRESS__)
  void* asan_fake_stack = nullptr;
#endif
};

struct Fiber {
  Coords coords;
  unsigned index = 0;  // linear thread index in the block
  State state = State::kDone;
  unsigned shuffles = 0;  // shuffles done in this block (picks the exchange slot)
  void* mapping = nullptr;
  char* stack = nullptr;  // lowest usable address
  Context ctx;
};

struct Scheduler {
  std::vector<std::unique_ptr<Fiber>> pool;
  const std::function<void()>* body = nullptr;
  unsigned n = 0;  // threads of the current block
  // NB: the scheduler tests `failed` between passes, never `error`: std::string's code is
  // instrumented, and a fiber of a later pass may still write `error` (fail()). The host
  // reads `error` only after restart_pool has ordered it after every fiber.
  bool failed = false;
  std::string error;
  // Shuffle slots: [warp][shuffle parity][lane]. NB: two slots, so a lane may write
  // the next shuffle's value while slower lanes still read this one's.
  uint64_t exchange[kMaxThreads / kWarpSize][2][kWarpSize];
  // The launch's dynamic shared memory (128-byte aligned, exactly the launch's size, so
  // AddressSanitizer sees a read past its end), or nullptr.
  unsigned char* smem = nullptr;
  // Objects whose addresses carry TSAN's happens-before edges.
  char sync_barrier, sync_start;
  Context main;  // the scheduler's
#if defined(__SANITIZE_ADDRESS__)
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
#endif
  Fiber* running = nullptr;  // nullptr: the scheduler (the launching OS thread)
  bool from_scheduler = false;  // the last switch left the scheduler's stack
};

Scheduler& sched() {
  static Scheduler s;
  return s;
}

std::atomic<int64_t> g_launches{0};
std::atomic<int64_t> g_peak_smem{0};

std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline void tsan_release(void* addr) {
#if defined(__SANITIZE_THREAD__)
  __tsan_release(addr);
#else
  (void)addr;
#endif
}

inline void tsan_acquire(void* addr) {
#if defined(__SANITIZE_THREAD__)
  __tsan_acquire(addr);
#else
  (void)addr;
#endif
}

// Called on the new stack right after a switch lands there.
INFOMAX_EMU_RUNTIME void landed(Scheduler& s) {
#if defined(__SANITIZE_ADDRESS__)
  if (s.running) {
    const void* bottom = nullptr;
    size_t size = 0;
    __sanitizer_finish_switch_fiber(s.running->ctx.asan_fake_stack, &bottom, &size);
    if (s.from_scheduler) {  // the stack we came from is the launching thread's
      s.main_stack_bottom = bottom;
      s.main_stack_size = size;
    }
  } else {
    __sanitizer_finish_switch_fiber(s.main.asan_fake_stack, nullptr, nullptr);
  }
#else
  (void)s;
#endif
}

// Switches from the running context (a fiber, or the scheduler when from == nullptr)
// to `to` (a fiber, or the scheduler when nullptr).
INFOMAX_EMU_RUNTIME void switch_context(Scheduler& s, Fiber* from, Fiber* to) {
  // NB: released on the fiber's own object, which only restart_pool acquires: after a
  // failed launch the host code is ordered after everything the stopped fibers did,
  // while the fibers stay unordered among themselves.
  if (from) tsan_release(from);
  s.running = to;
  s.from_scheduler = from == nullptr;
  g_coords = to ? &to->coords : nullptr;
  Context& src = from ? from->ctx : s.main;
  Context& dst = to ? to->ctx : s.main;
#if defined(__SANITIZE_ADDRESS__)
  if (to) {
    __sanitizer_start_switch_fiber(&src.asan_fake_stack, to->stack, kStackBytes);
  } else {
    __sanitizer_start_switch_fiber(&src.asan_fake_stack, s.main_stack_bottom, s.main_stack_size);
  }
#endif
#if defined(__SANITIZE_THREAD__)
  __tsan_switch_to_fiber(dst.tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__x86_64__)
  infomax_emu_switch(&src.sp, dst.sp);
#else
  swapcontext(&src.uc, &dst.uc);
#endif
  landed(s);
}

// The running fiber stops (waits or is done): the next runnable fiber of the pass
// continues, or the scheduler when there is none.
INFOMAX_EMU_RUNTIME void switch_out(Scheduler& s, Fiber* self) {
  Fiber* next = nullptr;
  for (unsigned i = self->index + 1; i < s.n; ++i) {
    if (s.pool[i]->state == State::kRunnable) {
      next = s.pool[i].get();
      break;
    }
  }
  switch_context(s, self, next);
}

// The launch fails with this message (the first failure: the launch stops at it).
INFOMAX_EMU_RUNTIME void set_failed(Scheduler& s, std::string message) {
  s.error = std::move(message);
  s.failed = true;
}

INFOMAX_EMU_RUNTIME void fail(Scheduler& s, Fiber* self, std::string message) {
  set_failed(s, std::move(message));
  self->state = State::kFailed;
  switch_context(s, self, nullptr);
  __builtin_unreachable();  // NB: never resumed: launch() restarts the pool
}

[[noreturn]] INFOMAX_EMU_RUNTIME void fiber_main(Fiber* self) {
  Scheduler& s = sched();
  landed(s);
  for (;;) {
    // NB: the host's writes before the launch (its arguments) and the earlier blocks
    // (same `static` storage for __shared__); not the other threads of this block.
    tsan_acquire(&s.sync_start);
    try {
      (*s.body)();
    } catch (const std::exception& e) {
      fail(s, self, std::string("exception in an emulated CUDA thread: ") + e.what());
    }
    self->state = State::kDone;
    switch_out(s, self);
  }
}

#if !defined(__x86_64__)
void fiber_entry_ucontext(unsigned lo, unsigned hi) {
  fiber_main(reinterpret_cast<Fiber*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
}
#endif

// Points the fiber at a fresh start: its next switch-in enters fiber_main.
INFOMAX_EMU_RUNTIME void init_context(Fiber* f) {
#if defined(__x86_64__)
  // The first switch into the fiber pops 8 bytes of MXCSR/x87 control word, six
  // registers and a return address (the trampoline), which calls fiber_main(f) with
  // the 16-byte stack alignment of a call.
  uintptr_t top = (reinterpret_cast<uintptr_t>(f->stack) + kStackBytes) & ~uintptr_t(15);
  uint64_t* frame = reinterpret_cast<uint64_t*>(top - 24 - 8 * 7);
  uint32_t csr[2] = {0x1F80u, 0x037Fu};  // MXCSR and x87 control word: the ABI's defaults
  std::memcpy(&frame[0], csr, sizeof(csr));
  frame[1] = 0;                                                    // r15
  frame[2] = 0;                                                    // r14
  frame[3] = reinterpret_cast<uint64_t>(&fiber_main);              // r13: what the trampoline calls
  frame[4] = reinterpret_cast<uint64_t>(f);                        // r12: its argument
  frame[5] = 0;                                                    // rbx
  frame[6] = 0;                                                    // rbp
  frame[7] = reinterpret_cast<uint64_t>(&infomax_emu_trampoline);  // return address
  f->ctx.sp = frame;
#else
  ucontext_t& uc = f->ctx.uc;
  getcontext(&uc);
  uc.uc_stack.ss_sp = f->stack;
  uc.uc_stack.ss_size = kStackBytes;
  uc.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(f);
  makecontext(&uc, reinterpret_cast<void (*)()>(&fiber_entry_ucontext), 2, unsigned(p & 0xffffffffu),
              unsigned(p >> 32));
#endif
#if defined(__SANITIZE_THREAD__)
  f->ctx.tsan = __tsan_create_fiber(0);
#endif
}

std::unique_ptr<Fiber> make_fiber(unsigned index) {
  auto f = std::make_unique<Fiber>();
  f->index = index;
  f->mapping = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(f->mapping != MAP_FAILED, "emulated CUDA: cannot map a fiber stack");
  // NB: the lowest page is a guard: a fiber that overflows its stack faults instead of
  // writing over its neighbour's.
  mprotect(f->mapping, kGuardBytes, PROT_NONE);
  f->stack = static_cast<char*>(f->mapping) + kGuardBytes;
  init_context(f.get());
  return f;
}

// After a failed launch the fibers are stopped inside the kernel and can never be
// resumed: each starts afresh. NB: the Fiber objects are kept, not freed (TSAN would
// see their deletion race with the stopped fibers' reads), and their stacks are
// unpoisoned (ASAN would keep the dead frames' redzones).
INFOMAX_EMU_RUNTIME void restart_pool(Scheduler& s) {
  for (auto& f : s.pool) {
    tsan_acquire(f.get());
#if defined(__SANITIZE_THREAD__)
    __tsan_destroy_fiber(f->ctx.tsan);
#endif
#if defined(__SANITIZE_ADDRESS__)
    ASAN_UNPOISON_MEMORY_REGION(f->stack, kStackBytes);
    f->ctx.asan_fake_stack = nullptr;
#endif
    init_context(f.get());
  }
}

// Releases a barrier that every participant has reached; returns false, the launch
// failed (set_failed), when the waiting fibers can never all be released.
// NB: one warp's rendezvous at a time, so that warp runs on to its next wait while the
// others stand still: a missing __syncthreads between warps then reads stale shared
// memory. Releasing every warp at once would keep the warps in step, rendezvous by
// rendezvous, and hide it wherever each warp makes the same warp-level calls. Blocks of
// even linear index release the lowest waiting warp first, odd ones the highest, so both
// a reader ahead of its writer and a writer ahead of its reader are seen.
INFOMAX_EMU_RUNTIME bool release_barriers(Scheduler& s, bool lowest_first) {
  int release = -1;
  const unsigned n_warps = (s.n + kWarpSize - 1) / kWarpSize;
  for (unsigned w = 0; w < n_warps; ++w) {
    unsigned at_shuffle = 0;
    for (unsigned i = w * kWarpSize; i < std::min(s.n, (w + 1) * kWarpSize); ++i)
      at_shuffle += s.pool[i]->state == State::kAtShuffle;
    if (at_shuffle == 0) continue;
    if (at_shuffle < kWarpSize) {
      const unsigned lanes = std::min(s.n - w * kWarpSize, kWarpSize);
      set_failed(s, "__shfl_xor_sync with the full mask in warp " + std::to_string(w) + ": only " +
                        std::to_string(at_shuffle) + " of 32 lanes reached it (" +
                        (lanes < kWarpSize ? "a partial warp: the block has " + std::to_string(s.n) + " threads"
                                           : std::string("the others exited or wait at __syncthreads")) +
                        "); undefined on a GPU");
      return false;
    }
    if (release < 0 || !lowest_first) release = static_cast<int>(w);
  }
  if (release >= 0) {
    // NB: no happens-before edge here: like a GPU's shuffle, it orders no memory.
    for (unsigned i = release * kWarpSize; i < (release + 1) * kWarpSize; ++i) s.pool[i]->state = State::kRunnable;
    return true;
  }
  unsigned at_sync = 0, done = 0;
  for (unsigned i = 0; i < s.n; ++i) {
    at_sync += s.pool[i]->state == State::kAtSync;
    done += s.pool[i]->state == State::kDone;
  }
  if (at_sync == 0) return true;  // nothing waits (the block is done)
  if (done > 0) {
    set_failed(s, "__syncthreads() reached by " + std::to_string(at_sync) + " threads after " +
                      std::to_string(done) + " of the block's " + std::to_string(s.n) +
                      " threads returned; undefined on a GPU");
    return false;
  }
  for (unsigned i = 0; i < s.n; ++i) s.pool[i]->state = State::kRunnable;
  return true;
}

// Sets the coordinates of the block's threads and makes them runnable.
INFOMAX_EMU_RUNTIME void start_block(Scheduler& s, dim3 grid, dim3 block, dim3 block_idx) {
  for (unsigned i = 0; i < s.n; ++i) {
    Fiber& f = *s.pool[i];
    f.coords.thread_idx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    f.coords.block_idx = block_idx;
    f.coords.block_dim = block;
    f.coords.grid_dim = grid;
    f.state = State::kRunnable;
    f.shuffles = 0;
  }
}

INFOMAX_EMU_RUNTIME void run_block(Scheduler& s, bool lowest_first) {
  for (;;) {
    Fiber* first = nullptr;
    for (unsigned i = 0; i < s.n && !first; ++i)
      if (s.pool[i]->state == State::kRunnable) first = s.pool[i].get();
    if (first) switch_context(s, nullptr, first);  // runs one pass; back here at its end
    if (s.failed) return;
    bool all_done = true;
    for (unsigned i = 0; i < s.n; ++i) all_done &= s.pool[i]->state == State::kDone;
    if (all_done) return;
    if (!release_barriers(s, lowest_first)) return;
  }
}

std::string dims(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

}  // namespace

INFOMAX_EMU_RUNTIME void syncthreads() {
  Scheduler& s = sched();
  Fiber* self = s.running;
  TORCH_INTERNAL_ASSERT(self, "__syncthreads() outside an emulated kernel");
  tsan_release(&s.sync_barrier);
  self->state = State::kAtSync;
  switch_out(s, self);
  tsan_acquire(&s.sync_barrier);
}

INFOMAX_EMU_RUNTIME uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int lane_mask) {
  Scheduler& s = sched();
  Fiber* self = s.running;
  TORCH_INTERNAL_ASSERT(self, "__shfl_xor_sync outside an emulated kernel");
  if (mask != kFullMask) fail(s, self, "__shfl_xor_sync: only the full mask 0xffffffff is emulated");
  if (lane_mask < 0 || lane_mask >= int(kWarpSize)) fail(s, self, "__shfl_xor_sync: lane mask out of [0, 32)");
  const unsigned lane = self->index % kWarpSize, warp = self->index / kWarpSize;
  uint64_t* slot = s.exchange[warp][self->shuffles++ & 1];
  slot[lane] = bits;
  self->state = State::kAtShuffle;
  switch_out(s, self);
  return slot[lane ^ unsigned(lane_mask)];
}

INFOMAX_EMU_RUNTIME unsigned lane_id() {
  Fiber* self = sched().running;
  TORCH_INTERNAL_ASSERT(self, "a warp-level operation outside an emulated kernel");
  return self->index % kWarpSize;
}

INFOMAX_EMU_RUNTIME void fail_launch(const char* message) {
  Scheduler& s = sched();
  TORCH_INTERNAL_ASSERT(s.running, "fail_launch outside an emulated kernel");
  fail(s, s.running, message);
  __builtin_unreachable();
}

int64_t launch_count() { return g_launches.load(); }

int64_t take_peak_smem() { return g_peak_smem.exchange(0); }

INFOMAX_EMU_RUNTIME unsigned char* dynamic_smem() {
  Scheduler& s = sched();
  TORCH_INTERNAL_ASSERT(s.running, "dynamic shared memory outside an emulated kernel");
  return s.smem;
}

void launch(dim3 grid, dim3 block, const std::function<void()>& body, size_t smem_bytes) {
  const uint64_t n = uint64_t(block.x) * block.y * block.z;
  // NB: the limits of every CUDA GPU since sm_30: a launch past them fails on the device
  // ("invalid configuration argument"), so it fails here too.
  TORCH_CHECK(n >= 1 && n <= kMaxThreads && block.z <= 64,
              "emulated CUDA launch: invalid configuration argument: block ", dims(block), " (", n,
              " threads; at most 1024, z at most 64)");
  TORCH_CHECK(grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
                  grid.z <= 65535,
              "emulated CUDA launch: invalid configuration argument: grid ", dims(grid),
              " (x in [1, 2^31 - 1], y and z in [1, 65535])");
  TORCH_CHECK(smem_bytes <= kMaxDynamicSmem, "emulated CUDA launch: too many resources requested: ", smem_bytes,
              " bytes of dynamic shared memory (at most ", kMaxDynamicSmem, ")");
  std::lock_guard<std::mutex> lock(launch_mutex());
  ++g_launches;
  Scheduler& s = sched();
#if defined(__SANITIZE_THREAD__)
  s.main.tsan = __tsan_get_current_fiber();
#endif
  while (s.pool.size() < n) s.pool.push_back(make_fiber(static_cast<unsigned>(s.pool.size())));
  s.body = &body;
  s.n = static_cast<unsigned>(n);
  s.failed = false;
  s.error.clear();
  struct FreeSmem {
    void operator()(unsigned char* p) const { ::operator delete(p, std::align_val_t(128)); }
  };
  const std::unique_ptr<unsigned char, FreeSmem> smem(
      smem_bytes ? static_cast<unsigned char*>(::operator new(smem_bytes, std::align_val_t(128))) : nullptr);
  s.smem = smem.get();
  if (int64_t(smem_bytes) > g_peak_smem.load()) g_peak_smem.store(int64_t(smem_bytes));  // NB: under the launch lock
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        // Everything before this block (the host's code, the earlier blocks: each fiber
        // released its own object at its last switch) happens before it.
        for (unsigned i = 0; i < s.n; ++i) tsan_acquire(s.pool[i].get());
        // NB: a block finds its dynamic shared memory full of NaN bytes, not the previous
        // block's data: a kernel that reads what it did not write gets wrong numbers.
        if (smem_bytes) std::memset(s.smem, 0xff, smem_bytes);
        tsan_release(&s.sync_start);
        start_block(s, grid, block, dim3(bx, by, bz));
        run_block(s, (bx + uint64_t(grid.x) * (by + uint64_t(grid.y) * bz)) % 2 == 0);
        if (s.failed) {
          restart_pool(s);
          TORCH_CHECK(false, "emulated CUDA kernel, block ", dims(dim3(bx, by, bz)), " of grid ", dims(grid),
                      ", block size ", dims(block), ": ", s.error);
        }
      }
  // The kernel's writes (and the scheduler's reads), for the host code after the launch:
  // every fiber released its own object at its last switch.
  for (unsigned i = 0; i < s.n; ++i) tsan_acquire(s.pool[i].get());
  s.smem = nullptr;
}

}  // namespace emu
}  // namespace infomax_ext
