// Exact LUT GEMM on the CPU: out[g][m][n] = sum_k lut[a[g][m][k]][b[g][k][n]] (byte operands).
// lut_gemm: one read of a 256-entry LUT row per product (small shapes); lut_gemm_table: tables of
// products per tile of k, then contiguous row adds (large shapes). Rows in parallel (torch's pool).
// Sums are int32 when the caller proved that K * max|lut| < 2**31, int64 otherwise; the result is
// float64, exact (|sum| < 2**53). Built by approxrun/ops/native.py with torch's cpp_extension.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kTileN = 512;  // accumulators kept per output row tile

template <typename Sum>
void gemm_rows(const uint8_t* a, const uint8_t* b, const int32_t* lut, double* out, int64_t k_size,
               int64_t n_size, int64_t row_begin, int64_t row_end) {
  Sum sums[kTileN];
  for (int64_t row = row_begin; row < row_end; ++row) {
    const uint8_t* a_row = a + row * k_size;
    for (int64_t n0 = 0; n0 < n_size; n0 += kTileN) {
      const int64_t width = std::min(kTileN, n_size - n0);
      std::fill(sums, sums + width, Sum(0));
      for (int64_t k = 0; k < k_size; ++k) {
        const int32_t* lut_row = lut + static_cast<int64_t>(a_row[k]) * 256;
        const uint8_t* b_row = b + k * n_size + n0;
        for (int64_t j = 0; j < width; ++j) sums[j] += lut_row[b_row[j]];
      }
      double* out_row = out + row * n_size + n0;
      for (int64_t j = 0; j < width; ++j) out_row[j] = static_cast<double>(sums[j]);
    }
  }
}

constexpr int64_t kTableBytes = 1 << 21;  // one tile of tables (k x 256 x N int32): about an L2 cache

// T[kk][v][j] = lut[v][b[k0 + kk][j]] for a tile of k, then each row adds one contiguous table row
// per k: out[m][j] += T[kk][a[m][k0 + kk]][j] (vector adds, no gathers in the row loop).
template <typename Sum>
void table_gemm(const uint8_t* a, const uint8_t* b, const int32_t* lut, double* out, int64_t m_size,
                int64_t k_size, int64_t n_size) {
  const int64_t tile_k = std::max<int64_t>(1, kTableBytes / (256 * 4 * n_size));  // few parallel regions
  std::vector<int32_t> table(std::min(tile_k, k_size) * 256 * n_size);
  std::vector<Sum> sums(m_size * n_size, Sum(0));
  for (int64_t k0 = 0; k0 < k_size; k0 += tile_k) {
    const int64_t depth = std::min(tile_k, k_size - k0);
    at::parallel_for(0, depth * 256, 16, [&](int64_t begin, int64_t end) {
      for (int64_t entry = begin; entry < end; ++entry) {
        const int64_t kk = entry / 256, v = entry % 256;
        const uint8_t* b_row = b + (k0 + kk) * n_size;
        int32_t* t_row = table.data() + entry * n_size;
        for (int64_t j = 0; j < n_size; ++j) t_row[j] = lut[v * 256 + b_row[j]];
      }
    });
    at::parallel_for(0, m_size, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, n_size)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        Sum* row = sums.data() + m * n_size;
        const uint8_t* a_row = a + m * k_size + k0;
        for (int64_t kk = 0; kk < depth; ++kk) {
          const int32_t* t_row = table.data() + (kk * 256 + a_row[kk]) * n_size;
          for (int64_t j = 0; j < n_size; ++j) row[j] += t_row[j];
        }
      }
    });
  }
  for (int64_t i = 0; i < m_size * n_size; ++i) out[i] = static_cast<double>(sums[i]);
}

// Both entry points take uint8 codes a [G, M, K], b [G, K, N] and a contiguous int32 [256, 256] LUT.
void check_operands(const char* name, const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& lut) {
  TORCH_CHECK(a.dtype() == torch::kUInt8 && b.dtype() == torch::kUInt8, name, ": uint8 operands expected");
  TORCH_CHECK(lut.dtype() == torch::kInt32 && lut.numel() == 256 * 256 && lut.is_contiguous(),
              name, ": a contiguous int32 [256, 256] LUT expected");
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1),
              name, ": a [G, M, K] and b [G, K, N] expected");
}

}  // namespace

torch::Tensor lut_gemm_table(torch::Tensor a, torch::Tensor b, torch::Tensor lut, bool wide_sums) {
  check_operands("lut_gemm_table", a, b, lut);
  a = a.contiguous();
  b = b.contiguous();
  const int64_t groups = a.size(0), m_size = a.size(1), k_size = a.size(2), n_size = b.size(2);
  auto out = torch::empty({groups, m_size, n_size}, torch::kFloat64);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* a_g = a.data_ptr<uint8_t>() + g * m_size * k_size;
    const uint8_t* b_g = b.data_ptr<uint8_t>() + g * k_size * n_size;
    double* out_g = out.data_ptr<double>() + g * m_size * n_size;
    if (wide_sums) {
      table_gemm<int64_t>(a_g, b_g, lut.data_ptr<int32_t>(), out_g, m_size, k_size, n_size);
    } else {
      table_gemm<int32_t>(a_g, b_g, lut.data_ptr<int32_t>(), out_g, m_size, k_size, n_size);
    }
  }
  return out;
}

torch::Tensor lut_gemm(torch::Tensor a, torch::Tensor b, torch::Tensor lut, bool wide_sums) {
  check_operands("lut_gemm", a, b, lut);
  a = a.contiguous();
  b = b.contiguous();
  const int64_t groups = a.size(0), m_size = a.size(1), k_size = a.size(2), n_size = b.size(2);
  auto out = torch::empty({groups, m_size, n_size}, torch::kFloat64);
  const uint8_t* a_ptr = a.data_ptr<uint8_t>();
  const uint8_t* b_ptr = b.data_ptr<uint8_t>();
  const int32_t* lut_ptr = lut.data_ptr<int32_t>();
  double* out_ptr = out.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k_size * n_size));
  at::parallel_for(0, groups * m_size, grain, [&](int64_t begin, int64_t end) {
    while (begin < end) {  // rows of one group at a time
      const int64_t g = begin / m_size, row_end = std::min(end, (g + 1) * m_size);
      const uint8_t* a_g = a_ptr + g * m_size * k_size;
      const uint8_t* b_g = b_ptr + g * k_size * n_size;
      double* out_g = out_ptr + g * m_size * n_size;
      if (wide_sums) {
        gemm_rows<int64_t>(a_g, b_g, lut_ptr, out_g, k_size, n_size, begin - g * m_size, row_end - g * m_size);
      } else {
        gemm_rows<int32_t>(a_g, b_g, lut_ptr, out_g, k_size, n_size, begin - g * m_size, row_end - g * m_size);
      }
      begin = row_end;
    }
  });
  return out;
}
