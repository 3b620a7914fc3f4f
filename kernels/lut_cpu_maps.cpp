// The float32 low-rank plan in one call (appended to lut_cpu.cpp): for a factorization
// denominator * lut[v][w] = sum_i x[v][i] y[w][i] with integer float32 maps x, y [256, W],
//   out[g][m][n] = sum_k sum_i x[byte(a[g][m][k])][i] y[byte(b[g][k][n])][i] / denominator,
// the maps read by code on the way (no mapped copy of a in memory) and multiplied in registers.
// Exactness: over `chunk` K columns every partial sum is an integer below 2**24 (the caller's proof),
// so float32 FMAs are exact; chunks are summed in float64 (exact below 2**53); the quotient by the
// denominator is an exact integer, which the correctly rounded division gives.
//
// b's maps are packed once per group into panels of one register block's columns, depth-major
// ([K * W][columns]); each task maps a register block's rows of a into a small panel, then runs the
// register block over every column panel. Vectors are GCC/Clang vector extensions, 16 lanes where
// the target has AVX-512, else 8 (AVX2, or SSE pairs).
namespace {

// Rows of the register blocks, sized to the register file with the b vectors and a broadcast: 32
// registers with AVX-512, 16 with AVX2 (a spilled sum makes every FMA wait on memory; measured:
// AVX2, 6 x 2 sums at (4096, 1152, 128) 10.2 ms, 5 x 2 7.1 ms).
#if defined(__AVX512F__)
constexpr int kMapLanes = 16, kWideRows = 8, kNarrowRows = 16;
#else
constexpr int kMapLanes = 8, kWideRows = 5, kNarrowRows = 12;
#endif
typedef float MapFloats __attribute__((vector_size(4 * kMapLanes)));

// A register block of Rows x Vectors sums: 2 vectors for wide b, 1 for b of one vector's width or
// less (no FMA on padding only). The panel of b is Vectors * kMapLanes columns.
template <int Rows, int Vectors>
struct MapBlock {
  static constexpr int64_t kColumns = Vectors * kMapLanes;

  // The a panel's layout: row-major (rows of `depth`) for narrow b, whose blocks are bound by
  // mapping a (contiguous stores); depth-major for wide b, whose blocks are bound by FMAs (one
  // pointer for all broadcasts: AVX2 has few spare registers).
  static constexpr bool kRowMajor = Vectors == 1;

  // sums[r][v] += a_panel[r, d] * b_panel[d][v] over depth d in [d0, d1).
  static void multiply(const float* a_panel, int64_t depth, const float* b_panel, int64_t d0, int64_t d1,
                       MapFloats (&sums)[Rows][Vectors]) {
    for (int64_t d = d0; d < d1; ++d) {
      const MapFloats* b_row = reinterpret_cast<const MapFloats*>(b_panel + d * kColumns);
      const float* a_column = kRowMajor ? a_panel + d : a_panel + d * Rows;
      for (int r = 0; r < Rows; ++r) {
        const float value = kRowMajor ? a_column[r * depth] : a_column[r];
        for (int v = 0; v < Vectors; ++v) sums[r][v] += value * b_row[v];
      }
    }
  }

  // a_panel[r, (k, i)] = x[byte(a[m0 + r][k])][i] for the block's rows (missing rows: zeros).
  template <typename Code>
  static void map_rows(const Code* a, int64_t m0, int64_t rows, int64_t k_size, const float* x, int64_t width,
                       float* a_panel) {
    const int64_t depth = k_size * width, row_step = kRowMajor ? depth : 1, depth_step = kRowMajor ? 1 : Rows;
    if (rows < Rows) std::fill(a_panel, a_panel + Rows * depth, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const Code* row = a + (m0 + r) * k_size;
      float* dst = a_panel + r * row_step;
      if (width == 1) {
        for (int64_t k = 0; k < k_size; ++k) dst[k * depth_step] = x[byte_of(row[k])];
      } else {
        for (int64_t k = 0; k < k_size; ++k) {
          const float* maps = x + byte_of(row[k]) * width;
          for (int64_t i = 0; i < width; ++i) dst[(k * width + i) * depth_step] = maps[i];
        }
      }
    }
  }

