// Exact LUT GEMMs on the CPU, out[g][m][n] = sum_k lut[byte(a[g][m][k])][byte(b[g][k][n])], and the
// map gathers of the low-rank plans. Codes are uint8, int8, int16, int32, int64 or integers held in
// float32/float64: the byte of a code (its value modulo 256) is the LUT index, read on the way, so no
// index tensor is ever made.
// - lut_gemm: one LUT read per product (small shapes; with AVX2 and int32 sums, eight reads per
//   gather instruction);
// - lut_gemm_table: per 16 columns and tile of k, tables T[k][v][:] = lut[v][b[k][:]] of every
//   product a weight column can produce (transposed columns of the LUT; 16-bit offset values in
//   pairs where the LUT's values span less than 2**16), then each row adds one table row per k in
//   registers (vector adds, no gathers in the row loop; large shapes);
// - lut_gemm_permute (kernels/lut_cpu_permute.cpp, appended to this file): byte permutes over a
//   LUT's byte planes in registers (AVX-512 VBMI);
// - gather_rows: out[i][:] = table[byte(codes[i])][:], rows of 4-byte words (packed int8 maps,
//   float32 or float64 maps);
// - unfold_rows: im2col of a convolution's padded input into int32 or int64 window rows;
// - int8_lowrank_gemm: the int8 low-rank plan in one call (map gathers, torch's int8 GEMMs, offsets,
//   the exact division by the denominator);
// - the compiled low-rank plans (kernels/lut_cpu_maps.cpp) and the LUT-derived gradients
//   (kernels/lut_cpu_backward.cpp), appended to this file.
// Sums are int32 when the caller proved that K * max|lut| < 2**31, int64 otherwise; GEMM results go
// into the caller's `out`, float64 (exact: |sum| < 2**53) or int64. Rows in parallel (torch's pool).
// Built by approxrun/ops/native.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <type_traits>
#include <unistd.h>
#include <vector>

int64_t l2_cache_bytes();

namespace {

template <typename Code>
inline int64_t byte_of(Code code) {
  if constexpr (std::is_floating_point_v<Code>) {  // an integer code held in a float
    return static_cast<int64_t>(static_cast<uint8_t>(static_cast<int64_t>(code)));
  } else {
    return static_cast<int64_t>(static_cast<uint8_t>(code));
  }
}

// The codes' bytes as uint8 (a cast to uint8 keeps an integer's byte; codes held in floats become
// integers first).
torch::Tensor code_bytes(const torch::Tensor& codes) {
  return (codes.is_floating_point() ? codes.to(torch::kInt64) : codes).to(torch::kUInt8);
}

// Calls fn with the typed data pointer of codes.
template <typename Fn>
void with_codes(const torch::Tensor& codes, const char* name, Fn&& fn) {
  switch (codes.scalar_type()) {
    case torch::kUInt8: fn(codes.data_ptr<uint8_t>()); break;
    case torch::kInt8: fn(codes.data_ptr<int8_t>()); break;
    case torch::kInt16: fn(codes.data_ptr<int16_t>()); break;
    case torch::kInt32: fn(codes.data_ptr<int32_t>()); break;
    case torch::kInt64: fn(codes.data_ptr<int64_t>()); break;
    case torch::kFloat32: fn(codes.data_ptr<float>()); break;
    case torch::kFloat64: fn(codes.data_ptr<double>()); break;
    default: TORCH_CHECK(false, name, ": codes expected (uint8, int8, int16, int32, int64, float32 or float64), got ",
                         codes.scalar_type());
  }
}

// Calls fn with the typed data pointer of a GEMM result: float64 or int64, contiguous [G, M, N].
template <typename Fn>
void with_output(const torch::Tensor& out, const char* name, Fn&& fn) {
  TORCH_CHECK(out.is_contiguous() && out.device().is_cpu(), name, ": a contiguous CPU out expected");
  switch (out.scalar_type()) {
    case torch::kFloat64: fn(out.data_ptr<double>()); break;
    case torch::kInt64: fn(out.data_ptr<int64_t>()); break;
    default: TORCH_CHECK(false, name, ": a float64 or int64 out expected, got ", out.scalar_type());
  }
}

// ---------------------------------------------------------------- one LUT read per product

constexpr int64_t kTileN = 512;  // accumulators kept per output row tile

template <typename Sum, typename Code, typename Out>
void gemm_rows(const Code* a, const uint8_t* b, const int32_t* lut, Out* out, int64_t k_size,
               int64_t n_size, int64_t row_begin, int64_t row_end) {
  Sum sums[kTileN];
  for (int64_t row = row_begin; row < row_end; ++row) {
    const Code* a_row = a + row * k_size;
    for (int64_t n0 = 0; n0 < n_size; n0 += kTileN) {
      const int64_t width = std::min(kTileN, n_size - n0);
      std::fill(sums, sums + width, Sum(0));
      for (int64_t k = 0; k < k_size; ++k) {
        const int32_t* lut_row = lut + byte_of(a_row[k]) * 256;
        const uint8_t* b_row = b + k * n_size + n0;
        int64_t j = 0;
#if defined(__AVX2__)
        if constexpr (std::is_same_v<Sum, int32_t>) {  // eight lookups per gather instruction
          for (; j + 8 <= width; j += 8) {
            const __m256i index = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b_row + j)));
            __m256i* lanes = reinterpret_cast<__m256i*>(sums + j);
            _mm256_storeu_si256(lanes, _mm256_add_epi32(_mm256_loadu_si256(lanes),
                                                        _mm256_i32gather_epi32(lut_row, index, 4)));
          }
        }
#endif
        for (; j < width; ++j) sums[j] += lut_row[b_row[j]];
      }
      Out* out_row = out + row * n_size + n0;
      for (int64_t j = 0; j < width; ++j) out_row[j] = static_cast<Out>(sums[j]);
    }
  }
}

