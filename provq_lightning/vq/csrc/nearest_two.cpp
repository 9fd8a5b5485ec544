// Fused nearest-code scan for CPU tensors: for every row of `a` (N x D, fp32), the index and
// score of the lowest score_j = half_sq[j] - a . codes[:, j] and the runner-up score, without
// writing the N x K score matrix. provq_lightning/search.py turns these into exact assignments
// (its rounding bound covers any fp32 evaluation order, FMA included).
//
// Layout: codes_t is D x K_pad (codes as columns, K_pad a multiple of kLanes), half_sq has
// +inf on the padding. Each step scores kLanes codes against kQueries rows with GCC/Clang
// vector extensions (AVX-512, AVX2 or NEON, whatever -march=native offers) and keeps, per lane,
// the best score, its index and the runner-up; the lanes are merged at the end. Eight rows per
// step reuse every loaded code vector eight times (measured: 4 rows 1.5x slower).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>

namespace {
constexpr int kLanes = 16;
constexpr int kQueries = 8;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int D>
void scan_rows(const float* a, int rows, int64_t d_runtime, const float* codes_t,
               const float* half_sq, int64_t k_pad, int64_t* out_index, float* out_best,
               float* out_second) {
  const int64_t d = D > 0 ? D : d_runtime;
  const float inf = std::numeric_limits<float>::infinity();
  vf best[kQueries], second[kQueries];
  vi index[kQueries];
  vi lane;
  for (int l = 0; l < kLanes; ++l) lane[l] = l;
  for (int q = 0; q < kQueries; ++q) {
    best[q] = vf{} + inf;
    second[q] = vf{} + inf;
    index[q] = lane;
  }
  for (int64_t t = 0; t < k_pad; t += kLanes) {
    vf s[kQueries];
    const vf h = load(half_sq + t);
    for (int q = 0; q < kQueries; ++q) s[q] = h;
    for (int64_t i = 0; i < d; ++i) {
      const vf c = load(codes_t + i * k_pad + t);
      // Rows past the end repeat row 0: their results are never written.
      for (int q = 0; q < kQueries; ++q) s[q] -= a[(q < rows ? q : 0) * d + i] * c;
    }
    const vi j = lane + static_cast<int32_t>(t);
    for (int q = 0; q < kQueries; ++q) {
      const vi lower = s[q] < best[q];
      // runner-up = min(runner-up, max(best, s)); best = min(best, s): strict <, so the first
      // (lowest) index wins a lane's exact ties.
      const vf high = best[q] > s[q] ? best[q] : s[q];
      second[q] = second[q] < high ? second[q] : high;
      index[q] = lower ? j : index[q];
      best[q] = lower ? s[q] : best[q];
    }
  }
  for (int q = 0; q < rows; ++q) {
    int win = 0;
    for (int l = 1; l < kLanes; ++l) {
      const bool lower = best[q][l] < best[q][win];
      const bool tie_lower_index = best[q][l] == best[q][win] && index[q][l] < index[q][win];
      if (lower || tie_lower_index) win = l;
    }
    float runner_up = second[q][win];
    for (int l = 0; l < kLanes; ++l) {
      if (l != win) runner_up = std::min(runner_up, best[q][l]);
    }
    out_index[q] = index[q][win];
    out_best[q] = best[q][win];
    out_second[q] = runner_up;
  }
}
}  // namespace

std::vector<at::Tensor> nearest_two(const at::Tensor& a, const at::Tensor& codes_t,
                                    const at::Tensor& half_sq) {
  TORCH_CHECK(a.dim() == 2 && codes_t.dim() == 2 && a.size(1) == codes_t.size(0),
              "nearest_two: a (N, D) and codes_t (D, K_pad) expected");
  TORCH_CHECK(a.scalar_type() == at::kFloat && codes_t.scalar_type() == at::kFloat &&
                  half_sq.scalar_type() == at::kFloat,
              "nearest_two: float32 tensors expected");
  TORCH_CHECK(a.is_contiguous() && codes_t.is_contiguous() && half_sq.is_contiguous(),
              "nearest_two: contiguous tensors expected");
  TORCH_CHECK(codes_t.size(1) % kLanes == 0 && half_sq.numel() == codes_t.size(1),
              "nearest_two: K_pad must be a multiple of 16 and match half_sq");
  TORCH_CHECK(codes_t.size(1) < std::numeric_limits<int32_t>::max(), "nearest_two: K too large");
  const int64_t n = a.size(0), d = a.size(1), k_pad = codes_t.size(1);
  auto index = at::empty({n}, a.options().dtype(at::kLong));
  auto best = at::empty({n}, a.options());
  auto second = at::empty({n}, a.options());
  const float* ap = a.data_ptr<float>();
  const float* cp = codes_t.data_ptr<float>();
  const float* hp = half_sq.data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  float* bp = best.data_ptr<float>();
  float* sp = second.data_ptr<float>();
  const int64_t steps = (n + kQueries - 1) / kQueries;
  at::parallel_for(0, steps, 8, [&](int64_t begin, int64_t end) {
    for (int64_t step = begin; step < end; ++step) {
      const int64_t r = step * kQueries;
      const int rows = static_cast<int>(std::min<int64_t>(kQueries, n - r));
      if (d == 8) {
        scan_rows<8>(ap + r * d, rows, d, cp, hp, k_pad, ip + r, bp + r, sp + r);
      } else {
        scan_rows<0>(ap + r * d, rows, d, cp, hp, k_pad, ip + r, bp + r, sp + r);
      }
    }
  });
  return {index, best, second};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("nearest_two", &nearest_two); }