  // b_panels[p][(k, i)][c] = y[byte(b[k][p * kColumns + c])][i] (columns beyond N: zeros).
  template <typename Code>
  static void pack_b(const Code* b, int64_t k_size, int64_t n_size, int64_t stride_k, int64_t stride_n,
                     const float* y, int64_t width, float* panels) {
    const int64_t n_panels = (n_size + kColumns - 1) / kColumns, depth = k_size * width;
    at::parallel_for(0, n_panels * k_size, std::max<int64_t>(1, 4096 / kColumns), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t p = t / k_size, k = t % k_size;
        float* dst = panels + (p * depth + k * width) * kColumns;
        for (int64_t c = 0; c < kColumns; ++c) {
          const int64_t n = p * kColumns + c;
          const float* maps = n < n_size ? y + byte_of(b[k * stride_k + n * stride_n]) * width : nullptr;
          for (int64_t i = 0; i < width; ++i) dst[i * kColumns + c] = maps ? maps[i] : 0.0f;
        }
      }
    });
  }

  // out[r][c] = sums[r][c] / denominator (an exact integer quotient: no division when it is 1).
  template <typename Sum, typename Out>
  static void write_rows(const Sum (&sums)[Rows][kColumns], int64_t rows, int64_t columns, double denominator,
                         Out* out, int64_t n_size) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < columns; ++c) {
        const double total = static_cast<double>(sums[r][c]);
        out[r * n_size + c] = static_cast<Out>(denominator == 1.0 ? total : total / denominator);
      }
    }
  }

  // out rows of codes a [M, K] against the packed panels of b, in parallel over blocks of rows.
  template <typename Code, typename Out>
  static void rows(const Code* a, int64_t m_size, int64_t k_size, int64_t n_size, const float* x, int64_t width,
                   const float* panels, int64_t chunk, double denominator, Out* out) {
    const int64_t depth = k_size * width, n_panels = (n_size + kColumns - 1) / kColumns;
    const int64_t blocks = (m_size + Rows - 1) / Rows;
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, Rows * depth * n_panels * kColumns));
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> a_panel(depth * Rows);
      alignas(64) float part[Rows][kColumns];
      double totals[Rows][kColumns];
      for (int64_t block = begin; block < end; ++block) {
        const int64_t m0 = block * Rows, rows = std::min<int64_t>(Rows, m_size - m0);
        map_rows(a, m0, rows, k_size, x, width, a_panel.data());
        for (int64_t p = 0; p < n_panels; ++p) {
          const float* b_panel = panels + p * depth * kColumns;
          const int64_t columns = std::min(kColumns, n_size - p * kColumns);
          Out* out_rows = out + m0 * n_size + p * kColumns;
          const bool one_chunk = chunk * width >= depth;  // then the float32 sums are the totals
          for (int64_t d0 = 0; d0 < depth; d0 += chunk * width) {
            MapFloats sums[Rows][Vectors] = {};
            multiply(a_panel.data(), depth, b_panel, d0, std::min(depth, d0 + chunk * width), sums);
            std::memcpy(part, sums, sizeof(part));
            for (int64_t r = 0; r < rows && !one_chunk; ++r) {
              for (int64_t c = 0; c < columns; ++c) {
                totals[r][c] = (d0 ? totals[r][c] : 0.0) + static_cast<double>(part[r][c]);
              }
            }
          }
          if (one_chunk) {
            write_rows(part, rows, columns, denominator, out_rows, n_size);
          } else {
            write_rows(totals, rows, columns, denominator, out_rows, n_size);
          }
        }
      }
    });
  }
};

// All groups of the GEMM with one register block shape.
template <typename Block>
void map_gemm_groups(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& x, const torch::Tensor& y,
                     int64_t chunk, int64_t denominator, torch::Tensor& out) {
  const int64_t groups = a.size(0), m_size = a.size(1), k_size = a.size(2), n_size = b.size(2), width = x.size(1);
  const int64_t n_panels = (n_size + Block::kColumns - 1) / Block::kColumns;
  torch::Tensor panels = torch::empty({n_panels * k_size * width * Block::kColumns}, torch::kFloat32);  // 64-byte aligned
  const float *x_maps = x.data_ptr<float>(), *y_maps = y.data_ptr<float>();
  float* b_panels = panels.data_ptr<float>();
  for (int64_t g = 0; g < groups; ++g) {
    const auto b_g = b[g];
    with_codes(b_g, "map_gemm", [&](auto* codes) {
      Block::pack_b(codes, k_size, n_size, b_g.stride(0), b_g.stride(1), y_maps, width, b_panels);
    });
    const auto a_g = a[g];
    with_codes(a_g, "map_gemm", [&](auto* codes) {
      with_output(out, "map_gemm", [&](auto* out_ptr) {
        Block::rows(codes, m_size, k_size, n_size, x_maps, width, b_panels, chunk, static_cast<double>(denominator),
                    out_ptr + g * m_size * n_size);
      });
    });
  }
}

}  // namespace

// The float32 low-rank plan (see the top of this part): codes a [G, M, K] and b [G, K, N] (any
// strides for b), maps x, y float32 [256, W], K in chunks of `chunk` columns; written into out
// [G, M, N] (float64 or int64) and returned.
torch::Tensor map_gemm(torch::Tensor a, torch::Tensor b, torch::Tensor x, torch::Tensor y, int64_t chunk,
                       int64_t denominator, torch::Tensor out) {
  check_shapes("map_gemm", a, b, out);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && y.dtype() == torch::kFloat32 && x.dim() == 2 && y.dim() == 2 &&
              x.size(0) == 256 && y.size(0) == 256 && x.size(1) == y.size(1) && x.is_contiguous() &&
              y.is_contiguous(), "map_gemm: float32 maps x, y [256, W] expected");
  TORCH_CHECK(chunk >= 1 && denominator >= 1, "map_gemm: chunk >= 1 and denominator >= 1 expected");
  a = a.contiguous();
  if (b.size(2) <= kMapLanes) {
    map_gemm_groups<MapBlock<kNarrowRows, 1>>(a, b, x, y, chunk, denominator, out);
  } else {
    map_gemm_groups<MapBlock<kWideRows, 2>>(a, b, x, y, chunk, denominator, out);
  }
  return out;
}

// Lanes of one vector of map_gemm's register blocks (8: AVX2, 16: AVX-512): b of up to this many
// columns gets blocks of one vector, wider b of two.
int64_t map_gemm_lanes() { return kMapLanes; }
