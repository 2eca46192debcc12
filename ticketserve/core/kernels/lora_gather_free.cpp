// LoRA terms of a mixed batch without gathering: y[e] += (x[e] · A_eᵀ) · (s·B_e)ᵀ for every
// example e, A_e and (s·B_e)ᵀ read in place from the shared factor tables (rows, R, in) and
// (rows, R, out) at e's table row. The batched-matmul path first copies every example's factors
// out of the tables (1.3 MB per example for r = 8 on all six matrices of MiniLM, from tables
// far larger than the caches) and then runs 2 × 32 tiny GEMMs per matrix whose per-call cost
// dominates their few FLOPs; here a work item — (example, up to 16 tokens), spread over torch's
// threads — reads its task's factors once from the table and keeps them in L1/L2 while its
// tokens run: first the R dot products of each token (x·Aᵀ, vectorised over `in`), then the
// R-term update of the token's output row (vectorised over `out`). Tokens past an example's
// length (its padding) are skipped, as in the supermask kernel: nothing reads them.
//
// Dispatch levels as for the supermask kernel (levels.h): AVX-512 register-blocked intrinsics
// where `in` and `out` are multiples of 16; otherwise, and for AVX2 and the portable level, the
// same plain loops compiled per target. Each token's term is summed on its own and added to y
// once, as the batched matmuls do. float32 only (other dtypes take the batched-matmul path).

#include "levels.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kTokensPerItem = 16;
constexpr int64_t kMaxRank = 256;
constexpr int64_t kChunk = 256;  // outputs whose term the portable loop holds at once

// One item: tokens [0, n) of x (rows `in` apart) and y (rows `out` apart), one task's factors.
__attribute__((always_inline)) inline void item_body(float* __restrict y, const float* __restrict x, int64_t n,
                                                     const float* __restrict a, const float* __restrict b,
                                                     int64_t rank, int64_t in, int64_t out) {
  float low[kMaxRank];
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x + t * in;
    for (int64_t r = 0; r < rank; ++r) {
      const float* ar = a + r * in;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < in; ++k) sum += xt[k] * ar[k];
      low[r] = sum;
    }
    float* yt = y + t * out;
    for (int64_t o0 = 0; o0 < out; o0 += kChunk) {  // the term alone, then added to y once (one rounding at y's magnitude)
      const int64_t width = std::min(kChunk, out - o0);
      float term[kChunk] = {};
      for (int64_t r = 0; r < rank; ++r) {
        const float v = low[r];
        const float* br = b + r * out + o0;
#pragma omp simd
        for (int64_t o = 0; o < width; ++o) term[o] += v * br[o];
      }
#pragma omp simd
      for (int64_t o = 0; o < width; ++o) yt[o0 + o] += term[o];
    }
  }
}

// AVX-512, for `in` and `out` multiples of 16: register-blocked. x·Aᵀ runs two tokens against
// eight factor rows at a time (16 accumulators; per 16 features 10 loads for 16 FMAs), the
// update four tokens against 64 outputs (16 accumulators held across every rank term).
template <int NT, int NR>
__attribute__((target("avx512f,fma"), always_inline)) inline void dots_avx512(const float* x, const float* a,
                                                                              int64_t in, float* low, int64_t rank) {
  __m512 acc[NT][NR];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < NR; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < in; k += 16) {
    __m512 xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_ps(x + t * in + k);
    for (int r = 0; r < NR; ++r) {
      const __m512 av = _mm512_loadu_ps(a + r * in + k);
      for (int t = 0; t < NT; ++t) acc[t][r] = _mm512_fmadd_ps(xv[t], av, acc[t][r]);
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < NR; ++r) low[t * kMaxRank + r] = _mm512_reduce_add_ps(acc[t][r]);
}

template <int NT>
__attribute__((target("avx512f,fma"), always_inline)) inline void update_avx512(float* y, const float* low,
                                                                                const float* b, int64_t rank,
                                                                                int64_t out) {
  int64_t o = 0;
  for (; o + 64 <= out; o += 64) {
    __m512 acc[NT][4];  // the term alone, added to y once: one rounding at y's magnitude, as (x·Aᵀ)·Bᵀ + y
    for (int t = 0; t < NT; ++t)
      for (int j = 0; j < 4; ++j) acc[t][j] = _mm512_setzero_ps();
    for (int64_t r = 0; r < rank; ++r) {
      __m512 bv[4];
      for (int j = 0; j < 4; ++j) bv[j] = _mm512_loadu_ps(b + r * out + o + 16 * j);
      for (int t = 0; t < NT; ++t) {
        const __m512 v = _mm512_set1_ps(low[t * kMaxRank + r]);
        for (int j = 0; j < 4; ++j) acc[t][j] = _mm512_fmadd_ps(v, bv[j], acc[t][j]);
      }
    }
    for (int t = 0; t < NT; ++t)
      for (int j = 0; j < 4; ++j) {
        float* at = y + t * out + o + 16 * j;
        _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), acc[t][j]));
      }
  }
  for (; o < out; o += 16) {
    __m512 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t r = 0; r < rank; ++r) {
      const __m512 bv = _mm512_loadu_ps(b + r * out + o);
      for (int t = 0; t < NT; ++t) acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(low[t * kMaxRank + r]), bv, acc[t]);
    }
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(y + t * out + o, _mm512_add_ps(_mm512_loadu_ps(y + t * out + o), acc[t]));
  }
}

