// The NF4 format shared by the CPU (csrc/quant_cpu.cpp) and CUDA (csrc/cuda/nf4_cuda.cu) ops;
// the definition is DESIGN.md section 5 and fastlora/quant/nf4.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

// The 16 NF4 codes, index = nibble (bitsandbytes get_4bit_type("nf4")). Written as the same
// decimal doubles as fastlora/quant/nf4.py and rounded to fp32 the same way (nearest even), so
// `float x[16] = {FASTLORA_NF4_CODE};` holds bitsandbytes' fp32 table.
#define FASTLORA_NF4_CODE                                                                           \
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,       \
      -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, \
      0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,            \
      0.7229568362236023, 1.0

namespace fastlora {

// What quantize_4bit accepts (fastlora.quant.SUPPORTED_BLOCKSIZES): a power of two in [32, 4096].
// Every block is then a whole number of 16-byte groups of packed codes.
inline bool nf4_blocksize_ok(int64_t blocksize) {
  return blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0;
}

// The arguments every NF4 dequantize takes: n codes (ceil(n / 2) bytes), one fp32 absmax per block.
inline void check_nf4_args(const at::Tensor& packed, const at::Tensor& absmax, int64_t n, int64_t blocksize,
                           const char* op) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32 (de-nested), got ",
              absmax.scalar_type());
  TORCH_CHECK(packed.device() == absmax.device(), op, ": packed and absmax are on different devices (",
              packed.device(), " and ", absmax.device(), ")");
  TORCH_CHECK(nf4_blocksize_ok(blocksize), op, ": blocksize must be a power of two in [32, 4096], got ", blocksize);
  TORCH_CHECK(packed.numel() == (n + 1) / 2, op, ": packed has ", packed.numel(), " bytes, ", n,
              " elements need ", (n + 1) / 2);
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.numel() == nblocks, op, ": absmax has ", absmax.numel(), " entries, ", n,
              " elements in blocks of ", blocksize, " need ", nblocks);
}

// nf4_linear(x, packed, absmax, N, blocksize, bias): x (..., K) float32/float16/bfloat16, W (N, K).
inline void check_nf4_linear_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t N,
                                  int64_t blocksize, const std::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a last dimension K");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(N >= 0, op, ": N must be >= 0, got ", N);
  TORCH_CHECK(x.device() == packed.device(), op, ": x is on ", x.device(), ", packed on ", packed.device());
  check_nf4_args(packed, absmax, N * x.size(-1), blocksize, op);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == dt && bias->device() == x.device(),
                op, ": bias must be a (", N, ",) ", dt, " tensor on ", x.device(), ", got ", bias->scalar_type(),
                " of shape ", bias->sizes(), " on ", bias->device());
  }
}

inline void check_float_dtype(at::ScalarType t, const char* what, const char* op) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op, ": ", what,
              " must be float32, float64, float16 or bfloat16, got ", t);
}

}  // namespace fastlora
