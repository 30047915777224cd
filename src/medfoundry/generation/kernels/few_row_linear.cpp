// medfoundry::few_row_linear(x, weight): x (rows, K) @ weight (N, K)^T for 1-8 rows, on a CPU with AVX2 and FMA.
//
// A decode step multiplies a few rows by each weight matrix, so its speed is how fast the weights stream from
// memory. MKL and oneDNN treat 2-8 rows as a small GEMM and read SmolLM2's fp32 weights at 3-7 GB/s on 2 AVX2
// cores (bf16 weights: 1.3-2 GB/s). Here each weight element is loaded once, 16 columns at a time, and multiplied
// into one accumulator per (weight row, input row) while it is in a register; bf16 is widened to fp32 with two
// integer ops (see load16). Sums are in fp32; x and the output are fp32 or bf16 (the output has the dtype of x).
// Weight rows are split between the threads of ATen's pool. Where both are bf16 and the CPU has AVX-512 BF16 (Zen 4
// and later, Intel since Cooper Lake), products are taken by vdpbf16ps instead (see dot_rows).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <vector>

namespace {

constexpr int64_t kGroup = 16;  // columns per step of the k loop: two vectors of 8 fp32

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Columns [k, k + 16) of a weight row as two fp32 vectors. fp32: columns k..k+7 and k+8..k+15. bf16: one 32-byte
// load holds 8 pairs of columns (2i, 2i+1); the even column of each pair becomes fp32 by a left shift, the odd one
// by masking off the low half (two cheap integer ops, no shuffle), so the vectors hold columns k+0,2,..,14 and
// k+1,3,..,15, and x is laid out to match (see pairs_split).
inline void load16(const float* p, __m256& a, __m256& b) {
  a = _mm256_loadu_ps(p);
  b = _mm256_loadu_ps(p + 8);
}

inline void load16(const at::BFloat16* p, __m256& a, __m256& b) {
  const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
  b = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// x (rows, K, fp32, contiguous) with each full group of 16 columns in the order load16 gives bf16 weights' columns:
// the 8 even columns, then the 8 odd ones.
std::vector<float> pairs_split(const float* x, int64_t rows, int64_t K) {
  std::vector<float> out(x, x + rows * K);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k + kGroup <= K; k += kGroup)
      for (int64_t i = 0; i < 8; ++i) {
        out[r * K + k + i] = x[r * K + k + 2 * i];
        out[r * K + k + 8 + i] = x[r * K + k + 2 * i + 1];
      }
  return out;
}

// Weight row n against all ROWS input rows, each weight element loaded once. Up to 4 rows, two accumulators per
// row (one per vector of load16) keep enough independent FMA chains; past 4, one per row keeps them in registers.
template <typename W, typename O, int ROWS>
inline void block(const float* x, const W* w, O* out, int64_t K, int64_t N, int64_t n) {
  constexpr int CHAINS = ROWS <= 4 ? 2 : 1;
  __m256 acc[CHAINS][ROWS];
  for (int c = 0; c < CHAINS; ++c)
    for (int r = 0; r < ROWS; ++r) acc[c][r] = _mm256_setzero_ps();
  const W* row = w + n * K;
  int64_t k = 0;
  for (; k + kGroup <= K; k += kGroup) {
    __m256 wa, wb;
    load16(row + k, wa, wb);
    for (int r = 0; r < ROWS; ++r) {
      acc[0][r] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x + r * K + k), acc[0][r]);
      acc[CHAINS - 1][r] = _mm256_fmadd_ps(wb, _mm256_loadu_ps(x + r * K + k + 8), acc[CHAINS - 1][r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    float sum = hsum(CHAINS == 2 ? _mm256_add_ps(acc[0][r], acc[CHAINS - 1][r]) : acc[0][r]);
    for (int64_t t = k; t < K; ++t) sum += static_cast<float>(row[t]) * x[r * K + t];
    out[r * N + n] = static_cast<O>(sum);
  }
}

// One weight row at a time: the weights are read as one sequential stream, which the hardware prefetcher follows
// best (4 rows at a time read 10-30% slower at 1-2 input rows), and the accumulators stay within the 16 registers.
template <typename W, typename O, int ROWS>
void weight_rows(const float* x, const W* w, O* out, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) block<W, O, ROWS>(x, w, out, K, N, n);
}

template <typename W, typename O>
void run(const float* x, const W* w, O* out, int64_t rows, int64_t K, int64_t N) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    switch (rows) {
      case 1: return weight_rows<W, O, 1>(x, w, out, K, N, n0, n1);
      case 2: return weight_rows<W, O, 2>(x, w, out, K, N, n0, n1);
      case 3: return weight_rows<W, O, 3>(x, w, out, K, N, n0, n1);
      case 4: return weight_rows<W, O, 4>(x, w, out, K, N, n0, n1);
      case 5: return weight_rows<W, O, 5>(x, w, out, K, N, n0, n1);
      case 6: return weight_rows<W, O, 6>(x, w, out, K, N, n0, n1);
      case 7: return weight_rows<W, O, 7>(x, w, out, K, N, n0, n1);
      default: return weight_rows<W, O, 8>(x, w, out, K, N, n0, n1);
    }
  });
}

