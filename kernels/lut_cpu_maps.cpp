// The compiled low-rank plans in one call (appended to lut_cpu.cpp): for a factorization
// denominator * lut[v][w] = sum_i x[v][i] y[w][i] with integer maps x, y [256, W],
//   out[g][m][n] = sum_k sum_i x[byte(a[g][m][k])][i] y[byte(b[g][k][n])][i] / denominator,
// the maps read by code on the way (no mapped copy of a in memory) and multiplied in registers.
// The maps are float32, or int16 in pairs (two map columns per int32 word, see PairMaps).
// Exactness: over `chunk` K columns every partial sum is an integer below 2**24 (float32) or 2**31
// (int16 pairs, int32 sums) (the caller's proof), so the multiply-adds are exact; chunks are summed
// in float64 (exact below 2**53); the quotient by the denominator is an exact integer, which the
// correctly rounded division gives.
//
// b's maps are packed once per group into panels of one register block's columns, depth-major
// ([K * W][columns]). Each task takes a register block's rows of a: with several column panels it
// maps them into a small panel of maps once and runs the register block over every column panel;
// with one column panel (N up to a block's columns) it copies their map offsets depth-major and the
// register block reads the maps at them itself (a mapped panel would be stored and read back for
// one use: measured, AVX2, width 2, (8192, 150, 16) 1.13 -> 0.58 ms, (73728, 25, 6) 1.58 -> 0.73).
// Vectors are GCC/Clang vector extensions, 16 lanes where the target has AVX-512, else 8 (AVX2, or
// SSE pairs).
namespace {

#if defined(__AVX512F__)
constexpr int kMapLanes = 16;
#else
constexpr int kMapLanes = 8;
#endif

// How a register block multiplies the maps. FloatMaps: float32 maps, one FMA per map column.
// PairMaps: int16 maps, two map columns in one int32 word, multiplied and added in pairs (vpmaddwd;
// vpdpwssd with AVX-512 VNNI): two map columns per instruction pair where an FMA does one, exact in
// int32 (maps below 2**15, every partial sum below 2**31: the caller's proof).
// Each has the rows of its register blocks (wide: 2 vectors of b, narrow: 1), sized to the register
// file with the b vectors, a broadcast and temporaries: a spilled sum makes every multiply-add
// wait on memory.
struct FloatMaps {
  using Entry = float;
  // 32 registers with AVX-512, 16 with AVX2 (with an earlier panel layout GCC spilled one of 6 x 2
  // AVX2 sums, 10.2 ms at (4096, 1152, 128) against 7.1 ms for 5 x 2; with this layout 6 x 2 does
  // not spill and runs like 5 x 2, within the noise).
#if defined(__AVX512F__)
  static constexpr int kWideRows = 8, kNarrowRows = 16;
#else
  static constexpr int kWideRows = 5, kNarrowRows = 12;
#endif
  typedef float Vector __attribute__((vector_size(4 * kMapLanes)));
  static Vector load(const Entry* entries) { return *reinterpret_cast<const Vector*>(entries); }
  static Vector multiply_add(Vector sum, Entry a, Vector b) { return sum + a * b; }
  static Vector add(Vector a, Vector b) { return a + b; }
};

#if (defined(__AVX512F__) && defined(__AVX512BW__)) || (!defined(__AVX512F__) && defined(__AVX2__))
#define APPROXRUN_PAIR_MAPS 1
constexpr bool kPairMaps = true;
// Vector has the intrinsics' element type (long long), so that they take it as it is; its lanes hold
// int32 sums. b is loaded as __m256i/__m512i, which may alias its int32 entries.
struct PairMaps {
  using Entry = int32_t;
#if defined(__AVX512F__)
  static constexpr int kWideRows = FloatMaps::kWideRows, kNarrowRows = FloatMaps::kNarrowRows;
#else
  // Fewer rows than FloatMaps: each vpmaddwd's product holds a register until its vpaddd, and GCC
  // issues the products early; in a copy of multiply_offsets' loop it kept some of 5 x 2 or 12 x 1
  // sums in memory, none of 4 x 2 or 7 x 1 (the kernel's timings with either differed within the
  // noise: AVX2, widths 2-5 at the five core shapes).
  static constexpr int kWideRows = 4, kNarrowRows = 7;
#endif
  typedef long long Vector __attribute__((vector_size(4 * kMapLanes)));
#if defined(__AVX512F__)
  static Vector load(const Entry* entries) { return reinterpret_cast<Vector>(_mm512_load_si512(entries)); }
  static Vector add(Vector a, Vector b) { return reinterpret_cast<Vector>(_mm512_add_epi32(a, b)); }
  static Vector multiply_add(Vector sum, Entry a, Vector b) {
#if defined(__AVX512VNNI__)
    return reinterpret_cast<Vector>(_mm512_dpwssd_epi32(sum, _mm512_set1_epi32(a), b));
#else
    return reinterpret_cast<Vector>(_mm512_add_epi32(sum, _mm512_madd_epi16(_mm512_set1_epi32(a), b)));
#endif
  }
#else
  static Vector load(const Entry* entries) {
    return reinterpret_cast<Vector>(_mm256_load_si256(reinterpret_cast<const __m256i*>(entries)));
  }
  static Vector add(Vector a, Vector b) { return reinterpret_cast<Vector>(_mm256_add_epi32(a, b)); }
  static Vector multiply_add(Vector sum, Entry a, Vector b) {
    return add(sum, reinterpret_cast<Vector>(_mm256_madd_epi16(_mm256_set1_epi32(a), b)));
  }
#endif
};
#else
constexpr bool kPairMaps = false;
#endif

// A register block of Rows x Vectors sums: 2 vectors for wide b, 1 for b of one vector's width or
// less (no FMA on padding only). The panel of b is Vectors * kMapLanes columns.
template <int Rows, int Vectors, typename Arith>
struct MapBlock {
  using Entry = typename Arith::Entry;
  using Vector = typename Arith::Vector;
  static constexpr int64_t kColumns = Vectors * kMapLanes;
  static constexpr int64_t kOffsetTile = 64;  // K columns of a block's offsets copied at a time