// ---------------------------------------------------------------- tables of products, row adds

constexpr int64_t kTileColumns = 16;  // table columns per task: a row's sums are two 8-lane vectors
// (a standalone row loop over tables of the same size, AMD EPYC AVX2, one thread: 13.3 products/ns
// at 16 columns, 5.9-10.5 at 64 or 32, 9.5 at 8)

// Eight accumulators of a sum type, as one vector (GCC/Clang vector extensions: SSE, AVX2 or
// AVX-512 code by the compiler's target, no intrinsics).
typedef int32_t Lanes32 __attribute__((vector_size(32)));
typedef int64_t Lanes64 __attribute__((vector_size(64)));
template <typename Sum> struct Lanes;
template <> struct Lanes<int32_t> { using type = Lanes32; };
template <> struct Lanes<int64_t> { using type = Lanes64; };

template <typename Sum>
inline typename Lanes<Sum>::type load_lanes(const int32_t* source) {
  Lanes32 words;
  std::memcpy(&words, source, sizeof(words));
  return __builtin_convertvector(words, typename Lanes<Sum>::type);
}

// A buffer of n words starting on a 64-byte line (a table row of 8 or 16 words never splits a
// line: measured with a 16-byte aligned one, (73728, 25, 6): 0.66 or 0.85 ms by where it landed).
template <typename Word>
Word* aligned_words(std::vector<Word>& store, int64_t n) {
  store.resize(n + 64 / sizeof(Word));
  const auto address = reinterpret_cast<uintptr_t>(store.data());
  return reinterpret_cast<Word*>((address + 63) & ~uintptr_t(63));
}

#if defined(__AVX2__)
// The 8x8 transpose of eight rows of eight int32 words, in place.
inline void transpose8(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}
#endif

// Tables T[kk][v][j] = lut[v][b_row_kk[j]] for kk < depth, v < 256, j < width (8 or 16; the row of
// b for kk at b + kk * n_size, its first `columns` entries read, the rest of the width zero): each
// table column is a column of the LUT, so 8 of them are read as rows of its transposed image
// (lut_columns[w][v] = lut[v][w]) and written by 8x8 transposes (measured 0.15 ns per entry against
// 0.59 for one scalar read each, AVX2).
void build_tables(const uint8_t* b, int64_t n_size, int64_t depth, int64_t columns, int64_t width,
                  const int32_t* lut_columns, int32_t* table) {
  static const int32_t zeros[256] = {};
  for (int64_t kk = 0; kk < depth; ++kk, b += n_size, table += 256 * width) {
    for (int64_t j0 = 0; j0 < width; j0 += 8) {
      const int32_t* source[8];
      for (int j = 0; j < 8; ++j) source[j] = j0 + j < columns ? lut_columns + b[j0 + j] * 256 : zeros;
#if defined(__AVX2__)
      for (int v0 = 0; v0 < 256; v0 += 8) {
        __m256i r[8];
        for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source[j] + v0));
        transpose8(r);
        for (int i = 0; i < 8; ++i) _mm256_store_si256(reinterpret_cast<__m256i*>(table + (v0 + i) * width + j0), r[i]);
      }
#else
      for (int v = 0; v < 256; ++v) {
        for (int j = 0; j < 8; ++j) table[v * width + j0 + j] = source[j][v];
      }
#endif
    }
  }
}

// Pair tables (see add_pair_rows) T[kk][v] of 8 words for 16 columns (the first `columns` of the
// row of b for kk, the rest any value: their sums are dropped), from the same transposes.
void build_pair_tables(const uint8_t* b, int64_t n_size, int64_t depth, int64_t columns, const int32_t* lut_columns,
                       int32_t low, uint32_t* table) {
  static const int32_t zeros[256] = {};
  for (int64_t kk = 0; kk < depth; ++kk, b += n_size, table += 256 * 8) {
    const int32_t* source[16];
    for (int j = 0; j < 16; ++j) source[j] = j < columns ? lut_columns + b[j] * 256 : zeros;
#if defined(__AVX2__)
    const __m256i lows = _mm256_set1_epi32(low);
    for (int v0 = 0; v0 < 256; v0 += 8) {
      __m256i first[8], second[8];
      for (int j = 0; j < 8; ++j) {
        first[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source[j] + v0));
        second[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source[j + 8] + v0));
      }
      transpose8(first);
      transpose8(second);
      for (int i = 0; i < 8; ++i) {
        const __m256i words = _mm256_or_si256(_mm256_sub_epi32(first[i], lows),
                                              _mm256_slli_epi32(_mm256_sub_epi32(second[i], lows), 16));
        _mm256_store_si256(reinterpret_cast<__m256i*>(table + (v0 + i) * 8), words);
      }
    }
#else
    for (int v = 0; v < 256; ++v) {
      for (int j = 0; j < 8; ++j) {
        table[v * 8 + j] =
            static_cast<uint32_t>(source[j][v] - low) | static_cast<uint32_t>(source[j + 8][v] - low) << 16;
      }
    }
#endif
  }
}

