// Supermask correction: y[e] -= x[e] · C_eᵀ for every example e of a mixed batch, where
// C_e = W ⊙ (1 − M_e) holds only the weights e's task switched off. The shared dense GEMM
// x·Wᵀ ran once for the whole batch; this subtracts each example's masked-out weights.
//
// C_e is a CSR over output rows of the masked positions: row pointers (int32) and column
// indices (uint8 / int16 / int32, the narrowest that fits the input width); its values are
// read from the shared weight W itself, never copied. A work item — (example, 32 tokens),
// spread over torch's threads — first lays its tokens out as blocks of 16, (in, 16) float32
// each, in a per-thread buffer that stays in L2, so one masked weight is one broadcast-FMA
// over 16 tokens held in a register (AVX-512; AVX2: two). Its sums, row-major, go back into
// the token-major y as 16 × 16 tiles transposed in registers (AVX-512, float32). Tokens past
// an example's length (its padding) are skipped: nothing reads a padding position's output
// (attention masks it, pooling ignores it).
//
// Dispatch at run time: level 2 = AVX-512F, 1 = AVX2+FMA, 0 = portable C++; -1 = the best
// this CPU runs.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kRowsPerItem = 32;  // output rows accumulated before they are written to y

// Tokens travel in blocks of 16, (in, 16) float32, so one masked weight of a row costs one
// 64-byte line of the block and one FMA: acc[0:16] = Σ_j W[o, c_j] · block[c_j, 0:16].

template <typename index_t, typename scalar_t>
void row_scalar(const scalar_t* w_row, const int32_t* rp, const index_t* cols, const float* block, float* acc) {
  float sum[16] = {};
  for (int32_t j = rp[0]; j < rp[1]; ++j) {
    const int64_t c = static_cast<int64_t>(cols[j]);
    const float w = static_cast<float>(w_row[c]);
    const float* x = block + c * 16;
    for (int t = 0; t < 16; ++t) sum[t] += w * x[t];
  }
  std::copy(sum, sum + 16, acc);
}

template <typename index_t, typename scalar_t>
__attribute__((target("avx512f"))) void row_avx512(const scalar_t* w_row, const int32_t* rp, const index_t* cols,
                                                   const float* block, float* acc) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;  // four independent FMA chains
  int32_t j = rp[0];
  for (; j + 3 < rp[1]; j += 4) {
    const int64_t c0 = cols[j], c1 = cols[j + 1], c2 = cols[j + 2], c3 = cols[j + 3];
    s0 = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(w_row[c0])), _mm512_loadu_ps(block + c0 * 16), s0);
    s1 = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(w_row[c1])), _mm512_loadu_ps(block + c1 * 16), s1);
    s2 = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(w_row[c2])), _mm512_loadu_ps(block + c2 * 16), s2);
    s3 = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(w_row[c3])), _mm512_loadu_ps(block + c3 * 16), s3);
  }
  for (; j < rp[1]; ++j) {
    const int64_t c = cols[j];
    s0 = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(w_row[c])), _mm512_loadu_ps(block + c * 16), s0);
  }
  _mm512_storeu_ps(acc, _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

// Two token blocks at once (`next` = the second's base): each masked weight's index and value
// are read once for 32 tokens.
template <typename index_t, typename scalar_t>
__attribute__((target("avx512f"))) void row2_avx512(const scalar_t* w_row, const int32_t* rp, const index_t* cols,
                                                    const float* block, int64_t next, float* acc, float* acc_next) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
  int32_t j = rp[0];
  for (; j + 1 < rp[1]; j += 2) {
    const int64_t c0 = cols[j], c1 = cols[j + 1];
    const __m512 w0 = _mm512_set1_ps(static_cast<float>(w_row[c0])), w1 = _mm512_set1_ps(static_cast<float>(w_row[c1]));
    a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(block + c0 * 16), a0);
    b0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(block + next + c0 * 16), b0);
    a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(block + c1 * 16), a1);
    b1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(block + next + c1 * 16), b1);
  }
  if (j < rp[1]) {
    const int64_t c = cols[j];
    const __m512 w = _mm512_set1_ps(static_cast<float>(w_row[c]));
    a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(block + c * 16), a0);
    b0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(block + next + c * 16), b0);
  }
  _mm512_storeu_ps(acc, _mm512_add_ps(a0, a1));
  _mm512_storeu_ps(acc_next, _mm512_add_ps(b0, b1));
}