  // sums[r][v] += a_panel[k][r][i] * b_panel[(k, i)][v] over k in [k0, k1) and i < width (a mapped
  // panel, each code's maps side by side, so that mapping copies them in one piece: measured, AVX2,
  // width 2, (4096, 1152, 128) 14.5 -> 12.6 ms; one pointer for all broadcasts, AVX2 has few spare
  // registers). Width: the maps' columns when fixed at compile time (see with_width: loops over them
  // unrolled, copies of a fixed size), 0 for `width` at run time.
  template <int Width>
  static void multiply(const Entry* a_panel, int64_t width, const Entry* b_panel, int64_t k0, int64_t k1,
                       Vector (&sums)[Rows][Vectors]) {
    if (Width) width = Width;
    const Entry* b_rows = b_panel + k0 * width * kColumns;
    for (int64_t k = k0; k < k1; ++k) {
      const Entry* maps = a_panel + k * Rows * width;
      for (int64_t i = 0; i < width; ++i, b_rows += kColumns) {
        Vector b_row[Vectors];
        for (int v = 0; v < Vectors; ++v) b_row[v] = Arith::load(b_rows + v * kMapLanes);
        for (int r = 0; r < Rows; ++r) {
          const Entry value = maps[r * width + i];
          for (int v = 0; v < Vectors; ++v) sums[r][v] = Arith::multiply_add(sums[r][v], value, b_row[v]);
        }
      }
    }
  }

  // The same with the maps read at their offsets, for k in a tile [k0, k1) of at most kOffsetTile
  // (offsets[r][k - k0] = byte(code) * width: a row's offsets a constant displacement apart)
  // straight into the broadcasts. The tile's own sums, added to `sums` at the end, stay in
  // registers: `sums` live across the caller's calls of prepare, and GCC kept PairMaps' int32
  // sums in memory around every add (vpaddd takes a memory operand; an FMA's sum cannot).
  template <int Width>
  static void multiply_offsets(const int32_t* offsets, const Entry* x, int64_t width, const Entry* b_panel,
                               int64_t k0, int64_t k1, Vector (&sums)[Rows][Vectors]) {
    if (Width) width = Width;
    Vector tile[Rows][Vectors] = {};
    const Entry* b_rows = b_panel + k0 * width * kColumns;
    for (const int32_t* column = offsets; column < offsets + (k1 - k0); ++column) {
      for (int64_t i = 0; i < width; ++i, b_rows += kColumns) {
        Vector b_row[Vectors];
        for (int v = 0; v < Vectors; ++v) b_row[v] = Arith::load(b_rows + v * kMapLanes);
        for (int r = 0; r < Rows; ++r) {
          const Entry value = x[column[r * kOffsetTile] + i];
          for (int v = 0; v < Vectors; ++v) tile[r][v] = Arith::multiply_add(tile[r][v], value, b_row[v]);
        }
      }
    }
    for (int r = 0; r < Rows; ++r) {
      for (int v = 0; v < Vectors; ++v) sums[r][v] = Arith::add(sums[r][v], tile[r][v]);
    }
  }