// out[j] = the j-th sum of acc (Vectors vectors of 8) for j < min(8 * Vectors, columns): with AVX2
// and int32 sums, four at a time converted in registers (the tail one by one, no masked stores: slow
// on AMD), else one by one (measured against one by one, (73728, 1, 6), one thread: 0.61 vs 0.82 ms).
template <int Vectors, typename Sum, typename Out>
inline void store_sums(const typename Lanes<Sum>::type* acc, Out* out, int64_t columns, int64_t offset) {
  const int64_t count = std::min<int64_t>(8 * Vectors, columns);
  int64_t j = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<Sum, int32_t>) {
    for (; j + 4 <= count; j += 4) {
      __m128i quad;
      std::memcpy(&quad, reinterpret_cast<const int32_t*>(acc) + j, sizeof(quad));
      if constexpr (std::is_same_v<Out, double>) {
        _mm256_storeu_pd(out + j, _mm256_add_pd(_mm256_cvtepi32_pd(quad), _mm256_set1_pd(static_cast<double>(offset))));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j),
                            _mm256_add_epi64(_mm256_cvtepi32_epi64(quad), _mm256_set1_epi64x(offset)));
      }
    }
  }
#endif
  Sum lanes[8 * Vectors];
  std::memcpy(lanes, acc, sizeof(lanes));
  for (; j < count; ++j) out[j] = static_cast<Out>(static_cast<int64_t>(lanes[j]) + offset);
}

// For each of Rows rows r (codes + r * stride): sums[r][j] (+)= sum_kk
// T[kk][byte(codes[r * stride + kk])][j] for j < 8 * Vectors, the sums kept in registers; the
// tables are rows of exactly 8 * Vectors words, so an address is a shift and an add. Several rows at a time
// share the loop over k and keep independent adds in flight. On the last tile of k (`out` not null)
// the first `columns` sums go to out instead (the padding lanes are dropped). Plain pointer
// arguments: a struct of them built per row would be stored and reloaded in one wider load, which
// stalls store forwarding on every row.
template <int Rows, int Vectors, typename Sum, typename Code, typename Out>
inline void add_table_rows(const Code* codes, int64_t stride, const int32_t* table, int64_t depth, Sum* sums,
                           Out* out, int64_t out_stride, int64_t columns, bool first) {
  using Acc = typename Lanes<Sum>::type;
  constexpr int64_t kWidth = 8 * Vectors;
  Acc acc[Rows][Vectors];
  for (int r = 0; r < Rows; ++r) {
    for (int v = 0; v < Vectors; ++v) {
      if (first) {
        acc[r][v] = Acc{};
      } else {
        std::memcpy(&acc[r][v], sums + r * kWidth + 8 * v, sizeof(Acc));
      }
    }
  }
  for (int64_t kk = 0; kk < depth; ++kk, table += 256 * kWidth) {
    for (int r = 0; r < Rows; ++r) {
      const int32_t* t_row = table + byte_of(codes[r * stride + kk]) * kWidth;
      for (int v = 0; v < Vectors; ++v) acc[r][v] += load_lanes<Sum>(t_row + 8 * v);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    if (out == nullptr) {
      for (int v = 0; v < Vectors; ++v) std::memcpy(sums + r * kWidth + 8 * v, &acc[r][v], sizeof(Acc));
      continue;
    }
    store_sums<Vectors, Sum>(acc[r], out + r * out_stride, columns, 0);
  }
}

// Pair tables: 16 columns of a LUT whose values span less than 2**16 as offset values u = lut - low
// in the halves of 8 words, word j = u[column j] | u[column j + 8] << 16 (half an int32 table's
// bytes). A row adds each word to `all` and its high half to `high`; then the low halves' sums are
// all - (high << 16), exact modulo 2**32 whatever carries crossed the halves (the caller keeps
// K * 65535 < 2**31), and each sum is offset by K * low when stored.
typedef uint32_t Words __attribute__((vector_size(32)));

template <int Rows, typename Code, typename Out>
inline void add_pair_rows(const Code* codes, int64_t stride, const uint32_t* table, int64_t depth, uint32_t* sums,
                          Out* out, int64_t out_stride, int64_t columns, bool first, int64_t offset) {
  Words all[Rows], high[Rows];
  for (int r = 0; r < Rows; ++r) {
    if (first) {
      all[r] = Words{};
      high[r] = Words{};
    } else {
      std::memcpy(&all[r], sums + r * 16, sizeof(Words));
      std::memcpy(&high[r], sums + r * 16 + 8, sizeof(Words));
    }
  }
  for (int64_t kk = 0; kk < depth; ++kk, table += 256 * 8) {
    for (int r = 0; r < Rows; ++r) {
      Words word;
      std::memcpy(&word, table + byte_of(codes[r * stride + kk]) * 8, sizeof(word));
      all[r] += word;
      high[r] += word >> 16;
    }
  }
  for (int r = 0; r < Rows; ++r) {
    if (out == nullptr) {
      std::memcpy(sums + r * 16, &all[r], sizeof(Words));
      std::memcpy(sums + r * 16 + 8, &high[r], sizeof(Words));
      continue;
    }
    Lanes32 halves[2];
    const Words low = all[r] - (high[r] << 16);
    std::memcpy(&halves[0], &low, sizeof(Words));
    std::memcpy(&halves[1], &high[r], sizeof(Words));
    store_sums<2, int32_t>(halves, out + r * out_stride, columns, offset);
  }
}

// Rows [0, rows) of a task (codes [rows, depth] at a row stride) against one tile of k: tables of
// 8 * Vectors words per row; kTableRows / Vectors rows at a time (the rest one by one: measured, one row at a
// time against four, (73728, 25, 6): AVX-512 0.58 -> 0.46 ms, AVX2 0.85 -> 0.53 ms; eight ran like
// four). `sums` [rows, 8 * Vectors] is null when there is a single tile of k (nothing carried), `out`
// (the task's first row and column) null before the last tile of k.
constexpr int kTableRows = 4;
template <int Vectors, typename Sum, typename Code, typename Out>
void add_table_block(const Code* codes, int64_t stride, int64_t rows, const int32_t* table, int64_t depth, Sum* sums,
                     Out* out, int64_t n_size, int64_t columns, bool first) {
  constexpr int kRows = std::max(1, kTableRows / Vectors);
  const auto add = [&](int64_t m, auto count) {
    add_table_rows<decltype(count)::value, Vectors>(codes + m * stride, stride, table, depth,
                                                    sums ? sums + m * 8 * Vectors : nullptr,
                                                    out ? out + m * n_size : nullptr, n_size, columns, first);
  };
  int64_t m = 0;
  for (; m + kRows <= rows; m += kRows) add(m, std::integral_constant<int, kRows>{});
  for (; m < rows; ++m) add(m, std::integral_constant<int, 1>{});
}

// The same over pair tables (16 columns; see add_pair_rows), two rows at a time.
constexpr int kPairRows = 2;
template <typename Code, typename Out>
void add_pair_block(const Code* codes, int64_t stride, int64_t rows, const uint32_t* table, int64_t depth,
                    uint32_t* sums, Out* out, int64_t n_size, int64_t columns, bool first, int64_t offset) {
  const auto add = [&](int64_t m, auto count) {
    add_pair_rows<decltype(count)::value>(codes + m * stride, stride, table, depth, sums ? sums + m * 16 : nullptr,
                                          out ? out + m * n_size : nullptr, n_size, columns, first, offset);
  };
  constexpr int kRows = kPairRows;
  int64_t m = 0;
  for (; m + kRows <= rows; m += kRows) add(m, std::integral_constant<int, kRows>{});
  for (; m < rows; ++m) add(m, std::integral_constant<int, 1>{});
}

// The bytes of codes a [M, K] tile of k by tile of k: the tile at k0 (depth d) holds rows of d bytes
// at packed + k0 * M, so that a tile's pass over the rows reads one small contiguous block (read in
// place at the rows' own stride, every few rows a new page: (4096, 576, 16), one thread, 7.0 ms
// against 3.4 packed). One tile of k reads the rows in place, in order (packing them first cost
// (73728, 25, 6) a third more).
template <typename Code>
void pack_code_tiles(const Code* a, int64_t m_size, int64_t k_size, int64_t tile_k, uint8_t* packed) {
  at::parallel_for(0, m_size, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t k0 = 0; k0 < k_size; k0 += tile_k) {
        const int64_t depth = std::min(tile_k, k_size - k0);
        const Code* row = a + m * k_size + k0;
        uint8_t* packed_row = packed + k0 * m_size + m * depth;
        for (int64_t kk = 0; kk < depth; ++kk) packed_row[kk] = static_cast<uint8_t>(byte_of(row[kk]));
      }
    }
  });
}

