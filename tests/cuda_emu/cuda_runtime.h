// Stands in for the toolkit's cuda_runtime.h when csrc/ is compiled for the CPU emulation (emu.h).
#pragma once
#include "emu.h"
