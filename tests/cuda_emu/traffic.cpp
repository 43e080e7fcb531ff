// Counted global-memory traffic of the emulated CUDA kernels (bench/static_report.py).
//
// In the traffic build (tests/cuda_emulator.py, traffic=True) csrc/*.cu are compiled with
// -fsanitize=thread, which makes the compiler call __tsan_read<N> / __tsan_write<N> before every
// memory access of that code. Instead of the ThreadSanitizer runtime, the definitions below count
// the accesses: those to a fiber's stack, to shared memory (static __shared__ variables live in this
// library's writable segment, dynamic shared memory in the emulator's buffer) are left out, the rest
// are the kernel's global loads and stores. Per launch: bytes requested by reads and by writes, the
// distinct 32-byte sectors touched (the DRAM traffic when the L2 catches every re-read within the
// launch), and the most global loads one thread issues (an upper bound on its dependent round trips).
// The emulator calls swiftvlm_traffic_launch_begin / _end around every launch.
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <unordered_set>
#include <vector>

#include "emu.h"

namespace {

struct Launch {
  const void* kernel;
  unsigned grid, block;
  uint64_t read_bytes = 0, write_bytes = 0, loads_max = 0;
  std::unordered_set<uint64_t> sectors;
};

bool g_active = false;
bool g_in_launch = false;  // host code between launches (the bindings' checks) is not counted
std::vector<Launch> g_launches;
std::vector<uint64_t> g_thread_loads;  // global loads of each thread of the running block
unsigned g_block = ~0u;
uintptr_t g_lib_lo = 0, g_lib_hi = 0;  // this library's writable segment (static __shared__ data)
uintptr_t g_host_lo = 0, g_host_hi = 0;  // the host thread's stack (the launch's kernel arguments)
int g_marker;

int find_segment(dl_phdr_info* info, size_t, void*) {
  const auto marker = reinterpret_cast<uintptr_t>(&g_marker);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD || !(ph.p_flags & PF_W)) continue;
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    if (marker >= lo && marker < lo + ph.p_memsz) {
      g_lib_lo = lo;
      g_lib_hi = lo + ph.p_memsz;
      return 1;
    }
  }
  return 0;
}

void count(const void* p, uint64_t size, bool write) {
  if (!g_active || !g_in_launch || g_launches.empty()) return;
  const auto a = reinterpret_cast<uintptr_t>(p);
  if ((a >= g_lib_lo && a < g_lib_hi) || (a >= g_host_lo && a < g_host_hi) || emu::is_private(p)) return;
  Launch& l = g_launches.back();
  (write ? l.write_bytes : l.read_bytes) += size;
  for (uint64_t s = a / 32; s <= (a + size - 1) / 32; ++s) l.sectors.insert(s);
  if (!write) {
    const dim3 b = blockIdx, t = threadIdx, bd = blockDim;
    const unsigned block = b.x + gridDim.x * (b.y + gridDim.y * b.z);
    if (block != g_block) {
      g_block = block;
      std::fill(g_thread_loads.begin(), g_thread_loads.end(), 0);
    }
    const unsigned thread = t.x + bd.x * (t.y + bd.y * t.z);
    if (thread >= g_thread_loads.size()) g_thread_loads.resize(thread + 1, 0);
    l.loads_max = std::max(l.loads_max, ++g_thread_loads[thread]);
  }
}

}  // namespace