  // offsets[r][k - k0] = byte(a[m0 + r][k]) * width for k in [k0, k1) and the block's rows (missing
  // rows: 0, their sums dropped): rows of codes copied as rows (vector loads and stores).
  template <typename Code>
  static void offsets_of(const Code* a, int64_t m0, int64_t rows, int64_t k_size, int64_t k0, int64_t k1,
                         int64_t width, int32_t* offsets) {
    for (int64_t r = 0; r < Rows; ++r) {
      int32_t* dst = offsets + r * kOffsetTile;
      if (r >= rows) {
        std::fill(dst, dst + (k1 - k0), 0);
        continue;
      }
      const Code* row = a + (m0 + r) * k_size + k0;
      for (int64_t k = 0; k < k1 - k0; ++k) dst[k] = static_cast<int32_t>(byte_of(row[k]) * width);
    }
  }

  // a_panel[k][r][:] = x[byte(a[m0 + r][k])][:] for the block's rows (missing rows: zeros); Width as
  // for multiply.
  template <int Width, typename Code>
  static void map_rows(const Code* a, int64_t m0, int64_t rows, int64_t k_size, const Entry* x, int64_t width,
                       Entry* a_panel) {
    if (Width) width = Width;
    if (rows < Rows) std::fill(a_panel, a_panel + Rows * k_size * width, Entry(0));
    for (int64_t r = 0; r < rows; ++r) {
      const Code* row = a + (m0 + r) * k_size;
      for (int64_t k = 0; k < k_size; ++k) {
        std::memcpy(a_panel + (k * Rows + r) * width, x + byte_of(row[k]) * width, sizeof(Entry) * width);
      }
    }
  }

