// LUT-derived gradients of a LUT GEMM in one call (appended to lut_cpu.cpp). For
// out[g][m][n] = sum_k lut[byte(a[g][m][k])][byte(b[g][k][n])] and the gradient tables da, db
// (float64 [256, 256], d lut / d a and d lut / d b in the byte-indexed convention):
//   grad_a[g][m][k] = sum_n grad[g][m][n] * da[byte(a[g][m][k])][byte(b[g][k][n])],
//   grad_b[g][k][n] = sum_m grad[g][m][n] * db[byte(a[g][m][k])][byte(b[g][k][n])].
// Each product's table entries are read where they are needed: torch's ops must gather an
// [M, K, N] copy of them first (or scatter a histogram), which is most of their time.
// A task owns a range of (group, k): the rows grad_b[g][k][:] are its own (no reduction across
// threads), and it runs over a's rows in blocks of kBackwardRows, k inside, so that the block's rows
// of grad and the sums of its k stay in cache.
namespace {

constexpr int64_t kBackwardRows = 64;

template <bool kWantA, bool kWantB, typename Code>
void backward_columns(const Code* a, const uint8_t* b, const double* grad, const double* da, const double* db,
                      double* grad_a, double* grad_b, int64_t m_size, int64_t k_size, int64_t n_size,
                      int64_t k_begin, int64_t k_end) {
  if constexpr (kWantB) std::fill(grad_b + k_begin * n_size, grad_b + k_end * n_size, 0.0);
  for (int64_t m0 = 0; m0 < m_size; m0 += kBackwardRows) {
    const int64_t m1 = std::min(m_size, m0 + kBackwardRows);
    for (int64_t k = k_begin; k < k_end; ++k) {
      const uint8_t* b_row = b + k * n_size;
      double* sums_b = kWantB ? grad_b + k * n_size : nullptr;
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t v = byte_of(a[m * k_size + k]);
        const double* g_row = grad + m * n_size;
        const double* da_row = da + v * 256;
        const double* db_row = db + v * 256;
        double sum_a = 0.0;
        for (int64_t n = 0; n < n_size; ++n) {
          const double g = g_row[n];
          const int64_t w = b_row[n];
          if constexpr (kWantA) sum_a += g * da_row[w];
          if constexpr (kWantB) sums_b[n] += g * db_row[w];
        }
        if constexpr (kWantA) grad_a[m * k_size + k] = sum_a;
      }
    }
  }
}

}  // namespace

// Writes grad_a [G, M, K] (when need_a) and grad_b [G, K, N] (when need_b), float64 and contiguous,
// for grad [G, M, N] (float64), codes a [G, M, K], b [G, K, N] and the tables da, db.
void lut_backward(torch::Tensor grad, torch::Tensor a, torch::Tensor b, torch::Tensor da, torch::Tensor db,
                  bool need_a, bool need_b, torch::Tensor grad_a, torch::Tensor grad_b) {
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && grad.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1)
                  && grad.size(0) == a.size(0) && grad.size(1) == a.size(1) && grad.size(2) == b.size(2),
              "lut_backward: grad [G, M, N], a [G, M, K] and b [G, K, N] expected");
  TORCH_CHECK(grad.scalar_type() == torch::kFloat64 && grad.is_contiguous() && grad.device().is_cpu(),
              "lut_backward: a contiguous float64 CPU grad expected");
  for (const torch::Tensor* table : {&da, &db}) {
    TORCH_CHECK(table->scalar_type() == torch::kFloat64 && table->numel() == 256 * 256 && table->is_contiguous(),
                "lut_backward: contiguous float64 [256, 256] gradient tables expected");
  }
  if (need_a) {
    TORCH_CHECK(grad_a.scalar_type() == torch::kFloat64 && grad_a.is_contiguous() && grad_a.sizes() == a.sizes(),
                "lut_backward: a contiguous float64 grad_a of a's shape expected");
  }
  if (need_b) {
    TORCH_CHECK(grad_b.scalar_type() == torch::kFloat64 && grad_b.is_contiguous() && grad_b.sizes() == b.sizes(),
                "lut_backward: a contiguous float64 grad_b of b's shape expected");
  }
  if (!need_a && !need_b) return;
  a = a.contiguous();
  b = code_bytes(b).contiguous();
  const int64_t groups = a.size(0), m_size = a.size(1), k_size = a.size(2), n_size = b.size(2);
  const double *grad_ptr = grad.data_ptr<double>(), *da_ptr = da.data_ptr<double>(), *db_ptr = db.data_ptr<double>();
  double* grad_a_ptr = need_a ? grad_a.data_ptr<double>() : nullptr;
  double* grad_b_ptr = need_b ? grad_b.data_ptr<double>() : nullptr;
  const uint8_t* b_ptr = b.data_ptr<uint8_t>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, m_size * n_size));
  with_codes(a, "lut_backward", [&](auto* a_ptr) {
    at::parallel_for(0, groups * k_size, grain, [&](int64_t begin, int64_t end) {
      while (begin < end) {  // columns k of one group at a time
        const int64_t g = begin / k_size, stop = std::min(end, (g + 1) * k_size);
        const auto* a_g = a_ptr + g * m_size * k_size;
        const uint8_t* b_g = b_ptr + g * k_size * n_size;
        const double* grad_g = grad_ptr + g * m_size * n_size;
        double* grad_a_g = need_a ? grad_a_ptr + g * m_size * k_size : nullptr;
        double* grad_b_g = need_b ? grad_b_ptr + g * k_size * n_size : nullptr;
        const int64_t k_begin = begin - g * k_size, k_end = stop - g * k_size;
        if (need_a && need_b) {
          backward_columns<true, true>(a_g, b_g, grad_g, da_ptr, db_ptr, grad_a_g, grad_b_g, m_size, k_size, n_size,
                                       k_begin, k_end);
        } else if (need_a) {
          backward_columns<true, false>(a_g, b_g, grad_g, da_ptr, db_ptr, grad_a_g, grad_b_g, m_size, k_size, n_size,
                                        k_begin, k_end);
        } else {
          backward_columns<false, true>(a_g, b_g, grad_g, da_ptr, db_ptr, grad_a_g, grad_b_g, m_size, k_size, n_size,
                                        k_begin, k_end);
        }
        begin = stop;
      }
    });
  });
}
