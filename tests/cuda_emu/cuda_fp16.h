// fp16 for the CPU emulation (emu.h): storage and round-to-nearest-even conversions, as the kernels use.
#pragma once
#include "emu.h"

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = (h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / NaN
  } else if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      uint32_t m = man;
      do {
        ++e;
        m <<= 1;
      } while ((m & 0x400u) == 0);
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (m & 0x3ffu) << 13;
    }
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  return emu::from_bits<float>(u);
}

inline __half __float2half_rn(float f) {
  const uint32_t u = emu::from_bits<uint32_t>(emu::bits(f));
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0))};
  if (abs >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (abs < 0x33000001u) return __half{static_cast<uint16_t>(sign)};  // below half the smallest subnormal
  const int exp = static_cast<int>(abs >> 23) - 127 + 15;
  uint32_t man = (abs & 0x7fffffu) | 0x800000u;
  int shift = exp <= 0 ? 14 - exp : 13;  // subnormals shift further
  uint32_t half_man = man >> shift;
  const uint32_t rem = man & ((1u << shift) - 1), halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (half_man & 1u))) ++half_man;  // round to nearest even
  const uint32_t out = exp <= 0 ? half_man : (static_cast<uint32_t>(exp) << 10) + (half_man - 0x400u);
  return __half{static_cast<uint16_t>(sign | out)};
}