// Tasks of kTileColumns columns and a block of rows each, in parallel; a task builds its own tables
// per tile of k (its core's L2 holds them) and adds a table row per k to each of its rows' sums,
// which carry across tiles of k. Row blocks split a tile only as far as the threads need: each
// block builds the tile's tables again. The tables of all of K make one tile when they fit in half
// the L2 (carrying sums costs more than it saves there: (73728, 25, 6) ran 2.4x slower in two
// tiles), else tiles of `budget` bytes (measured per machine: on a 2 MiB L2, pair tables, an
// eighth or a quarter of it ran 5-20% faster than half at the large core shapes).
template <typename Sum, typename Code, typename Out>
void table_gemm(const Code* a, const uint8_t* b, const int32_t* lut_columns, Out* out, int64_t m_size,
                int64_t k_size, int64_t n_size, const int32_t* pair_low, int64_t budget) {
  const int64_t tiles = (n_size + kTileColumns - 1) / kTileColumns, threads = at::get_num_threads();
  const int64_t widest = n_size > 8 && pair_low == nullptr ? 16 : 8;  // words per table row
  const int64_t k_bytes = 256 * 4 * widest;
  const int64_t tile_k = k_size * k_bytes <= l2_cache_bytes() / 2 ? k_size
                                                                  : std::max<int64_t>(1, budget / k_bytes);
  int64_t row_blocks = (threads + tiles - 1) / tiles;  // the fewest giving every thread a task and even
  while ((tiles * row_blocks) % threads != 0 && tiles * row_blocks < 4 * threads) ++row_blocks;  // shares
  row_blocks = std::max<int64_t>(1, std::min(row_blocks, m_size));
  const int64_t block_rows = (m_size + row_blocks - 1) / row_blocks;
  const bool several_tiles = tile_k < k_size;  // sums carried across tiles of k, codes packed per tile
  std::vector<uint8_t> packed(several_tiles ? m_size * k_size : 0);
  if (several_tiles) pack_code_tiles(a, m_size, k_size, tile_k, packed.data());
  at::parallel_for(0, tiles * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> table_store;
    std::vector<Sum> sums_store;
    std::vector<uint32_t> pair_sums_store;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = task / row_blocks * kTileColumns, m0 = task % row_blocks * block_rows;
      const int64_t rows = std::min(block_rows, m_size - m0);
      if (rows <= 0) continue;
      const int64_t columns = std::min(kTileColumns, n_size - n0), width = columns > 8 ? 16 : 8;
      const bool pairs = width == 16 && pair_low != nullptr;
      int32_t* table = aligned_words(table_store, tile_k * 256 * (pairs ? 8 : width));
      if (pairs) {
        uint32_t* pair_table = reinterpret_cast<uint32_t*>(table);
        uint32_t* sums = several_tiles ? aligned_words(pair_sums_store, rows * 16) : nullptr;
        for (int64_t k0 = 0; k0 < k_size; k0 += tile_k) {
          const int64_t depth = std::min(tile_k, k_size - k0);
          build_pair_tables(b + k0 * n_size + n0, n_size, depth, columns, lut_columns, *pair_low, pair_table);
          Out* out_rows = k0 + depth == k_size ? out + m0 * n_size + n0 : nullptr;
          const int64_t offset = k_size * static_cast<int64_t>(*pair_low);
          if (!several_tiles) {
            add_pair_block(a + m0 * k_size, k_size, rows, pair_table, depth, sums, out_rows, n_size, columns, true,
                           offset);
          } else {
            add_pair_block(packed.data() + k0 * m_size + m0 * depth, depth, rows, pair_table, depth, sums, out_rows,
                           n_size, columns, k0 == 0, offset);
          }
        }
        continue;
      }
      Sum* sums = several_tiles ? aligned_words(sums_store, rows * width) : nullptr;
      for (int64_t k0 = 0; k0 < k_size; k0 += tile_k) {
        const int64_t depth = std::min(tile_k, k_size - k0);
        build_tables(b + k0 * n_size + n0, n_size, depth, columns, width, lut_columns, table);
        const auto add = [&](auto vectors) {
          Out* out_rows = k0 + depth == k_size ? out + m0 * n_size + n0 : nullptr;
          if (!several_tiles) {
            add_table_block<decltype(vectors)::value>(a + m0 * k_size, k_size, rows, table, depth, sums, out_rows,
                                                      n_size, columns, true);
          } else {
            add_table_block<decltype(vectors)::value>(packed.data() + k0 * m_size + m0 * depth, depth, rows, table,
                                                      depth, sums, out_rows, n_size, columns, k0 == 0);
          }
        };
        if (width == 16) {
          add(std::integral_constant<int, 2>{});
        } else {
          add(std::integral_constant<int, 1>{});
        }
      }
    }
  });
}

