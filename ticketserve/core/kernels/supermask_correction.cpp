// Supermask correction: y[e] -= x[e] · C_eᵀ for every example e of a mixed batch, where
// C_e = W ⊙ (1 − M_e) holds only the weights e's task switched off. The shared dense GEMM
// x·Wᵀ ran once for the whole batch; this subtracts each example's masked-out weights.
//
// C_e is a CSR over output rows of the masked positions: row pointers (int32) and column
// indices (uint8 / int16 / int32, the narrowest that fits the input width); its values are
// read from the shared weight W itself, never copied. A work item — (example, 32 tokens),
// spread over torch's threads — first lays its tokens out column-major, (in, 32) float32, in a
// per-thread buffer that stays in L2 (in huge pages), so one masked weight is one
// broadcast-FMA per 16 tokens held in a register (AVX-512, an 8-token tail in a ymm; AVX2: two
// ymm). Its sums, row-major, go back into the token-major y as 16 × 16 tiles transposed in
// registers (AVX-512, float32). Tokens past an example's length (its padding) are skipped:
// nothing reads a padding position's output (attention masks it, pooling ignores it).
//
// Dispatch at run time: level 2 = AVX-512F+FMA, 1 = AVX2+FMA, 0 = portable C++; -1 = the best
// this CPU runs.

#include "levels.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kRowsPerItem = 32;  // output rows accumulated before they are written to y

// An item's tokens are laid out column-major, (in, 32) float32: feature c's 32 tokens are one
// 128-byte pair of lines at block + c * 32, so one masked weight of a row costs one broadcast
// and one FMA per 16 tokens held in a register: acc[0:16] = Σ_j W[o, c_j] · block[c_j, 0:16].
// The row routines run a chunk of rows (acc: 32 floats per row) and are compiled per level,
// so the per-row step inlines into the loop. `halves` (portable, AVX2): 16-token halves in use.
constexpr int64_t kStride = 32;

template <typename index_t, typename scalar_t>
void rows_scalar(const scalar_t* w, int64_t in, const int32_t* rp, int64_t rows, const index_t* cols,
                 const float* block, int halves, float* acc) {
  for (int64_t r = 0; r < rows; ++r, w += in) {
    float sum[kStride] = {};
    for (int32_t j = rp[r]; j < rp[r + 1]; ++j) {
      const int64_t c = static_cast<int64_t>(cols[j]);
      const float v = static_cast<float>(w[c]);
      const float* x = block + c * kStride;
      for (int t = 0; t < 16 * halves; ++t) sum[t] += v * x[t];
    }
    std::copy(sum, sum + kStride, acc + r * kStride);
  }
}

template <typename index_t, typename scalar_t>
__attribute__((target("avx2,fma"))) void rows_avx2(const scalar_t* w, int64_t in, const int32_t* rp, int64_t rows,
                                                   const index_t* cols, const float* block, int halves, float* acc) {
  for (int64_t r = 0; r < rows; ++r, w += in) {
    for (int h = 0; h < halves; ++h) {  // two weights per step, two 8-token quarters each
      const float* x = block + h * 16;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
      int32_t j = rp[r];
      for (; j + 1 < rp[r + 1]; j += 2) {
        const int64_t c0 = cols[j] * kStride, c1 = cols[j + 1] * kStride;
        const __m256 w0 = _mm256_set1_ps(static_cast<float>(w[cols[j]])), w1 = _mm256_set1_ps(static_cast<float>(w[cols[j + 1]]));
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + c0), a0);
        a1 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + c0 + 8), a1);
        b0 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + c1), b0);
        b1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + c1 + 8), b1);
      }
      if (j < rp[r + 1]) {
        const int64_t c = cols[j] * kStride;
        const __m256 v = _mm256_set1_ps(static_cast<float>(w[cols[j]]));
        a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + c), a0);
        a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + c + 8), a1);
      }
      _mm256_storeu_ps(acc + r * kStride + h * 16, _mm256_add_ps(a0, b0));
      _mm256_storeu_ps(acc + r * kStride + h * 16 + 8, _mm256_add_ps(a1, b1));
    }
  }
}

