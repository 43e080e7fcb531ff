// bf16 for the CPU emulation (emu.h): storage and round-to-nearest-even conversions.
#pragma once
#include "emu.h"

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) { return emu::from_bits<float>(static_cast<uint32_t>(h.bits) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = emu::from_bits<uint32_t>(emu::bits(f));
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