// ---------------------------------------------------------------- entry points

// Every GEMM entry point's operands: codes a [G, M, K] and b [G, K, N] on the CPU, out [G, M, N], or
// one group without its dimension (a [M, K], b [K, N], out [M, N]: viewed here with it, so that a
// caller's 2-D product costs no views in Python).
void as_groups(const char* name, torch::Tensor& a, torch::Tensor& b, torch::Tensor& out) {
  TORCH_CHECK(a.dim() == b.dim() && a.dim() == out.dim() && (a.dim() == 2 || a.dim() == 3),
              name, ": a [G, M, K], b [G, K, N] and out [G, M, N] (or all three without G) expected");
  if (a.dim() == 2) {
    a = a.unsqueeze(0);
    b = b.unsqueeze(0);
    out = out.unsqueeze(0);
  }
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(1), name, ": a [G, M, K] and b [G, K, N] expected");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), name, ": CPU tensors expected");
  TORCH_CHECK(out.size(0) == a.size(0) && out.size(1) == a.size(1) && out.size(2) == b.size(2),
              name, ": out [G, M, N] expected");
}

// The LUT GEMMs' operands (see as_groups), and a contiguous int32 [256, 256] LUT.
void check_operands(const char* name, torch::Tensor& a, torch::Tensor& b, const torch::Tensor& lut,
                    torch::Tensor& out) {
  TORCH_CHECK(lut.dtype() == torch::kInt32 && lut.numel() == 256 * 256 && lut.is_contiguous(),
              name, ": a contiguous int32 [256, 256] LUT expected");
  as_groups(name, a, b, out);
}

}  // namespace

// The L2 cache of a core, read from the machine (1 MiB where it says none): the tables strategy's
// budget for one task's tables is a measured fraction of it (see table_gemm).
int64_t l2_cache_bytes() {
  long l2 = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
  l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
  return l2 > 0 ? static_cast<int64_t>(l2) : int64_t(1) << 20;
}