  // b_panels[p][(k, i)][c] = y[byte(b[k][p * kColumns + c])][i] (columns beyond N: zeros); Width as
  // for multiply.
  template <int Width, typename Code>
  static void pack_b(const Code* b, int64_t k_size, int64_t n_size, int64_t stride_k, int64_t stride_n,
                     const Entry* y, int64_t width, Entry* panels) {
    const int64_t n_panels = (n_size + kColumns - 1) / kColumns, depth = k_size * width;
    at::parallel_for(0, n_panels * k_size, std::max<int64_t>(1, 4096 / kColumns), [&](int64_t begin, int64_t end) {
      const int64_t width_here = Width ? Width : width;  // a constant here: a captured width is read through memory
      int64_t p = begin / k_size, k = begin % k_size;  // task t is (p, k): stepped, not divided per task
      for (int64_t t = begin; t < end; ++t, k = k + 1 < k_size ? k + 1 : 0, p += k == 0) {
        const int64_t columns = std::min(kColumns, n_size - p * kColumns);
        const Code* codes = b + k * stride_k + p * kColumns * stride_n;
        Entry* dst = panels + (p * depth + k * width_here) * kColumns;
        for (int64_t c = 0; c < columns; ++c) {
          const Entry* maps = y + byte_of(codes[c * stride_n]) * width_here;
          for (int64_t i = 0; i < width_here; ++i) dst[i * kColumns + c] = maps[i];
        }
        for (int64_t i = 0; i < width_here; ++i) {
          std::fill(dst + i * kColumns + columns, dst + (i + 1) * kColumns, Entry(0));
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

  // Prepares a block's rows of a for rows(): map_rows (all of K) into a panel of maps (Mapped) or
  // offsets_of (K columns [k0, k1)) into int32 offsets. The code type is erased here so that rows()
  // is compiled once per width and output type, not once per code type as well (the kernel's build
  // time stays about the same).
  using Prepare = void (*)(const void* a, int64_t m0, int64_t rows, int64_t k_size, int64_t k0, int64_t k1,
                           const Entry* x, int64_t width, void* panel);

  template <int Width, bool Mapped, typename Code>
  static void prepare(const void* a, int64_t m0, int64_t rows, int64_t k_size, int64_t k0, int64_t k1,
                      const Entry* x, int64_t width, void* panel) {
    if constexpr (Mapped) {
      map_rows<Width>(static_cast<const Code*>(a), m0, rows, k_size, x, width, static_cast<Entry*>(panel));
    } else {
      offsets_of(static_cast<const Code*>(a), m0, rows, k_size, k0, k1, width, static_cast<int32_t*>(panel));
    }
  }

  // out rows of codes a [M, K] against the packed panels of b, in parallel over blocks of rows: with
  // several column panels (Mapped) each block's rows are mapped once into a panel of maps that every
  // column panel reuses, with one the register block reads the maps at the block's offsets. Width
  // as for multiply. K runs in chunks whose sums are exact; several chunks add up in float64.
  template <int Width, bool Mapped, typename Out>
  static void rows(const void* a, Prepare prepare, int64_t m_size, int64_t k_size, int64_t n_size, const Entry* x,
                   int64_t width, const Entry* panels, int64_t chunk, double denominator, Out* out) {
    const int64_t depth = k_size * width, n_panels = (n_size + kColumns - 1) / kColumns;
    const int64_t blocks = (m_size + Rows - 1) / Rows;
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, Rows * depth * n_panels * kColumns));
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      std::vector<Entry> a_panel(Mapped ? depth * Rows : 0);
      std::vector<int32_t> offsets(Mapped ? 0 : kOffsetTile * Rows);
      alignas(64) Entry part[Rows][kColumns];
      double totals[Rows][kColumns];
      for (int64_t block = begin; block < end; ++block) {
        const int64_t m0 = block * Rows, rows = std::min<int64_t>(Rows, m_size - m0);
        if (Mapped) prepare(a, m0, rows, k_size, 0, k_size, x, width, a_panel.data());
        for (int64_t p = 0; p < n_panels; ++p) {
          const Entry* b_panel = panels + p * depth * kColumns;
          const int64_t columns = std::min(kColumns, n_size - p * kColumns);
          Out* out_rows = out + m0 * n_size + p * kColumns;
          const bool one_chunk = chunk >= k_size;  // then the block's sums are the totals
          for (int64_t k0 = 0; k0 < k_size; k0 += chunk) {
            const int64_t k1 = std::min(k_size, k0 + chunk);
            Vector sums[Rows][Vectors] = {};
            if constexpr (Mapped) {
              multiply<Width>(a_panel.data(), width, b_panel, k0, k1, sums);
            } else {
              for (int64_t t0 = k0; t0 < k1; t0 += kOffsetTile) {
                const int64_t t1 = std::min(k1, t0 + kOffsetTile);
                prepare(a, m0, rows, k_size, t0, t1, x, width, offsets.data());
                multiply_offsets<Width>(offsets.data(), x, width, b_panel, t0, t1, sums);
              }
            }
            std::memcpy(part, sums, sizeof(part));
            for (int64_t r = 0; r < rows && !one_chunk; ++r) {
              for (int64_t c = 0; c < columns; ++c) {
                totals[r][c] = (k0 ? totals[r][c] : 0.0) + static_cast<double>(part[r][c]);
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

// fn(std::integral_constant<int, W>) with W = width where the kernels have a version for it (1-4: an
// error of rank up to 3 plus the exact product; measured, AVX2, width 4, (4096, 576, 64) 7.4 ->
// 6.2 ms), else 0 (the width at run time).
template <typename Fn>
void with_width(int64_t width, Fn&& fn) {
  if (width == 1) {
    fn(std::integral_constant<int, 1>{});
  } else if (width == 2) {
    fn(std::integral_constant<int, 2>{});
  } else if (width == 3) {
    fn(std::integral_constant<int, 3>{});
  } else if (width == 4) {
    fn(std::integral_constant<int, 4>{});
  } else {
    fn(std::integral_constant<int, 0>{});
  }
}

// All groups of the GEMM with one register block shape.
template <typename Block>
void map_gemm_groups(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& x, const torch::Tensor& y,
                     int64_t chunk, int64_t denominator, torch::Tensor& out) {
  const int64_t groups = a.size(0), m_size = a.size(1), k_size = a.size(2), n_size = b.size(2), width = x.size(1);
  const int64_t n_panels = (n_size + Block::kColumns - 1) / Block::kColumns;
  using Entry = typename Block::Entry;
  torch::Tensor panels = torch::empty({n_panels * k_size * width * Block::kColumns}, x.options());  // 64-byte aligned
  const Entry *x_maps = x.data_ptr<Entry>(), *y_maps = y.data_ptr<Entry>();
  Entry* b_panels = panels.data_ptr<Entry>();
  for (int64_t g = 0; g < groups; ++g) {
    const auto a_g = a[g], b_g = b[g];
    with_output(out, "map_gemm", [&](auto* out_ptr) {
      auto* out_g = out_ptr + g * m_size * n_size;
      with_width(width, [&](auto fixed) {
        constexpr int kWidth = decltype(fixed)::value;
        with_codes(b_g, "map_gemm", [&](auto* codes) {
          Block::template pack_b<kWidth>(codes, k_size, n_size, b_g.stride(0), b_g.stride(1), y_maps, width,
                                         b_panels);
        });
        with_codes(a_g, "map_gemm", [&](auto* codes) {
          using Code = std::remove_const_t<std::remove_pointer_t<decltype(codes)>>;
          const auto run = [&](auto mapped) {  // several column panels: a's rows mapped once per block
            constexpr bool kMapped = decltype(mapped)::value;
            Block::template rows<kWidth, kMapped>(codes, &Block::template prepare<kWidth, kMapped, Code>, m_size,
                                                  k_size, n_size, x_maps, width, b_panels, chunk,
                                                  static_cast<double>(denominator), out_g);
          };
          if (n_panels > 1) {
            run(std::true_type{});
          } else {
            run(std::false_type{});
          }
        });
      });
    });
  }
}

template <typename Arith>
void map_gemm_blocks(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& x, const torch::Tensor& y,
                     int64_t chunk, int64_t denominator, torch::Tensor& out) {
  if (b.size(2) <= kMapLanes) {
    map_gemm_groups<MapBlock<Arith::kNarrowRows, 1, Arith>>(a, b, x, y, chunk, denominator, out);
  } else {
    map_gemm_groups<MapBlock<Arith::kWideRows, 2, Arith>>(a, b, x, y, chunk, denominator, out);
  }
}

}  // namespace

// The low-rank plan in one call (see the top of this part): codes a [G, M, K] and b [G, K, N] (any
// strides for b), maps x, y [256, W] either float32 or int32 words of int16 map pairs (where
// map_gemm_pairs()), K in chunks of `chunk` columns; written into out [G, M, N] (float64 or int64)
// and returned.
torch::Tensor map_gemm(torch::Tensor a, torch::Tensor b, torch::Tensor x, torch::Tensor y, int64_t chunk,
                       int64_t denominator, torch::Tensor out) {
  const torch::Tensor result = out;
  as_groups("map_gemm", a, b, out);
  const bool pairs = x.dtype() == torch::kInt32;
  TORCH_CHECK((x.dtype() == torch::kFloat32 || (pairs && kPairMaps)) && y.dtype() == x.dtype() && x.dim() == 2 &&
              y.dim() == 2 && x.size(0) == 256 && y.size(0) == 256 && x.size(1) == y.size(1) && x.is_contiguous() &&
              y.is_contiguous(), "map_gemm: float32 maps x, y [256, W] (or int32 pair words where built) expected");
  TORCH_CHECK(chunk >= 1 && denominator >= 1, "map_gemm: chunk >= 1 and denominator >= 1 expected");
  a = a.contiguous();
  if (!pairs) {
    map_gemm_blocks<FloatMaps>(a, b, x, y, chunk, denominator, out);
  } else {
#ifdef APPROXRUN_PAIR_MAPS
    map_gemm_blocks<PairMaps>(a, b, x, y, chunk, denominator, out);
#endif
  }
  return result;
}

// Lanes of one vector of map_gemm's register blocks (8: AVX2, 16: AVX-512): b of up to this many
// columns gets blocks of one vector, wider b of two.
int64_t map_gemm_lanes() { return kMapLanes; }

// Whether map_gemm takes int16 map pairs (AVX2 or AVX-512 BW builds).
bool map_gemm_pairs() { return kPairMaps; }