extern "C" {

void swiftvlm_traffic_launch_begin(const void* kernel, dim3 grid, dim3 block) {
  if (!g_active) return;
  Launch l;
  l.kernel = kernel;
  l.grid = grid.x * grid.y * grid.z;
  l.block = block.x * block.y * block.z;
  g_launches.push_back(std::move(l));
  g_block = ~0u;
  pthread_attr_t attr;
  if (pthread_getattr_np(pthread_self(), &attr) == 0) {
    void* lo = nullptr;
    size_t size = 0;
    pthread_attr_getstack(&attr, &lo, &size);
    g_host_lo = reinterpret_cast<uintptr_t>(lo);
    g_host_hi = g_host_lo + size;
    pthread_attr_destroy(&attr);
  }
  g_in_launch = true;
}

void swiftvlm_traffic_launch_end() { g_in_launch = false; }

// Start counting (clears what was counted).
void swiftvlm_traffic_start() {
  if (g_lib_hi == 0) dl_iterate_phdr(find_segment, nullptr);
  g_launches.clear();
  g_active = true;
}

// Stop counting; writes one line per launch into buf:
// "<kernel symbol> <blocks> <threads per block> <read bytes> <write bytes> <sector bytes> <loads max>"
size_t swiftvlm_traffic_stop(char* buf, size_t size) {
  g_active = false;
  std::string out;
  for (const Launch& l : g_launches) {
    Dl_info info{};
    std::string name = "?";
    if (dladdr(l.kernel, &info)) {  // a kernel without a dynamic symbol: its offset in the library
      name = info.dli_sname ? info.dli_sname
                            : "+" + std::to_string(reinterpret_cast<uintptr_t>(l.kernel) -
                                                   reinterpret_cast<uintptr_t>(info.dli_fbase));
    }
    out += name + " " + std::to_string(l.grid) + " " + std::to_string(l.block) + " " +
           std::to_string(l.read_bytes) + " " + std::to_string(l.write_bytes) + " " +
           std::to_string(l.sectors.size() * 32) + " " + std::to_string(l.loads_max) + "\n";
  }
  g_launches.clear();
  if (buf && size) {
    const size_t n = std::min(size - 1, out.size());
    out.copy(buf, n);
    buf[n] = '\0';
  }
  return out.size() + 1;
}

// The ThreadSanitizer entry points the instrumented code calls.
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
#define SWIFTVLM_TSAN_ACCESS(N)                                                                  \
  void __tsan_read##N(void* p) { count(p, N, false); }                                          \
  void __tsan_write##N(void* p) { count(p, N, true); }                                          \
  void __tsan_unaligned_read##N(void* p) { count(p, N, false); }                                \
  void __tsan_unaligned_write##N(void* p) { count(p, N, true); }                                \
  void __tsan_read##N##_pc(void* p, void*) { count(p, N, false); }                              \
  void __tsan_write##N##_pc(void* p, void*) { count(p, N, true); }
SWIFTVLM_TSAN_ACCESS(1)
SWIFTVLM_TSAN_ACCESS(2)
SWIFTVLM_TSAN_ACCESS(4)
SWIFTVLM_TSAN_ACCESS(8)
SWIFTVLM_TSAN_ACCESS(16)
#undef SWIFTVLM_TSAN_ACCESS
void __tsan_read_range(void* p, unsigned long size) { count(p, size, false); }
void __tsan_write_range(void* p, unsigned long size) { count(p, size, true); }
// Atomics of the instrumented host code (the launchers' tensor handles, between launches; the
// emulated kernels' atomics are plain accesses, emu.h): done as asked, with sequential consistency,
// and not counted.
#define SWIFTVLM_TSAN_ATOMIC_RMW(N, T, OP)                                                        \
  T __tsan_atomic##N##_##OP(volatile T* p, T v, int) { return __atomic_##OP(p, v, __ATOMIC_SEQ_CST); }
#define SWIFTVLM_TSAN_ATOMIC(N, T)                                                                \
  T __tsan_atomic##N##_load(const volatile T* p, int) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); } \
  void __tsan_atomic##N##_store(volatile T* p, T v, int) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##N##_exchange(volatile T* p, T v, int) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); } \
  SWIFTVLM_TSAN_ATOMIC_RMW(N, T, fetch_add)                                                       \
  SWIFTVLM_TSAN_ATOMIC_RMW(N, T, fetch_sub)                                                       \
  SWIFTVLM_TSAN_ATOMIC_RMW(N, T, fetch_and)                                                       \
  SWIFTVLM_TSAN_ATOMIC_RMW(N, T, fetch_or)                                                        \
  SWIFTVLM_TSAN_ATOMIC_RMW(N, T, fetch_xor)                                                       \
  int __tsan_atomic##N##_compare_exchange_strong(volatile T* p, T* expected, T v, int, int) {    \
    return __atomic_compare_exchange_n(p, expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
  }                                                                                               \
  int __tsan_atomic##N##_compare_exchange_weak(volatile T* p, T* expected, T v, int, int) {      \
    return __atomic_compare_exchange_n(p, expected, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
  }                                                                                               \
  T __tsan_atomic##N##_compare_exchange_val(volatile T* p, T expected, T v, int, int) {          \
    __atomic_compare_exchange_n(p, &expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);      \
    return expected;                                                                              \
  }
SWIFTVLM_TSAN_ATOMIC(8, uint8_t)
SWIFTVLM_TSAN_ATOMIC(16, uint16_t)
SWIFTVLM_TSAN_ATOMIC(32, uint32_t)
SWIFTVLM_TSAN_ATOMIC(64, uint64_t)
#undef SWIFTVLM_TSAN_ATOMIC
#undef SWIFTVLM_TSAN_ATOMIC_RMW
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

}  // extern "C"