// Both GEMM entry points write out [G, M, N] (or [M, N], see as_groups; float64 or int64, contiguous) and
// return it.
// lut_gemm_table reads the LUT's transposed image, lut_columns[w][v] = lut[v][w] (its tables' columns).
torch::Tensor lut_gemm_table(torch::Tensor a, torch::Tensor b, torch::Tensor lut_columns, bool wide_sums,
                             c10::optional<int64_t> pair_low, int64_t table_bytes, torch::Tensor out) {
  const torch::Tensor result = out;
  check_operands("lut_gemm_table", a, b, lut_columns, out);
  a = a.contiguous();
  b = code_bytes(b).contiguous();
  const int64_t groups = a.size(0), m_size = a.size(1), k_size = a.size(2), n_size = b.size(2);
  TORCH_CHECK(!pair_low || k_size < 32768, "lut_gemm_table: pair tables take K < 32768");
  TORCH_CHECK(table_bytes > 0, "lut_gemm_table: a positive table budget expected");
  const int32_t low = pair_low ? static_cast<int32_t>(*pair_low) : 0;
  const int32_t* pairs = pair_low ? &low : nullptr;
  with_codes(a, "lut_gemm_table", [&](auto* a_ptr) {
    with_output(out, "lut_gemm_table", [&](auto* out_ptr) {
      for (int64_t g = 0; g < groups; ++g) {
        const auto* a_g = a_ptr + g * m_size * k_size;
        const uint8_t* b_g = b.data_ptr<uint8_t>() + g * k_size * n_size;
        auto* out_g = out_ptr + g * m_size * n_size;
        if (wide_sums) {
          table_gemm<int64_t>(a_g, b_g, lut_columns.data_ptr<int32_t>(), out_g, m_size, k_size, n_size, pairs,
                              table_bytes);
        } else {
          table_gemm<int32_t>(a_g, b_g, lut_columns.data_ptr<int32_t>(), out_g, m_size, k_size, n_size, pairs,
                              table_bytes);
        }
      }
    });
  });
  return result;
}

torch::Tensor lut_gemm(torch::Tensor a, torch::Tensor b, torch::Tensor lut, bool wide_sums, torch::Tensor out) {
  const torch::Tensor result = out;
  check_operands("lut_gemm", a, b, lut, out);
  a = a.contiguous();
  b = code_bytes(b).contiguous();
  const int64_t groups = a.size(0), m_size = a.size(1), k_size = a.size(2), n_size = b.size(2);
  const uint8_t* b_ptr = b.data_ptr<uint8_t>();
  const int32_t* lut_ptr = lut.data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k_size * n_size));
  with_codes(a, "lut_gemm", [&](auto* a_ptr) {
    with_output(out, "lut_gemm", [&](auto* out_ptr) {
      at::parallel_for(0, groups * m_size, grain, [&](int64_t begin, int64_t end) {
        while (begin < end) {  // rows of one group at a time
          const int64_t g = begin / m_size, row_end = std::min(end, (g + 1) * m_size);
          const auto* a_g = a_ptr + g * m_size * k_size;
          const uint8_t* b_g = b_ptr + g * k_size * n_size;
          auto* out_g = out_ptr + g * m_size * n_size;
          if (wide_sums) {
            gemm_rows<int64_t>(a_g, b_g, lut_ptr, out_g, k_size, n_size, begin - g * m_size, row_end - g * m_size);
          } else {
            gemm_rows<int32_t>(a_g, b_g, lut_ptr, out_g, k_size, n_size, begin - g * m_size, row_end - g * m_size);
          }
          begin = row_end;
        }
      });
    });
  });
  return result;
}

// out (contiguous, codes.numel() rows) = table [256, ...] (contiguous, rows of 4-byte words) rows
// at the codes' bytes; returns out.
torch::Tensor gather_rows(torch::Tensor codes, torch::Tensor table, torch::Tensor out) {
  TORCH_CHECK(codes.is_contiguous() && table.is_contiguous() && out.is_contiguous(),
              "gather_rows: contiguous codes, table and out expected");
  TORCH_CHECK(codes.device().is_cpu() && table.device().is_cpu() && out.device().is_cpu(),
              "gather_rows: CPU tensors expected");
  TORCH_CHECK(table.dim() >= 1 && table.size(0) == 256 && out.dtype() == table.dtype(),
              "gather_rows: a table [256, ...] and an out of its dtype expected");
  const int64_t row_bytes = table.numel() / 256 * table.element_size();
  TORCH_CHECK(row_bytes % 4 == 0 && out.numel() == codes.numel() * (table.numel() / 256),
              "gather_rows: rows of 4-byte words and an out of codes.numel() rows expected");
  const int64_t words = row_bytes / 4;
  const auto* rows = static_cast<const uint8_t*>(table.data_ptr());
  auto* dst = static_cast<uint8_t*>(out.data_ptr());
  with_codes(codes, "gather_rows", [&](auto* code) {
    at::parallel_for(0, codes.numel(), std::max<int64_t>(1, 16384 / words), [&](int64_t begin, int64_t end) {
      switch (words) {  // fixed-size copies compile to plain moves
        case 1: {  // plain word loads: the compiler may use vector gathers
          const auto* table_words = static_cast<const int32_t*>(table.data_ptr());
          auto* out_words = static_cast<int32_t*>(out.data_ptr());
          for (int64_t i = begin; i < end; ++i) out_words[i] = table_words[byte_of(code[i])];
          break;
        }
        case 2: for (int64_t i = begin; i < end; ++i) std::memcpy(dst + i * 8, rows + byte_of(code[i]) * 8, 8); break;
        case 4: for (int64_t i = begin; i < end; ++i) std::memcpy(dst + i * 16, rows + byte_of(code[i]) * 16, 16); break;
        default:
          for (int64_t i = begin; i < end; ++i) std::memcpy(dst + i * row_bytes, rows + byte_of(code[i]) * row_bytes, row_bytes);
      }
    });
  });
  return out;
}

