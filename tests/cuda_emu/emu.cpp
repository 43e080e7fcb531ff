// The CUDA emulation's runtime (see emu.h): blocks of cooperative fibers, barriers and warp
// operations as checked rendezvous, launch limits, and the few runtime calls csrc/ makes.
//
// A fiber switch on x86-64 is six pushes, a stack swap and six pops (emu_switch below): ucontext's
// swapcontext makes two signal-mask system calls per switch, and under AddressSanitizer it also
// clears the stack's shadow, which made the sanitizer run 20x slower. Other CPUs use ucontext.
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "emu.h"

#if defined(__SANITIZE_ADDRESS__)
#define SWIFTVLM_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SWIFTVLM_EMU_ASAN 1
#endif
#endif
#ifdef SWIFTVLM_EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

// Defined only in the traffic build (traffic.cpp): counts each launch's global-memory accesses.
extern "C" void swiftvlm_traffic_launch_begin(const void* kernel, dim3 grid, dim3 block) __attribute__((weak));
extern "C" void swiftvlm_traffic_launch_end() __attribute__((weak));

namespace emu {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kOptinSmem = 227 * 1024;  // an H100's per-block opt-in limit
#ifdef SWIFTVLM_EMU_ASAN
constexpr size_t kStackBytes = 64 * 1024;  // small: ASan clears a stack's shadow at every switch
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

enum class State { kReady, kBarrier, kWarpOp, kDone };

#if defined(__x86_64__)
extern "C" void swiftvlm_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl swiftvlm_emu_switch
.type swiftvlm_emu_switch,@function
swiftvlm_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size swiftvlm_emu_switch, .-swiftvlm_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
struct Context {
  void* sp = nullptr;
};
#else
struct Context {
  ucontext_t uc;
};
#endif

struct Fiber {
  Context ctx;
  State state = State::kReady;
  long barriers = 0;  // __syncthreads passed: every waiting thread must be at the same count
  WarpOp op = kShflIdx;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int param = 0, width = kWarpSize;
};

std::mutex g_launch_mutex;  // one launch at a time
Context g_main;
std::vector<Fiber> g_fibers;
std::vector<char> g_stacks;
int g_current = -1;
int g_threads = 0;
dim3 g_block_idx, g_block_dim, g_grid_dim;
std::vector<unsigned char> g_dyn_smem;
const std::function<void()>* g_body = nullptr;
std::string g_error;           // why the running launch failed ("" while it runs fine)
std::string g_last_message;    // kept for cudaGetErrorString
cudaError_t g_last_error = cudaSuccess;
std::map<const void*, size_t> g_optin;  // kernel -> opted-in dynamic shared memory
int g_schedule = 0;  // 0 forward, 1 reverse, 2 random, 3 warps in reverse order, lanes forward
unsigned g_seed = 1;
int g_block_order = 0;  // 0 as the schedule (reverse for 1 and 3), 1 forward, 2 reverse, 3 random
unsigned g_block_seed = 1;
#ifdef SWIFTVLM_EMU_ASAN
void* g_fake_stack = nullptr;
#endif

void fail(const std::string& why) {
  if (g_error.empty()) g_error = why;
}

void raw_switch(Context* from, Context* to) {
#if defined(__x86_64__)
  swiftvlm_emu_switch(&from->sp, to->sp);
#else
  swapcontext(&from->uc, &to->uc);
#endif
}

// Stack bottom and size of the main context, for the sanitizer's bookkeeping.
const void* g_main_stack = nullptr;
size_t g_main_stack_size = 0;

void switch_to(Context* from, Context* to, const void* stack, size_t size) {
#ifdef SWIFTVLM_EMU_ASAN
  const void* old_bottom = nullptr;
  size_t old_size = 0;
  __sanitizer_start_switch_fiber(&g_fake_stack, stack, size);
  raw_switch(from, to);
  __sanitizer_finish_switch_fiber(g_fake_stack, &old_bottom, &old_size);
#else
  (void)stack;
  (void)size;
  raw_switch(from, to);
#endif
}

// Back to the scheduler from the running fiber.
void yield() {
  Fiber& f = g_fibers[g_current];
  switch_to(&f.ctx, &g_main, g_main_stack, g_main_stack_size);
}

void fiber_main() {
#ifdef SWIFTVLM_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_main_stack, &g_main_stack_size);
#endif
  (*g_body)();
  g_fibers[g_current].state = State::kDone;
  yield();
}

void run_fiber(int t) {
  g_current = t;
  switch_to(&g_main, &g_fibers[t].ctx, g_stacks.data() + static_cast<size_t>(t) * kStackBytes, kStackBytes);
  g_current = -1;
}

std::string where(int t) {
  return "thread " + std::to_string(t) + " (warp " + std::to_string(t / kWarpSize) + ", lane " +
         std::to_string(t % kWarpSize) + ") of block " + std::to_string(g_block_idx.x);
}

// Releases the lanes of warp operations whose mask is complete (in `warp`, or every warp when -1);
// false when none could go.
bool resolve_warp_ops(int only_warp = -1) {
  bool released = false;
  for (int t = 0; t < g_threads; ++t) {
    if (only_warp >= 0 && t / kWarpSize != only_warp) continue;
    Fiber& f = g_fibers[t];
    if (f.state != State::kWarpOp) continue;
    const int warp = t / kWarpSize;
    bool complete = true;
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if (!(f.mask >> lane & 1u)) continue;
      const int u = warp * kWarpSize + lane;
      if (u >= g_threads) {
        fail("warp operation by " + where(t) + ": its mask names lane " + std::to_string(lane) +
             ", which does not exist (the block has " + std::to_string(g_threads) + " threads)");
        return false;
      }
      const Fiber& g = g_fibers[u];
      if (g.state == State::kDone) {
        fail("warp operation by " + where(t) + ": its mask names " + where(u) + ", which has exited");
        return false;
      }
      if (g.state != State::kWarpOp) {
        complete = false;
        continue;
      }
      if (g.op != f.op || g.mask != f.mask || g.width != f.width) {
        fail("warp operation by " + where(t) + " meets a different operation or mask at " + where(u));
        return false;
      }
    }
    if (!complete) continue;
    // every lane of the mask waits at this operation: compute each lane's result
    unsigned ballot = 0, matches_all = 1;
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if (!(f.mask >> lane & 1u)) continue;
      const Fiber& g = g_fibers[warp * kWarpSize + lane];
      if (g.value) ballot |= 1u << lane;
      if (!g.value) matches_all = 0;
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if (!(f.mask >> lane & 1u)) continue;
      Fiber& g = g_fibers[warp * kWarpSize + lane];
      const int seg = lane / g.width * g.width;
      int src = lane;
      switch (g.op) {
        case kShflIdx: src = seg + (g.param % g.width); break;
        case kShflXor: src = lane ^ g.param; break;
        case kShflUp: src = lane - g.param >= seg ? lane - g.param : lane; break;
        case kShflDown: src = lane + g.param < seg + g.width ? lane + g.param : lane; break;
        default: break;
      }
      if (g.op <= kShflDown) {
        if (src < 0 || src >= kWarpSize || !(f.mask >> src & 1u)) {
          fail("shuffle by " + where(warp * kWarpSize + lane) + " reads lane " + std::to_string(src) +
               ", which is not in its mask");
          return false;
        }
        g.result = g_fibers[warp * kWarpSize + src].value;
      } else if (g.op == kBallot) {
        g.result = ballot;
      } else if (g.op == kAny) {
        g.result = ballot != 0;
      } else if (g.op == kAll) {
        g.result = matches_all;
      } else {  // kMatchAny
        unsigned same = 0;
        for (int other = 0; other < kWarpSize; ++other) {
          if ((f.mask >> other & 1u) && g_fibers[warp * kWarpSize + other].value == g.value) same |= 1u << other;
        }
        g.result = same;
      }
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if (f.mask >> lane & 1u) g_fibers[warp * kWarpSize + lane].state = State::kReady;
    }
    released = true;
  }
  return released;
}