// bf16 x and weights on a CPU with AVX-512 BF16: vdpbf16ps multiplies 32 bf16 columns of a weight row by 32 of an
// input row and adds the pairs into 16 fp32 sums, four times the multiply-adds of an AVX2 FMA per instruction and
// with x read as bf16, not widened: at 8 rows the AVX2 path is bound by its loads of x (8 GB/s of SmolLM2's
// weights on 2 Zen 4 cores), this one by the memory. The products of two bf16 numbers are exact in fp32; the
// instruction adds them in fp32 with denormals flushed to zero. The last K % 32 columns are read by masked loads
// (zeros beyond K).
#define MF_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Weight row `row` against every input row; the sums go to out[r * N].
template <int ROWS>
MF_AVX512_BF16 inline void dot_row(const at::BFloat16* x, const at::BFloat16* row, at::BFloat16* out, int64_t K,
                                   __mmask32 tail, int64_t N) {
  constexpr int CHAINS = ROWS == 1 ? 4 : ROWS == 2 ? 2 : 1;  // independent sums per weight row: hide the latency
  constexpr int64_t kStep = 32 * CHAINS;
  __m512 acc[CHAINS][ROWS];
  for (int c = 0; c < CHAINS; ++c)
    for (int r = 0; r < ROWS; ++r) acc[c][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + kStep <= K; k += kStep)
    for (int c = 0; c < CHAINS; ++c) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(row + k + 32 * c);
      for (int r = 0; r < ROWS; ++r)
        acc[c][r] = _mm512_dpbf16_ps(acc[c][r], wv, (__m512bh)_mm512_loadu_si512(x + r * K + k + 32 * c));
    }
  for (; k + 32 <= K; k += 32) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(row + k);
    for (int r = 0; r < ROWS; ++r)
      acc[0][r] = _mm512_dpbf16_ps(acc[0][r], wv, (__m512bh)_mm512_loadu_si512(x + r * K + k));
  }
  if (tail) {
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, row + k);
    for (int r = 0; r < ROWS; ++r)
      acc[0][r] = _mm512_dpbf16_ps(acc[0][r], wv, (__m512bh)_mm512_maskz_loadu_epi16(tail, x + r * K + k));
  }
  for (int r = 0; r < ROWS; ++r) {
    __m512 sum = acc[0][r];
    for (int c = 1; c < CHAINS; ++c) sum = _mm512_add_ps(sum, acc[c][r]);
    out[r * N] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(sum));
  }
}

// One weight row at a time, as in the AVX2 path: two weight rows per input vector loaded (16 sums in registers)
// read SmolLM2's weights 1.5-2x slower at 4 and 8 rows on Zen 4.
template <int ROWS>
MF_AVX512_BF16 void dot_rows(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* out, int64_t K, int64_t N,
                             int64_t n0, int64_t n1) {
  const __mmask32 tail = K % 32 ? static_cast<__mmask32>((1u << (K % 32)) - 1) : 0;
  for (int64_t n = n0; n < n1; ++n) dot_row<ROWS>(x, w + n * K, out + n, K, tail, N);
}

void run_dot(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* out, int64_t rows, int64_t K, int64_t N) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    switch (rows) {
      case 1: return dot_rows<1>(x, w, out, K, N, n0, n1);
      case 2: return dot_rows<2>(x, w, out, K, N, n0, n1);
      case 3: return dot_rows<3>(x, w, out, K, N, n0, n1);
      case 4: return dot_rows<4>(x, w, out, K, N, n0, n1);
      case 5: return dot_rows<5>(x, w, out, K, N, n0, n1);
      case 6: return dot_rows<6>(x, w, out, K, N, n0, n1);
      case 7: return dot_rows<7>(x, w, out, K, N, n0, n1);
      default: return dot_rows<8>(x, w, out, K, N, n0, n1);
    }
  });
}

bool has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

template <typename W>
void run_for_output(const float* x, const W* w, at::Tensor& out, int64_t rows, int64_t K, int64_t N) {
  if (out.scalar_type() == at::kFloat) {
    run(x, w, out.mutable_data_ptr<float>(), rows, K, N);
  } else {
    run(x, w, out.mutable_data_ptr<at::BFloat16>(), rows, K, N);
  }
}

at::Tensor few_row_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "few_row_linear: x (rows, K) and weight (N, K), got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "few_row_linear: 1 to 8 rows, got ", x.size(0));
  TORCH_CHECK(weight.is_contiguous(), "few_row_linear: the weight must be contiguous");
  for (const at::Tensor* t : {&x, &weight})
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16,
                "few_row_linear: fp32 or bf16 tensors, got ", t->scalar_type());
  const int64_t rows = x.size(0), K = x.size(1), N = weight.size(0);
  if (x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 && has_avx512_bf16()) {
    const at::Tensor xc = x.contiguous();
    at::Tensor out = at::empty({rows, N}, x.options());
    run_dot(xc.const_data_ptr<at::BFloat16>(), weight.const_data_ptr<at::BFloat16>(),
            out.mutable_data_ptr<at::BFloat16>(), rows, K, N);
    return out;
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // at most 8 rows
  at::Tensor out = at::empty({rows, N}, x.options());
  if (weight.scalar_type() == at::kFloat) {
    run_for_output(xf.const_data_ptr<float>(), weight.const_data_ptr<float>(), out, rows, K, N);
  } else {
    const std::vector<float> split = pairs_split(xf.const_data_ptr<float>(), rows, K);
    run_for_output(split.data(), weight.const_data_ptr<at::BFloat16>(), out, rows, K, N);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(medfoundry, m) { m.def("few_row_linear(Tensor x, Tensor weight) -> Tensor"); }
TORCH_LIBRARY_IMPL(medfoundry, CPU, m) { m.impl("few_row_linear", &few_row_linear); }