namespace {

// Writes the window rows of x [B, C, H, W] into out [G, B*Ho*Wo, C/G*kh*kw] (see unfold_rows); tasks
// are (group, image, output row), each a block of Wo rows small enough to stay in L1.
template <typename In, typename Out>
void unfold_into(const In* x, Out* out, int64_t batch, int64_t channels, int64_t height, int64_t width,
                 int64_t groups, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw,
                 int64_t ho_size, int64_t wo_size) {
  const int64_t per_group = channels / groups, k_size = per_group * kh * kw;
  const int64_t group_rows = batch * ho_size * wo_size;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, wo_size * k_size));
  at::parallel_for(0, groups * batch * ho_size, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / (batch * ho_size), image = task / ho_size % batch, oh = task % ho_size;
      Out* rows = out + (g * group_rows + (image * ho_size + oh) * wo_size) * k_size;
      for (int64_t c = 0; c < per_group; ++c) {
        const In* plane = x + ((image * channels + g * per_group + c) * height + oh * sh) * width;
        for (int64_t i = 0; i < kh; ++i) {
          const In* line = plane + i * dh * width;
          Out* column = rows + (c * kh + i) * kw;
          for (int64_t ow = 0; ow < wo_size; ++ow) {
            const In* source = line + ow * sw;
            Out* target = column + ow * k_size;
            for (int64_t j = 0; j < kw; ++j) target[j] = static_cast<Out>(source[j * dw]);
          }
        }
      }
    }
  });
}

}  // namespace

// im2col: the window rows of a padded input x [B, C, H, W] (contiguous codes of any read dtype, or
// packed map words) written into out [G, B*Ho*Wo, C/G*kh*kw] (contiguous, int32 or int64; K in
// conv2d's weight order: channel, kernel row, kernel column); returns out.
torch::Tensor unfold_rows(torch::Tensor x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw,
                          int64_t groups, torch::Tensor out) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.device().is_cpu(), "unfold_rows: contiguous CPU x [B, C, H, W] expected");
  TORCH_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && dh >= 1 && dw >= 1 && groups >= 1 && x.size(1) % groups == 0,
              "unfold_rows: positive kernel, stride, dilation and groups dividing the channels expected");
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t ho_size = (height - dh * (kh - 1) - 1) / sh + 1, wo_size = (width - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(height >= dh * (kh - 1) + 1 && width >= dw * (kw - 1) + 1, "unfold_rows: input smaller than the kernel");
  TORCH_CHECK(out.is_contiguous() && out.device().is_cpu() &&
              out.numel() == groups * batch * ho_size * wo_size * (channels / groups) * kh * kw,
              "unfold_rows: a contiguous CPU out of G * B*Ho*Wo * C/G*kh*kw elements expected");
  with_codes(x, "unfold_rows", [&](auto* source) {
    auto unfold = [&](auto* target) {
      unfold_into(source, target, batch, channels, height, width, groups, kh, kw, sh, sw, dh, dw, ho_size, wo_size);
    };
    switch (out.scalar_type()) {
      case torch::kInt32: unfold(out.data_ptr<int32_t>()); break;
      case torch::kInt64: unfold(out.data_ptr<int64_t>()); break;
      default: TORCH_CHECK(false, "unfold_rows: an int32 or int64 out expected, got ", out.scalar_type());
    }
  });
  return out;
}

namespace {

// A 2-D operand torch's int8 GEMM reads right: row-major, or exactly column-major with both sizes
// above 1 (it misreads other strides, including those a size-1 dimension may carry).
torch::Tensor dense(const torch::Tensor& t) {
  if (t.size(0) > 1 && t.size(1) > 1 && t.stride(0) == 1 && t.stride(1) == t.size(0)) return t;
  if (t.stride(1) == 1 && t.stride(0) == t.size(1)) return t;  // row-major, canonical strides
  return torch::empty(t.sizes(), t.options()).copy_(t);  // a fresh tensor has canonical strides
}

// int32 GEMMs of x [R, K * width] and y [K * width, N] over chunks of `chunk` K columns, each
// added (as int64) to total [R, N].
void add_int8_products(const torch::Tensor& x, const torch::Tensor& y, int64_t chunk, int64_t width,
                       torch::Tensor& total) {
  const int64_t k_size = x.size(1) / width;
  for (int64_t k0 = 0; k0 < k_size; k0 += chunk) {
    const int64_t k1 = std::min(k_size, k0 + chunk);
    total.add_(at::_int_mm(dense(x.slice(1, k0 * width, k1 * width)), dense(y.slice(0, k0 * width, k1 * width))));
  }
}

// The B side of the int8 plan from codes b [K, N] (any strides, read in place): y [N, K * width]
// (row n holds the words of b[:, n]) and offsets[n] = sum_k offset[byte(b[k][n])].
template <typename Word, typename Code>
void int8_columns(const Code* b, int64_t k_size, int64_t n_size, int64_t stride_k, int64_t stride_n,
                  const Word* words, const int64_t* offset, Word* y, int64_t* offsets) {
  at::parallel_for(0, n_size, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, k_size)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t total = 0;
      for (int64_t k = 0; k < k_size; ++k) {
        const int64_t index = byte_of(b[k * stride_k + n * stride_n]);
        y[n * k_size + k] = words[index];
        total += offset[index];
      }
      offsets[n] = total;
    }
  });
}

