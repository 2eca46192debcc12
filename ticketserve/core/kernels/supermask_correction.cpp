// Supermask correction: y[e] -= x[e] · C_eᵀ for every example e of a mixed batch, where
// C_e = W ⊙ (1 − M_e) holds only the weights e's task switched off. The shared dense GEMM
// x·Wᵀ ran once for the whole batch; this subtracts each example's masked-out weights.
//
// C_e is a CSR over output rows of the masked positions: row pointers (int32) and column
// indices (uint8 / int16 / int32, the narrowest that fits the input width); its values are
// read from the shared weight W itself, never copied. x arrives transposed per example,
// xt[e] = (in, S_pad) in float32, so one masked weight is one broadcast-FMA over a block of
// tokens held in registers (AVX-512: 16 tokens per register, AVX2: 8), up to 4 registers.
//
// Dispatch at run time: level 2 = AVX-512F, 1 = AVX2+FMA, 0 = portable C++; -1 = the best
// this CPU runs. Work items are (example, block of output rows), spread over torch's threads.

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kRowsPerItem = 32;  // output rows per work item

// acc[0:S_pad] = Σ_j W[o, c_j] · xt[c_j, 0:S_pad] over row o's masked positions (portable)
template <typename index_t, typename scalar_t>
void row_scalar(const scalar_t* w_row, const int32_t* rp, const index_t* cols, const float* xt, int64_t s_pad,
                float* acc) {
  std::fill(acc, acc + s_pad, 0.f);
  for (int32_t j = rp[0]; j < rp[1]; ++j) {
    const int64_t c = static_cast<int64_t>(cols[j]);
    const float w = static_cast<float>(w_row[c]);
    const float* x = xt + c * s_pad;
    for (int64_t t = 0; t < s_pad; ++t) acc[t] += w * x[t];
  }
}

template <int NV, typename index_t, typename scalar_t>
__attribute__((target("avx512f"))) void block512(const scalar_t* w_row, const int32_t* rp, const index_t* cols,
                                                 const float* xt, int64_t s_pad, int64_t t0, float* acc) {
  __m512 sum[NV];
  for (int v = 0; v < NV; ++v) sum[v] = _mm512_setzero_ps();
  for (int32_t j = rp[0]; j < rp[1]; ++j) {
    const int64_t c = static_cast<int64_t>(cols[j]);
    const __m512 w = _mm512_set1_ps(static_cast<float>(w_row[c]));
    const float* x = xt + c * s_pad + t0;
    for (int v = 0; v < NV; ++v) sum[v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 16 * v), sum[v]);
  }
  for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + t0 + 16 * v, sum[v]);
}

template <typename index_t, typename scalar_t>
__attribute__((target("avx512f"))) void row_avx512(const scalar_t* w_row, const int32_t* rp, const index_t* cols,
                                                   const float* xt, int64_t s_pad, float* acc) {
  int64_t t = 0;  // s_pad is a multiple of 16
  for (; t + 64 <= s_pad; t += 64) block512<4>(w_row, rp, cols, xt, s_pad, t, acc);
  switch ((s_pad - t) / 16) {
    case 3: block512<3>(w_row, rp, cols, xt, s_pad, t, acc); break;
    case 2: block512<2>(w_row, rp, cols, xt, s_pad, t, acc); break;
    case 1: block512<1>(w_row, rp, cols, xt, s_pad, t, acc); break;
    default: break;
  }
}

template <int NV, typename index_t, typename scalar_t>
__attribute__((target("avx2,fma"))) void block256(const scalar_t* w_row, const int32_t* rp, const index_t* cols,
                                                  const float* xt, int64_t s_pad, int64_t t0, float* acc) {
  __m256 sum[NV];
  for (int v = 0; v < NV; ++v) sum[v] = _mm256_setzero_ps();
  for (int32_t j = rp[0]; j < rp[1]; ++j) {
    const int64_t c = static_cast<int64_t>(cols[j]);
    const __m256 w = _mm256_set1_ps(static_cast<float>(w_row[c]));
    const float* x = xt + c * s_pad + t0;
    for (int v = 0; v < NV; ++v) sum[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 8 * v), sum[v]);
  }
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(acc + t0 + 8 * v, sum[v]);
}

template <typename index_t, typename scalar_t>
__attribute__((target("avx2,fma"))) void row_avx2(const scalar_t* w_row, const int32_t* rp, const index_t* cols,
                                                  const float* xt, int64_t s_pad, float* acc) {
  int64_t t = 0;  // s_pad is a multiple of 16: whole blocks of 32, then one of 16 at most
  for (; t + 32 <= s_pad; t += 32) block256<4>(w_row, rp, cols, xt, s_pad, t, acc);
  if (t < s_pad) block256<2>(w_row, rp, cols, xt, s_pad, t, acc);
}

int best_level() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}