// Releases a barrier that every thread of the block reached; false otherwise.
bool resolve_barrier() {
  int waiting = -1;
  for (int t = 0; t < g_threads; ++t) {
    const Fiber& f = g_fibers[t];
    if (f.state == State::kBarrier) waiting = t;
  }
  if (waiting < 0) return false;
  for (int t = 0; t < g_threads; ++t) {
    const Fiber& f = g_fibers[t];
    if (f.state == State::kDone) {
      fail("__syncthreads() not reached by every thread: " + where(waiting) + " waits at a barrier while " +
           where(t) + " has exited");
      return false;
    }
    if (f.state != State::kBarrier) return false;  // (a warp operation: reported as a deadlock)
    if (f.barriers != g_fibers[waiting].barriers) {
      fail("__syncthreads() not reached by every thread: " + where(t) + " and " + where(waiting) +
           " wait at different barriers");
      return false;
    }
  }
  for (int t = 0; t < g_threads; ++t) g_fibers[t].state = State::kReady;
  return true;
}

// The order in which warps, and the lanes of a warp, take their turns.
std::vector<int> order(int count, bool lanes) {
  std::vector<int> ids(count);
  for (int i = 0; i < count; ++i) ids[i] = i;
  if (g_schedule == 1 || (g_schedule == 3 && !lanes)) {
    std::reverse(ids.begin(), ids.end());
  } else if (g_schedule == 2) {
    std::mt19937 rng(g_seed++);
    std::shuffle(ids.begin(), ids.end(), rng);
  }
  return ids;
}