__attribute__((target("avx512f,fma"))) void item_avx512(float* y, const float* x, int64_t n, const float* a,
                                                        const float* b, int64_t rank, int64_t in, int64_t out) {
  if (in % 16 || out % 16) return item_body(y, x, n, a, b, rank, in, out);
  alignas(64) float low[kTokensPerItem * kMaxRank];
  int64_t t = 0;
  for (; t + 2 <= n; t += 2) {
    int64_t r = 0;
    for (; r + 8 <= rank; r += 8) dots_avx512<2, 8>(x + t * in, a + r * in, in, low + t * kMaxRank + r, rank);
    for (; r < rank; ++r) dots_avx512<2, 1>(x + t * in, a + r * in, in, low + t * kMaxRank + r, rank);
  }
  for (; t < n; ++t) {
    int64_t r = 0;
    for (; r + 8 <= rank; r += 8) dots_avx512<1, 8>(x + t * in, a + r * in, in, low + t * kMaxRank + r, rank);
    for (; r < rank; ++r) dots_avx512<1, 1>(x + t * in, a + r * in, in, low + t * kMaxRank + r, rank);
  }
  t = 0;
  for (; t + 4 <= n; t += 4) update_avx512<4>(y + t * out, low + t * kMaxRank, b, rank, out);
  for (; t < n; ++t) update_avx512<1>(y + t * out, low + t * kMaxRank, b, rank, out);
}

__attribute__((target("avx2,fma"))) void item_avx2(float* y, const float* x, int64_t n, const float* a,
                                                   const float* b, int64_t rank, int64_t in, int64_t out) {
  item_body(y, x, n, a, b, rank, in, out);
}

void item_portable(float* y, const float* x, int64_t n, const float* a, const float* b, int64_t rank, int64_t in,
                   int64_t out) {
  item_body(y, x, n, a, b, rank, in, out);
}

void lora_add(at::Tensor y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& rows,
              const at::Tensor& lengths, int64_t level) {
  TORCH_CHECK(y.device().is_cpu() && y.dim() == 3 && y.is_contiguous() && y.scalar_type() == at::kFloat,
              "y: a contiguous float32 CPU (B, S, out) tensor");
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(0) == y.size(0) &&
              x.size(1) == y.size(1), "x: contiguous float32 (B, S, in)");
  TORCH_CHECK(a.dim() == 3 && a.is_contiguous() && a.scalar_type() == at::kFloat && a.size(2) == x.size(2),
              "a: contiguous float32 (rows, R, in)");
  TORCH_CHECK(b.dim() == 3 && b.is_contiguous() && b.scalar_type() == at::kFloat && b.size(0) == a.size(0) &&
              b.size(1) == a.size(1) && b.size(2) == y.size(2), "b: contiguous float32 (rows, R, out)");
  TORCH_CHECK(a.size(1) <= kMaxRank, "rank above ", kMaxRank);
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.numel() == y.size(0), "rows: int64 (B,)");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.numel() == y.size(0), "lengths: int64 (B,)");
  const int64_t batch = y.size(0), seq = y.size(1), out = y.size(2), in = x.size(2), rank = a.size(1);
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  for (int64_t e = 0; e < batch; ++e) {
    TORCH_CHECK(row[e] >= 0 && row[e] < a.size(0), "rows out of range");
    TORCH_CHECK(length[e] >= 0 && length[e] <= seq, "lengths out of range");
  }
  const int best = best_level();
  const int run = level < 0 ? best : static_cast<int>(level);
  TORCH_CHECK(run <= best, "dispatch level ", run, " is beyond what this CPU runs (", best, ")");
  const auto item = run == 2 ? item_avx512 : run == 1 ? item_avx2 : item_portable;
  // items: (example, t0) for the real tokens of examples with factors (row 0: none), longest
  // first, taken one at a time by torch's threads
  std::vector<std::pair<int64_t, int64_t>> items;  // (tokens, e * seq + t0)
  for (int64_t e = 0; e < batch; ++e)
    if (row[e] > 0)
      for (int64_t t0 = 0; t0 < length[e]; t0 += kTokensPerItem)
        items.emplace_back(std::min(kTokensPerItem, length[e] - t0), e * seq + t0);
  std::stable_sort(items.begin(), items.end(), [](const auto& p, const auto& q) { return p.first > q.first; });
  float* y_data = y.data_ptr<float>();
  const float* x_data = x.data_ptr<float>();
  const float* a_data = a.data_ptr<float>();
  const float* b_data = b.data_ptr<float>();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < static_cast<int64_t>(items.size()); i = next++) {
      const auto [tokens, first] = items[i];
      const int64_t task_row = row[first / seq];
      item(y_data + first * out, x_data + first * in, tokens, a_data + task_row * rank * in,
           b_data + task_row * rank * out, rank, in, out);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ticketserve, m) {
  m.def("lora_add(Tensor(a!) y, Tensor x, Tensor a, Tensor b, Tensor rows, Tensor lengths, int level) -> ()");
}

TORCH_LIBRARY_IMPL(ticketserve, CPU, m) { m.impl("lora_add", &lora_add); }