template <typename index_t, typename scalar_t>
void correct_typed(at::Tensor& y, const at::Tensor& xt, const at::Tensor& weight, const std::vector<at::Tensor>& row_ptrs,
                   const std::vector<at::Tensor>& cols, const at::Tensor& example_csr, int level) {
  const int64_t batch = y.size(0), seq = y.size(1), out = y.size(2), in = weight.size(1), s_pad = xt.size(2);
  const int64_t blocks = (out + kRowsPerItem - 1) / kRowsPerItem;
  const int64_t* which = example_csr.data_ptr<int64_t>();
  scalar_t* y_data = y.data_ptr<scalar_t>();
  const scalar_t* w_data = weight.data_ptr<scalar_t>();
  const float* xt_data = xt.data_ptr<float>();
  std::vector<const int32_t*> rp_data;
  std::vector<const index_t*> col_data;
  for (size_t i = 0; i < row_ptrs.size(); ++i) {
    rp_data.push_back(row_ptrs[i].data_ptr<int32_t>());
    col_data.push_back(reinterpret_cast<const index_t*>(cols[i].data_ptr()));
  }
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(s_pad);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t e = item / blocks, first = (item % blocks) * kRowsPerItem;
      const int64_t csr = which[e];
      if (csr < 0) continue;
      const float* x = xt_data + e * in * s_pad;
      for (int64_t o = first; o < std::min(out, first + kRowsPerItem); ++o) {
        const int32_t* rp = rp_data[csr] + o;
        if (rp[0] == rp[1]) continue;
        const scalar_t* w_row = w_data + o * in;
        if (level == 2) row_avx512(w_row, rp, col_data[csr], x, s_pad, acc.data());
        else if (level == 1) row_avx2(w_row, rp, col_data[csr], x, s_pad, acc.data());
        else row_scalar(w_row, rp, col_data[csr], x, s_pad, acc.data());
        scalar_t* y_col = y_data + e * seq * out + o;
        for (int64_t t = 0; t < seq; ++t) y_col[t * out] = static_cast<scalar_t>(static_cast<float>(y_col[t * out]) - acc[t]);
      }
    }
  });
}

void supermask_correct(at::Tensor y, const at::Tensor& xt, const at::Tensor& weight, at::TensorList row_ptrs,
                       at::TensorList cols, const at::Tensor& example_csr, int64_t level) {
  TORCH_CHECK(y.device().is_cpu() && y.dim() == 3 && y.is_contiguous(), "y: a contiguous CPU (B, S, out) tensor");
  TORCH_CHECK(xt.scalar_type() == at::kFloat && xt.dim() == 3 && xt.is_contiguous() && xt.size(0) == y.size(0) &&
              xt.size(2) >= y.size(1) && xt.size(2) % 16 == 0, "xt: contiguous float32 (B, in, S padded to 16)");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == y.scalar_type() && weight.size(0) == y.size(2) &&
              weight.size(1) == xt.size(1), "weight: contiguous (out, in), y's dtype");
  TORCH_CHECK(example_csr.scalar_type() == at::kLong && example_csr.numel() == y.size(0), "example_csr: int64 (B,)");
  TORCH_CHECK(row_ptrs.size() == cols.size(), "one column index tensor per row pointer tensor");
  const auto index_type = cols.empty() ? at::kShort : cols[0].scalar_type();
  std::vector<at::Tensor> rps(row_ptrs.begin(), row_ptrs.end()), cs(cols.begin(), cols.end());
  for (size_t i = 0; i < rps.size(); ++i) {
    TORCH_CHECK(rps[i].scalar_type() == at::kInt && rps[i].numel() == y.size(2) + 1 && rps[i].is_contiguous(),
                "row pointers: int32 (out + 1)");
    TORCH_CHECK(cs[i].scalar_type() == index_type && cs[i].is_contiguous(), "column indices: one integer type");
  }
  const int64_t* which = example_csr.data_ptr<int64_t>();
  for (int64_t e = 0; e < example_csr.numel(); ++e)
    TORCH_CHECK(which[e] >= -1 && which[e] < static_cast<int64_t>(rps.size()), "example_csr out of range");
  const int best = best_level();
  const int run = level < 0 ? best : static_cast<int>(level);
  TORCH_CHECK(run <= best, "dispatch level ", run, " is beyond what this CPU runs (", best, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "supermask_correct", [&] {
    switch (index_type) {
      case at::kByte: correct_typed<uint8_t, scalar_t>(y, xt, weight, rps, cs, example_csr, run); break;
      case at::kShort: correct_typed<int16_t, scalar_t>(y, xt, weight, rps, cs, example_csr, run); break;
      case at::kInt: correct_typed<int32_t, scalar_t>(y, xt, weight, rps, cs, example_csr, run); break;
      default: TORCH_CHECK(false, "column indices must be uint8, int16 or int32");
    }
  });
}

int64_t supermask_best_level() { return best_level(); }

}  // namespace

TORCH_LIBRARY(ticketserve, m) {
  m.def("supermask_correct(Tensor(a!) y, Tensor xt, Tensor weight, Tensor[] row_ptrs, Tensor[] cols, "
        "Tensor example_csr, int level) -> ()");
  m.def("supermask_best_level() -> int", &supermask_best_level);
}

TORCH_LIBRARY_IMPL(ticketserve, CPU, m) { m.impl("supermask_correct", &supermask_correct); }