// acc += v · x over `Lanes` tokens (8, 16, 24 or 32): a 16-token half is a zmm, an 8-token
// tail a ymm — half the work where the register is split in two anyway (AMD's Zen 4 runs a
// zmm as two 256-bit halves), so an item pays for its tokens rounded up to 8, not to 16.
template <int Lanes>
__attribute__((target("avx512f,fma"), always_inline)) inline void fma_lanes(float v, const float* x, __m512& lo,
                                                                            __m512& hi, __m256& lo8, __m256& hi8) {
  if constexpr (Lanes == 8) lo8 = _mm256_fmadd_ps(_mm256_set1_ps(v), _mm256_loadu_ps(x), lo8);
  else lo = _mm512_fmadd_ps(_mm512_set1_ps(v), _mm512_loadu_ps(x), lo);
  if constexpr (Lanes == 24) hi8 = _mm256_fmadd_ps(_mm256_set1_ps(v), _mm256_loadu_ps(x + 16), hi8);
  if constexpr (Lanes == 32) hi = _mm512_fmadd_ps(_mm512_set1_ps(v), _mm512_loadu_ps(x + 16), hi);
}

template <int Lanes, typename index_t, typename scalar_t>
__attribute__((target("avx512f,fma"))) void rows_avx512(const scalar_t* w, int64_t in, const int32_t* rp,
                                                        int64_t rows, const index_t* cols, const float* block,
                                                        float* acc) {
  for (int64_t r = 0; r < rows; ++r, w += in) {
    __m512 lo0 = _mm512_setzero_ps(), lo1 = lo0, hi0 = lo0, hi1 = lo0;  // two weights per step: two chains
    __m256 lo8_0 = _mm256_setzero_ps(), lo8_1 = lo8_0, hi8_0 = lo8_0, hi8_1 = lo8_0;
    int32_t j = rp[r];
    const int32_t end = rp[r + 1];
    for (; j + 1 < end; j += 2) {
      fma_lanes<Lanes>(static_cast<float>(w[cols[j]]), block + cols[j] * kStride, lo0, hi0, lo8_0, hi8_0);
      fma_lanes<Lanes>(static_cast<float>(w[cols[j + 1]]), block + cols[j + 1] * kStride, lo1, hi1, lo8_1, hi8_1);
    }
    if (j < end) fma_lanes<Lanes>(static_cast<float>(w[cols[j]]), block + cols[j] * kStride, lo0, hi0, lo8_0, hi8_0);
    float* row = acc + r * kStride;
    if constexpr (Lanes == 8) _mm256_storeu_ps(row, _mm256_add_ps(lo8_0, lo8_1));
    else _mm512_storeu_ps(row, _mm512_add_ps(lo0, lo1));
    if constexpr (Lanes == 24) _mm256_storeu_ps(row + 16, _mm256_add_ps(hi8_0, hi8_1));
    if constexpr (Lanes == 32) _mm512_storeu_ps(row + 16, _mm512_add_ps(hi0, hi1));
  }
}