// Runs one warp's ready lanes, and its warp operations as soon as they complete, until the warp
// waits at a barrier, finishes or waits for lanes that cannot go; true if anything ran.
bool run_warp(int warp) {
  bool ran = false;
  const int lanes = std::min(kWarpSize, g_threads - warp * kWarpSize);
  for (;;) {
    bool step = false;
    for (int lane : order(lanes, true)) {
      const int t = warp * kWarpSize + lane;
      if (g_fibers[t].state != State::kReady) continue;
      run_fiber(t);
      step = ran = true;
      if (!g_error.empty()) return ran;
    }
    if (!resolve_warp_ops(warp) && !step) return ran;
    if (!g_error.empty()) return ran;
  }
}

void run_block() {
  for (int t = 0; t < g_threads; ++t) {
    Fiber& f = g_fibers[t];
    f = Fiber{};
    char* stack = g_stacks.data() + static_cast<size_t>(t) * kStackBytes;
#if defined(__x86_64__)
    // The first switch pops six zeroed registers and returns into fiber_main, with the stack
    // aligned as right after a call.
    auto top = reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~static_cast<uintptr_t>(15);
    auto* slots = reinterpret_cast<void**>(top);
    slots[-1] = nullptr;  // fiber_main's own return address: it never returns
    slots[-2] = reinterpret_cast<void*>(&fiber_main);
    for (int r = 3; r <= 8; ++r) slots[-r] = nullptr;
    f.ctx.sp = &slots[-8];
#else
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = stack;
    f.ctx.uc.uc_stack.ss_size = kStackBytes;
    f.ctx.uc.uc_link = nullptr;
    makecontext(&f.ctx.uc, fiber_main, 0);
#endif
  }
  const int warps = (g_threads + kWarpSize - 1) / kWarpSize;
  while (g_error.empty()) {
    bool ran = false;
    for (int w : order(warps, false)) {  // each warp runs ahead as far as it can
      ran = run_warp(w) || ran;
      if (!g_error.empty()) return;
    }
    if (ran) continue;
    if (std::all_of(g_fibers.begin(), g_fibers.begin() + g_threads, [](const Fiber& f) { return f.state == State::kDone; })) {
      return;
    }
    if (resolve_warp_ops() || resolve_barrier()) continue;
    if (g_error.empty()) {
      std::string states;
      for (int t = 0; t < g_threads && states.size() < 300; ++t) {
        const State s = g_fibers[t].state;
        states += std::to_string(t) + (s == State::kBarrier ? ":barrier " : s == State::kWarpOp ? ":warp-op " : ":done ");
      }
      fail("deadlock in block " + std::to_string(g_block_idx.x) + ": no thread can go on (" + states + "...)");
    }
  }
}

}  // namespace

dim3 thread_idx() { return dim3(static_cast<unsigned>(g_current)); }
dim3 block_idx() { return g_block_idx; }
dim3 block_dim() { return g_block_dim; }
dim3 grid_dim() { return g_grid_dim; }
unsigned char* dynamic_smem() { return g_dyn_smem.empty() ? nullptr : g_dyn_smem.data(); }

void syncthreads() {
  Fiber& f = g_fibers[g_current];
  ++f.barriers;
  f.state = State::kBarrier;
  yield();
}

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int param, int width) {
  Fiber& f = g_fibers[g_current];
  const int lane = g_current % kWarpSize;
  if (!(mask >> lane & 1u)) fail("warp operation by " + where(g_current) + ": its own lane is not in its mask");
  if (width <= 0 || width > kWarpSize || (width & (width - 1))) fail("warp operation: width must be a power of two <= 32");
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.param = param;
  f.width = width;
  f.state = State::kWarpOp;
  yield();
  return f.result;
}

bool is_private(const void* p) {
  // a fiber's stack (a thread's locals) or the dynamic shared memory: not global memory
  const auto* c = static_cast<const char*>(p);
  const auto* stacks = g_stacks.data();
  const auto* smem = reinterpret_cast<const char*>(g_dyn_smem.data());
  return (c >= stacks && c < stacks + g_stacks.size()) || (c >= smem && c < smem + g_dyn_smem.size());
}