template <typename index_t, typename scalar_t>
__attribute__((target("avx2,fma"))) void row_avx2(const scalar_t* w_row, const int32_t* rp, const index_t* cols,
                                                  const float* block, float* acc) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;  // two weights per step, two halves each
  int32_t j = rp[0];
  for (; j + 1 < rp[1]; j += 2) {
    const int64_t c0 = cols[j], c1 = cols[j + 1];
    const __m256 w0 = _mm256_set1_ps(static_cast<float>(w_row[c0])), w1 = _mm256_set1_ps(static_cast<float>(w_row[c1]));
    a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(block + c0 * 16), a0);
    a1 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(block + c0 * 16 + 8), a1);
    b0 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(block + c1 * 16), b0);
    b1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(block + c1 * 16 + 8), b1);
  }
  if (j < rp[1]) {
    const int64_t c = cols[j];
    const __m256 w = _mm256_set1_ps(static_cast<float>(w_row[c]));
    a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(block + c * 16), a0);
    a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(block + c * 16 + 8), a1);
  }
  _mm256_storeu_ps(acc, _mm256_add_ps(a0, b0));
  _mm256_storeu_ps(acc + 8, _mm256_add_ps(a1, b1));
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
      for (int i = 0; i < 16; ++i) m[i] = _mm512_loadu_ps(acc + (h + i) * 32 + b * 16);
      transpose16(m);
      const int64_t n = std::min<int64_t>(16, tokens - b * 16);
      for (int64_t t = 0; t < n; ++t) {
        float* row = y + (b * 16 + t) * stride + h;
        _mm512_storeu_ps(row, _mm512_sub_ps(_mm512_loadu_ps(row), m[t]));
      }
    }
  }
}

// One block of 16 tokens (`n` real, rows `in` apart) as (in, 16): 16 × 16 tiles transposed in
// registers, zeros for the tokens past n.
__attribute__((target("avx512f"))) void transpose_block_avx512(const float* src, int64_t in, int64_t n, float* dst) {
  __m512 m[16];
  for (int64_t c = 0; c < in; c += 16) {
    for (int64_t t = 0; t < 16; ++t) m[t] = t < n ? _mm512_loadu_ps(src + t * in + c) : _mm512_setzero_ps();
    transpose16(m);
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + (c + i) * 16, m[i]);
  }
}

int best_level() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}

// 16 tokens (`n` real, rows `in` apart) as one block of (in, 16) float32, zero past n.
template <typename scalar_t>
void to_block(const scalar_t* src, int64_t in, int64_t n, float* dst, int level) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (level == 2 && in % 16 == 0) return transpose_block_avx512(src, in, n, dst);
  }
  for (int64_t c0 = 0; c0 < in; c0 += 16) {  // 16 features at a time: 16 lines written in turn
    const int64_t c1 = std::min(in, c0 + 16);
    for (int64_t t = 0; t < 16; ++t)
      for (int64_t c = c0; c < c1; ++c) dst[c * 16 + t] = t < n ? static_cast<float>(src[t * in + c]) : 0.f;
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
  // fixed shares would leave a thread idle). Each item first lays its tokens out as two blocks
  // of (in, 16) float32 in a per-thread buffer (zero past the example's length; at most 393 KB,
  // so it stays in L2 while the item's rows run over it), then runs over every output row in
  // order, so its rows of y are read and written front to back, prefetched a chunk ahead
  std::vector<std::pair<int64_t, int64_t>> items;  // (tokens, e * seq + t0)
  for (int64_t e = 0; e < batch; ++e)
    if (which[e] >= 0)
      for (int64_t t0 = 0; t0 < length[e]; t0 += 32) items.emplace_back(std::min<int64_t>(32, length[e] - t0), e * seq + t0);
  std::stable_sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    float acc[kRowsPerItem * 32];
    std::vector<float> local(static_cast<size_t>(in) * 32);
    float* block = local.data();
    for (int64_t i = next++; i < static_cast<int64_t>(items.size()); i = next++) {
      const auto [tokens, first_token] = items[i];
      const int64_t csr = which[first_token / seq];
      for (int64_t b = 0; b * 16 < tokens; ++b)
        to_block<scalar_t>(x_data + (first_token + b * 16) * in, in, std::min<int64_t>(16, tokens - b * 16),
                           block + b * in * 16, level);
      const int32_t* rp_all = rp_data[csr];
      const index_t* item_cols = col_data[csr];
      for (int64_t first = 0; first < out; first += kRowsPerItem) {
        const int64_t rows = std::min(out, first + kRowsPerItem) - first;
        if (rp_all[first] == rp_all[first + rows]) continue;  // nothing masked in these rows
        for (int64_t t = 0; t < tokens; ++t) {  // y's lines for these rows arrive while the rows run
          const scalar_t* y_next = y_data + (first_token + t) * out + first;
          for (int64_t r = 0; r < rows; r += 64 / sizeof(scalar_t)) __builtin_prefetch(y_next + r, 1);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int32_t* rp = rp_all + first + r;
          float* row_acc = acc + r * 32;
          if (rp[0] == rp[1]) { std::fill(row_acc, row_acc + 32, 0.f); continue; }
          const scalar_t* w_row = w_data + (first + r) * in;
          if (level == 2 && tokens > 16) row2_avx512(w_row, rp, item_cols, block, in * 16, row_acc, row_acc + 16);
          else if (level == 2) row_avx512(w_row, rp, item_cols, block, row_acc);
          else for (int64_t b = 0; b * 16 < tokens; ++b) {
            if (level == 1) row_avx2(w_row, rp, item_cols, block + b * in * 16, row_acc + b * 16);
            else row_scalar(w_row, rp, item_cols, block + b * in * 16, row_acc + b * 16);
          }
        }
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
            y_row[r] = static_cast<scalar_t>(static_cast<float>(y_row[r]) - acc[r * 32 + t]);
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