// 16 vectors of 16 floats transposed in registers: m[i][j] ↔ m[j][i].
__attribute__((target("avx512f"))) inline void transpose16(__m512 m[16]) {
  __m512 r[16], s[16];
  for (int i = 0; i < 16; i += 2) {
    r[i] = _mm512_unpacklo_ps(m[i], m[i + 1]);
    r[i + 1] = _mm512_unpackhi_ps(m[i], m[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    s[i] = _mm512_shuffle_ps(r[i], r[i + 2], 0x44);
    s[i + 1] = _mm512_shuffle_ps(r[i], r[i + 2], 0xee);
    s[i + 2] = _mm512_shuffle_ps(r[i + 1], r[i + 3], 0x44);
    s[i + 3] = _mm512_shuffle_ps(r[i + 1], r[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(s[i], s[4 + i], 0x88);
    r[4 + i] = _mm512_shuffle_f32x4(s[i], s[4 + i], 0xdd);
    r[8 + i] = _mm512_shuffle_f32x4(s[8 + i], s[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_f32x4(s[8 + i], s[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    m[i] = _mm512_shuffle_f32x4(r[i], r[8 + i], 0x88);
    m[4 + i] = _mm512_shuffle_f32x4(r[4 + i], r[12 + i], 0x88);
    m[8 + i] = _mm512_shuffle_f32x4(r[i], r[8 + i], 0xdd);
    m[12 + i] = _mm512_shuffle_f32x4(r[4 + i], r[12 + i], 0xdd);
  }
}

// y[t, r] -= acc[r, t] for kRowsPerItem rows × `tokens` tokens (y's tokens `stride` apart): the
// accumulators are row-major, y is token-major, so 16 × 16 tiles are transposed in registers
// and each token's 16 rows are one vector read-modify-write.
__attribute__((target("avx512f"))) void subtract_tiles_avx512(float* y, int64_t stride, const float* acc,
                                                               int64_t tokens) {
  static_assert(kRowsPerItem % 16 == 0, "whole tiles");
  __m512 m[16];
  for (int64_t h = 0; h < kRowsPerItem; h += 16) {
    for (int64_t b = 0; b * 16 < tokens; ++b) {
      for (int i = 0; i < 16; ++i) m[i] = _mm512_loadu_ps(acc + (h + i) * kStride + b * 16);
      transpose16(m);
      const int64_t n = std::min<int64_t>(16, tokens - b * 16);
      for (int64_t t = 0; t < n; ++t) {
        float* row = y + (b * 16 + t) * stride + h;
        _mm512_storeu_ps(row, _mm512_sub_ps(_mm512_loadu_ps(row), m[t]));
      }
    }
  }
}

// 16 tokens (`n` real, rows `in` apart) into one half of the (in, 32) layout: 16 × 16 tiles
// transposed in registers, zeros for the tokens past n.
__attribute__((target("avx512f"))) void transpose_block_avx512(const float* src, int64_t in, int64_t n, float* dst) {
  __m512 m[16];
  for (int64_t c = 0; c < in; c += 16) {
    for (int64_t t = 0; t < 16; ++t) m[t] = t < n ? _mm512_loadu_ps(src + t * in + c) : _mm512_setzero_ps();
    transpose16(m);
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + (c + i) * kStride, m[i]);
  }
}

// Each thread's token layout, kept across calls, in 2 MB transparent huge pages where the
// kernel grants them: an item's loads land anywhere in up to 393 KB, ~100 small pages, more
// than the first-level TLB holds (measured: 15–20 % of the kernel's time on MiniLM's shapes).
// Costs 2 MB per thread that ran the kernel, for the thread's life.
float* thread_block(int64_t floats) {
  struct Buffer {
    float* data = nullptr;
    size_t bytes = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffer;
  const size_t bytes = static_cast<size_t>(floats) * sizeof(float);
  if (buffer.bytes < bytes) {
    constexpr size_t kHuge = size_t{2} << 20;
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* data = nullptr;
    TORCH_CHECK(posix_memalign(&data, kHuge, rounded) == 0, "no memory for the token layout");
    madvise(data, rounded, MADV_HUGEPAGE);
    std::free(buffer.data);
    buffer.data = static_cast<float*>(data);
    buffer.bytes = rounded;
  }
  return buffer.data;
}

// 16 tokens (`n` real, rows `in` apart) into one half of the (in, 32) layout, zero past n.
template <typename scalar_t>
void to_block(const scalar_t* src, int64_t in, int64_t n, float* dst, int level) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (level == 2 && in % 16 == 0) return transpose_block_avx512(src, in, n, dst);
  }
  for (int64_t c0 = 0; c0 < in; c0 += 16) {  // 16 features at a time: 16 lines written in turn
    const int64_t c1 = std::min(in, c0 + 16);
    for (int64_t t = 0; t < 16; ++t)
      for (int64_t c = c0; c < c1; ++c) dst[c * kStride + t] = t < n ? static_cast<float>(src[t * in + c]) : 0.f;
  }
}

template <typename index_t, typename scalar_t>
void correct_typed(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight, const std::vector<at::Tensor>& row_ptrs,
                   const std::vector<at::Tensor>& cols, const at::Tensor& example_csr, const at::Tensor& lengths,
                   int level) {
  const int64_t batch = y.size(0), seq = y.size(1), out = y.size(2), in = weight.size(1);
  const int64_t* which = example_csr.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  scalar_t* y_data = y.data_ptr<scalar_t>();
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  const scalar_t* w_data = weight.data_ptr<scalar_t>();
  std::vector<const int32_t*> rp_data;
  std::vector<const index_t*> col_data;
  for (size_t i = 0; i < row_ptrs.size(); ++i) {
    rp_data.push_back(row_ptrs[i].data_ptr<int32_t>());
    col_data.push_back(reinterpret_cast<const index_t*>(cols[i].data_ptr()));
  }
  // work items are (example, 32 tokens) that hold real tokens of a corrected example, longest
  // first, taken one at a time by torch's threads (their costs differ with the lengths, so
  // fixed shares would leave a thread idle). Each item first lays its tokens out as (in, 32)
  // float32 in a per-thread buffer (zero past the example's length; at most 393 KB,
  // so it stays in L2 while the item's rows run over it), then runs over every output row in
  // order, so its rows of y are read and written front to back, prefetched a chunk ahead
  std::vector<std::pair<int64_t, int64_t>> items;  // (tokens, e * seq + t0)
  for (int64_t e = 0; e < batch; ++e)
    if (which[e] >= 0)
      for (int64_t t0 = 0; t0 < length[e]; t0 += 32) items.emplace_back(std::min<int64_t>(32, length[e] - t0), e * seq + t0);
  std::stable_sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    float acc[kRowsPerItem * kStride] = {};  // lanes past an item's tokens are written back nowhere
    float* block = thread_block(in * kStride);
    for (int64_t i = next++; i < static_cast<int64_t>(items.size()); i = next++) {
      const auto [tokens, first_token] = items[i];
      const int64_t csr = which[first_token / seq];
      for (int64_t b = 0; b * 16 < tokens; ++b)
        to_block<scalar_t>(x_data + (first_token + b * 16) * in, in, std::min<int64_t>(16, tokens - b * 16),
                           block + b * 16, level);
      const int32_t* rp_all = rp_data[csr];
      const index_t* item_cols = col_data[csr];
      for (int64_t first = 0; first < out; first += kRowsPerItem) {
        const int64_t rows = std::min(out, first + kRowsPerItem) - first;
        if (rp_all[first] == rp_all[first + rows]) continue;  // nothing masked in these rows
        for (int64_t t = 0; t < tokens; ++t) {  // y's lines for these rows arrive while the rows run
          const scalar_t* y_next = y_data + (first_token + t) * out + first;
          for (int64_t r = 0; r < rows; r += 64 / sizeof(scalar_t)) __builtin_prefetch(y_next + r, 1);
        }
        const scalar_t* w_first = w_data + first * in;
        const int halves = tokens > 16 ? 2 : 1;
        if (level == 2) {
          const auto run = tokens <= 8 ? rows_avx512<8, index_t, scalar_t> : tokens <= 16 ? rows_avx512<16, index_t, scalar_t>
                         : tokens <= 24 ? rows_avx512<24, index_t, scalar_t> : rows_avx512<32, index_t, scalar_t>;
          run(w_first, in, rp_all + first, rows, item_cols, block, acc);
        } else if (level == 1) rows_avx2(w_first, in, rp_all + first, rows, item_cols, block, halves, acc);
        else rows_scalar(w_first, in, rp_all + first, rows, item_cols, block, halves, acc);
        scalar_t* y_first = y_data + first_token * out + first;
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (level == 2 && rows == kRowsPerItem) {
            subtract_tiles_avx512(y_first, out, acc, tokens);
            continue;
          }
        }
        for (int64_t t = 0; t < tokens; ++t) {
          scalar_t* y_row = y_first + t * out;
          for (int64_t r = 0; r < rows; ++r)
            y_row[r] = static_cast<scalar_t>(static_cast<float>(y_row[r]) - acc[r * kStride + t]);
        }
      }
    }
  });
}

void supermask_correct(at::Tensor y, const at::Tensor& x, const at::Tensor& weight, at::TensorList row_ptrs,
                       at::TensorList cols, const at::Tensor& example_csr, const at::Tensor& lengths, int64_t level) {
  TORCH_CHECK(y.device().is_cpu() && y.dim() == 3 && y.is_contiguous(), "y: a contiguous CPU (B, S, out) tensor");
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.scalar_type() == y.scalar_type() && x.size(0) == y.size(0) &&
              x.size(1) == y.size(1), "x: contiguous (B, S, in), y's dtype");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == y.scalar_type() && weight.size(0) == y.size(2) &&
              weight.size(1) == x.size(2), "weight: contiguous (out, in), y's dtype");
  TORCH_CHECK(example_csr.scalar_type() == at::kLong && example_csr.numel() == y.size(0), "example_csr: int64 (B,)");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.numel() == y.size(0), "lengths: int64 (B,)");
  TORCH_CHECK(row_ptrs.size() == cols.size(), "one column index tensor per row pointer tensor");
  const auto index_type = cols.empty() ? at::kShort : cols[0].scalar_type();
  std::vector<at::Tensor> rps(row_ptrs.begin(), row_ptrs.end()), cs(cols.begin(), cols.end());
  for (size_t i = 0; i < rps.size(); ++i) {
    TORCH_CHECK(rps[i].scalar_type() == at::kInt && rps[i].numel() == y.size(2) + 1 && rps[i].is_contiguous(),
                "row pointers: int32 (out + 1)");
    TORCH_CHECK(cs[i].scalar_type() == index_type && cs[i].is_contiguous(), "column indices: one integer type");
  }
  const int64_t* which = example_csr.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  for (int64_t e = 0; e < example_csr.numel(); ++e) {
    TORCH_CHECK(which[e] >= -1 && which[e] < static_cast<int64_t>(rps.size()), "example_csr out of range");
    TORCH_CHECK(length[e] >= 0 && length[e] <= y.size(1), "lengths out of range");
  }
  const int best = best_level();
  const int run = level < 0 ? best : static_cast<int>(level);
  TORCH_CHECK(run <= best, "dispatch level ", run, " is beyond what this CPU runs (", best, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "supermask_correct", [&] {
    switch (index_type) {
      case at::kByte: correct_typed<uint8_t, scalar_t>(y, x, weight, rps, cs, example_csr, lengths, run); break;
      case at::kShort: correct_typed<int16_t, scalar_t>(y, x, weight, rps, cs, example_csr, lengths, run); break;
      case at::kInt: correct_typed<int32_t, scalar_t>(y, x, weight, rps, cs, example_csr, lengths, run); break;
      default: TORCH_CHECK(false, "column indices must be uint8, int16 or int32");
    }
  });
}

int64_t supermask_best_level() { return best_level(); }

// Whether at::parallel_for runs on torch's threads here (built with OpenMP), or serially.
bool kernels_parallel() {
#ifdef INTRA_OP_PARALLEL
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(ticketserve, m) {
  m.def("supermask_correct(Tensor(a!) y, Tensor x, Tensor weight, Tensor[] row_ptrs, Tensor[] cols, "
        "Tensor example_csr, Tensor lengths, int level) -> ()");
  m.def("supermask_best_level() -> int", &supermask_best_level);
  m.def("kernels_parallel() -> bool", &kernels_parallel);
}

TORCH_LIBRARY_IMPL(ticketserve, CPU, m) { m.impl("supermask_correct", &supermask_correct); }