cudaError_t launch_impl(const void* kernel, dim3 grid, dim3 block, size_t smem, std::function<void()> body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_last_message.clear();
  const long threads = static_cast<long>(block.x) * block.y * block.z;
  if (threads < 1 || threads > kMaxThreads || block.y != 1 || block.z != 1) {
    g_last_message = "invalid launch: " + std::to_string(threads) + " threads per block (1-D blocks of 1 to 1024)";
    return g_last_error = cudaErrorInvalidConfiguration;
  }
  if (grid.x < 1 || grid.x > 2147483647u || grid.y < 1 || grid.y > 65535u || grid.z < 1 || grid.z > 65535u) {
    g_last_message = "invalid launch: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                     std::to_string(grid.z) + ") beyond the limits (2^31 - 1, 65535, 65535)";
    return g_last_error = cudaErrorInvalidConfiguration;
  }
  const auto opted = g_optin.find(kernel);
  const size_t limit = opted == g_optin.end() ? kDefaultSmem : opted->second;
  if (smem > limit) {
    g_last_message = "invalid launch: " + std::to_string(smem) + " bytes of dynamic shared memory, the kernel may use " +
                     std::to_string(limit) + (opted == g_optin.end() ? " (48 KB without cudaFuncSetAttribute)" : "");
    return g_last_error = cudaErrorInvalidValue;
  }
  g_threads = static_cast<int>(threads);
  g_fibers.assign(g_threads, Fiber{});
  if (g_stacks.size() < static_cast<size_t>(g_threads) * kStackBytes) g_stacks.assign(static_cast<size_t>(g_threads) * kStackBytes, 0);
  g_block_dim = block;
  g_grid_dim = grid;
  g_body = &body;
  g_error.clear();
  // The blocks in launch order (x fastest), then in the order they run.
  std::vector<dim3> blocks;
  blocks.reserve(static_cast<size_t>(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(dim3(x, y, z));
    }
  }
  const int block_order = g_block_order != 0 ? g_block_order : (g_schedule == 1 || g_schedule == 3 ? 2 : 1);
  if (block_order == 2) {
    std::reverse(blocks.begin(), blocks.end());
  } else if (block_order == 3) {
    std::mt19937 rng(g_block_seed++);
    std::shuffle(blocks.begin(), blocks.end(), rng);
  }
  if (swiftvlm_traffic_launch_begin) swiftvlm_traffic_launch_begin(kernel, grid, block);  // the traffic build
  for (size_t n = 0; n < blocks.size() && g_error.empty(); ++n) {
    g_block_idx = blocks[n];
    g_dyn_smem.assign(smem, 0xcd);  // fresh and poisoned for every block
    run_block();
  }
  if (swiftvlm_traffic_launch_end) swiftvlm_traffic_launch_end();
  g_body = nullptr;
  if (!g_error.empty()) {
    g_last_message = g_error;
    return g_last_error = cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

}  // namespace emu

cudaError_t cudaGetLastError() {
  const cudaError_t err = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return err;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorLaunchFailure: return emu::g_last_message.c_str();
    case cudaErrorInvalidValue: return emu::g_last_message.empty() ? "invalid argument" : emu::g_last_message.c_str();
    default: return emu::g_last_message.empty() ? "invalid configuration argument" : emu::g_last_message.c_str();
  }
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = static_cast<int>(emu::kOptinSmem);
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void*) {
  attr->sharedSizeBytes = 4096;  // static shared memory is not measured here: a safe allowance
  attr->maxThreadsPerBlock = emu::kMaxThreads;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > emu::kOptinSmem - 4096) {
    emu::g_last_message = "cudaFuncSetAttribute: " + std::to_string(value) + " bytes exceed the opt-in limit";
    return emu::g_last_error = cudaErrorInvalidValue;
  }
  emu::g_optin[kernel] = static_cast<size_t>(value);
  return cudaSuccess;
}

extern "C" {
// Chooses the thread schedule of later launches: 0 forward, 1 reverse, 2 random (seeded), 3 warps
// in reverse order.
void swiftvlm_emu_set_schedule(int schedule, unsigned seed) {
  emu::g_schedule = schedule;
  emu::g_seed = seed;
}
// Chooses the block order of later launches: 0 as the thread schedule, 1 forward, 2 reverse, 3 a
// random permutation (seeded; every launch draws a new one).
void swiftvlm_emu_set_block_order(int order, unsigned seed) {
  emu::g_block_order = order;
  emu::g_block_seed = seed;
}
}