// out[r][n] = (sums[r][n] + code_scale * code_sums[r][n] + offsets[n]) / denominator (code_sums may
// be null). The quotient is an exact integer below 2**53 (the caller's proof), so the correctly
// rounded float64 division gives it exactly: vector divisions instead of a 64-bit integer division
// (tens of cycles) per element.
template <typename Sum, typename Out>
void finish_rows(const Sum* sums, const Sum* code_sums, int64_t code_scale, const int64_t* offsets,
                 int64_t denominator, Out* out, int64_t rows, int64_t n_size) {
  const double divisor = static_cast<double>(denominator);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n_size)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t n = 0; n < n_size; ++n) {
        const int64_t i = r * n_size + n;
        int64_t total = static_cast<int64_t>(sums[i]) + offsets[n];
        if (code_sums != nullptr) total += code_scale * static_cast<int64_t>(code_sums[i]);
        out[i] = static_cast<Out>(static_cast<double>(total) / divisor);
      }
    }
  });
}

}  // namespace

// The int8 low-rank plan of codes a [G, M, K], b [G, K, N] (see approxrun/ops/lowrank/tables.py,
// Int8Maps): denominator * out = sum_k sum_i x_i(a) y_i(b) + offset(b) + code_scale * a' b', with the
// maps packed one word per code (x_words, y_words: [256] int32 for width 4, int64 for width 8),
// int8 GEMMs over `chunk` K columns (int32 sums proved below 2**31 by the caller), written into out
// [G, M, N] (float64 or int64) and returned. Rows go in blocks of `block_rows` through `scratch`
// (int8, at least block_rows * K * width bytes).
torch::Tensor int8_lowrank_gemm(torch::Tensor a, torch::Tensor b, torch::Tensor x_words, torch::Tensor y_words,
                                torch::Tensor offset, int64_t chunk, int64_t code_scale, int64_t denominator,
                                int64_t block_rows, torch::Tensor scratch, torch::Tensor out) {
  const torch::Tensor result = out;
  as_groups("int8_lowrank_gemm", a, b, out);
  TORCH_CHECK(x_words.numel() == 256 && y_words.dtype() == x_words.dtype() && offset.dtype() == torch::kInt64 &&
              scratch.dtype() == torch::kInt8 && chunk >= 1 && denominator >= 1 && block_rows >= 1,
              "int8_lowrank_gemm: maps of 256 words, int64 offsets, int8 scratch expected");
  const int64_t groups = a.size(0), m_size = a.size(1), k_size = a.size(2), n_size = b.size(2);
  const int64_t width = x_words.element_size();
  TORCH_CHECK(width == 4 || width == 8, "int8_lowrank_gemm: maps of 4 or 8 int8 columns expected");
  TORCH_CHECK(scratch.numel() >= std::min(block_rows, m_size) * k_size * width, "int8_lowrank_gemm: scratch too small");
  a = a.contiguous();
  auto y = torch::empty({n_size, k_size * width}, torch::kInt8);  // y[n][(k, i)] = y_i(b[k][n])
  auto offsets = torch::empty({n_size}, torch::kInt64);
  for (int64_t g = 0; g < groups; ++g) {
    const auto b_g = b[g];
    with_codes(b_g, "int8_lowrank_gemm", [&](auto* codes) {
      auto gather = [&](auto word) {  // the packed word: int32 for width 4, int64 for width 8
        using Word = decltype(word);
        int8_columns(codes, k_size, n_size, b_g.stride(0), b_g.stride(1), y_words.data_ptr<Word>(),
                     offset.data_ptr<int64_t>(), y.view(y_words.scalar_type()).data_ptr<Word>(),
                     offsets.data_ptr<int64_t>());
      };
      width == 4 ? gather(int32_t{}) : gather(int64_t{});
    });
    auto columns = y.t();  // [K * width, N], column-major
    torch::Tensor b_bytes;
    if (code_scale) b_bytes = code_bytes(b_g).view(torch::kInt8);  // [K, N], the bytes read as int8
    for (int64_t m0 = 0; m0 < m_size; m0 += block_rows) {
      const int64_t rows = std::min(block_rows, m_size - m0);
      auto codes_a = a[g].slice(0, m0, m0 + rows);
      auto x = scratch.slice(0, 0, rows * k_size * width).view({rows, k_size * width});
      gather_rows(codes_a, x_words, x.view(x_words.scalar_type()));
      const int64_t first_row = g * m_size + m0;
      torch::Tensor a_bytes;
      if (code_scale) a_bytes = code_bytes(codes_a).view(torch::kInt8);  // [rows, K]
      auto finish = [&](const torch::Tensor& sums, const torch::Tensor& code_sums, auto sum) {
        using Sum = decltype(sum);
        with_output(out, "int8_lowrank_gemm", [&](auto* out_ptr) {
          finish_rows(sums.data_ptr<Sum>(), code_scale ? code_sums.data_ptr<Sum>() : nullptr, code_scale,
                      offsets.data_ptr<int64_t>(), denominator, out_ptr + first_row * n_size, rows, n_size);
        });
      };
      if (chunk >= k_size) {  // one int8 GEMM (two with the code GEMM), int32 sums
        auto sums = at::_int_mm(dense(x), dense(columns)).contiguous();
        torch::Tensor code_sums;
        if (code_scale) code_sums = at::_int_mm(dense(a_bytes), dense(b_bytes)).contiguous();
        finish(sums, code_sums, int32_t{});
      } else {  // int32 GEMMs over chunks of K, summed in int64
        auto sums = torch::zeros({rows, n_size}, torch::kInt64);
        add_int8_products(x, columns, chunk, width, sums);
        torch::Tensor code_sums;
        if (code_scale) {
          code_sums = torch::zeros({rows, n_size}, torch::kInt64);
          add_int8_products(a_bytes, b_bytes, chunk, 1, code_sums);
        }
        finish(sums, code_sums, int64_t{});
      }
    }
  }
  return result;
}
