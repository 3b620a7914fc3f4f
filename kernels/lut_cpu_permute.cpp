
// The in-register strategy of the exact LUT GEMM (CPUs with AVX-512 VBMI), appended to lut_cpu.cpp.
//
// A LUT whose values span at most 2**16 is stored as two byte planes of u = lut - low: planes[v] =
// (u[v][:] & 255, u[v][:] >> 8), 512 bytes per LUT row. For one code a, its row's planes sit in eight
// registers, and one byte permute (vpermi2b) per plane and pair of registers looks up 64 weights'
// products at once: no gathers, no tables. The bytes are summed in 16-bit lanes over chunks of up to
// 256 k (255 * 256 < 2**16, no wrap), then sum = 256 * sum(high) + sum(low) + K * low in int32 lanes
// (the caller proves K * 2**16 < 2**31).
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
#include <immintrin.h>

namespace {

constexpr int64_t kPermuteChunk = 256;  // k summed in 16-bit lanes before widening

// The bytes of a 256-byte plane (four registers) at 64 byte indices: bit 7 picks the register pair.
inline __m512i lookup_plane(const __m512i* plane, __m512i idx, __mmask64 high_half) {
  return _mm512_mask_blend_epi8(high_half, _mm512_permutex2var_epi8(plane[0], idx, plane[1]),
                                _mm512_permutex2var_epi8(plane[2], idx, plane[3]));
}

// Rows [row_begin, row_end) of a GEMM whose left codes are a [rows, K] and whose right operand is
// the bytes b [K][stride], for the columns [c0, c0 + 64 * Groups) (valid up to `columns`); sums in
// registers. Lane j of an even/odd accumulator holds column 2j / 2j + 1 of its group (vpmaddubsw
// against (1, 0) / (0, 1) takes a plane's even / odd bytes into words). Element (r, c) goes to
// out[r * row_stride + c * column_stride].
template <int Groups, typename Code, typename Out>
void permute_rows(const Code* a, const uint8_t* b, const uint8_t* planes, int64_t k_size, int64_t stride,
                  int64_t c0, int64_t columns, int64_t offset, int64_t row_begin, int64_t row_end, Out* out,
                  int64_t row_stride, int64_t column_stride) {
  const __m512i even = _mm512_set1_epi16(1), odd = _mm512_set1_epi16(1 << 8);
  alignas(64) int32_t totals[64 * Groups];
  for (int64_t m = row_begin; m < row_end; ++m) {
    const Code* a_row = a + m * k_size;
    std::fill(totals, totals + 64 * Groups, 0);
    for (int64_t k0 = 0; k0 < k_size; k0 += kPermuteChunk) {
      const int64_t k1 = std::min(k_size, k0 + kPermuteChunk);
      __m512i low[Groups][2], high[Groups][2];
      for (int g = 0; g < Groups; ++g) low[g][0] = low[g][1] = high[g][0] = high[g][1] = _mm512_setzero_si512();
      for (int64_t k = k0; k < k1; ++k) {
        const __m512i* row = reinterpret_cast<const __m512i*>(planes + byte_of(a_row[k]) * 512);
        __m512i low_plane[4], high_plane[4];
        for (int i = 0; i < 4; ++i) {
          low_plane[i] = _mm512_load_si512(row + i);
          high_plane[i] = _mm512_load_si512(row + 4 + i);
        }
        const uint8_t* b_row = b + k * stride + c0;
        for (int g = 0; g < Groups; ++g) {
          const __m512i idx = _mm512_loadu_si512(b_row + 64 * g);
          const __mmask64 upper = _mm512_movepi8_mask(idx);
          const __m512i lows = lookup_plane(low_plane, idx, upper), highs = lookup_plane(high_plane, idx, upper);
          low[g][0] = _mm512_add_epi16(low[g][0], _mm512_maddubs_epi16(lows, even));
          low[g][1] = _mm512_add_epi16(low[g][1], _mm512_maddubs_epi16(lows, odd));
          high[g][0] = _mm512_add_epi16(high[g][0], _mm512_maddubs_epi16(highs, even));
          high[g][1] = _mm512_add_epi16(high[g][1], _mm512_maddubs_epi16(highs, odd));
        }
      }
      for (int g = 0; g < Groups; ++g) {
        for (int parity = 0; parity < 2; ++parity) {
          for (int half = 0; half < 2; ++half) {  // 16 words at a time, widened to int32
            const __m512i lo = _mm512_cvtepu16_epi32(half ? _mm512_extracti64x4_epi64(low[g][parity], 1)
                                                          : _mm512_castsi512_si256(low[g][parity]));
            const __m512i hi = _mm512_cvtepu16_epi32(half ? _mm512_extracti64x4_epi64(high[g][parity], 1)
                                                          : _mm512_castsi512_si256(high[g][parity]));
            int32_t* t = totals + 64 * g + 32 * parity + 16 * half;
            _mm512_store_si512(t, _mm512_add_epi32(_mm512_load_si512(t),
                                                   _mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo)));
          }
        }
      }
    }
    Out* out_row = out + m * row_stride + c0 * column_stride;
    const int64_t count = std::min<int64_t>(64 * Groups, columns - c0);
    for (int64_t j = 0; j < count; ++j) {  // column j of group g: lane j / 2 of the even / odd sums
      const int64_t g = j / 64, c = j % 64;
      out_row[j * column_stride] =
          static_cast<Out>(static_cast<int64_t>(totals[64 * g + 32 * (c % 2) + c / 2]) + offset);
    }
  }
}

// Column tiles of 64 * Wide (Wide groups of 64), then of 128 and 64, over the valid columns
// rounded up to 64 (b's rows of `stride` bytes hold at least that many).
template <int Wide, typename Code, typename Out>
void permute_tiles(const Code* a, const uint8_t* b, const uint8_t* planes, int64_t k_size, int64_t stride,
                   int64_t columns, int64_t offset, int64_t row_begin, int64_t row_end, Out* out,
                   int64_t row_stride, int64_t column_stride) {
  const int64_t extent = (columns + 63) / 64 * 64;
  int64_t c0 = 0;
  for (; extent - c0 >= 64 * Wide; c0 += 64 * Wide) {
    permute_rows<Wide>(a, b, planes, k_size, stride, c0, columns, offset, row_begin, row_end, out, row_stride,
                       column_stride);
  }
  for (; extent - c0 >= 128; c0 += 128) {
    permute_rows<2>(a, b, planes, k_size, stride, c0, columns, offset, row_begin, row_end, out, row_stride,
                    column_stride);
  }
  if (c0 < extent) {
    permute_rows<1>(a, b, planes, k_size, stride, c0, columns, offset, row_begin, row_end, out, row_stride,
                    column_stride);
  }
}

constexpr int64_t kBlock = 256;  // rows of a per block at most, lanes over rows

// Transposes the 8x8 bytes held in rows[0..7] (byte j of rows[i]: element (i, j)) in place: swaps of
// bytes, byte pairs and byte quads between rows 1, 2 and 4 apart.
inline void transpose_8x8(uint64_t* rows) {
  for (int i = 0; i < 8; i += 2) {
    const uint64_t t = ((rows[i] >> 8) ^ rows[i + 1]) & 0x00FF00FF00FF00FFull;
    rows[i + 1] ^= t;
    rows[i] ^= t << 8;
  }
  for (int i : {0, 1, 4, 5}) {
    const uint64_t t = ((rows[i] >> 16) ^ rows[i + 2]) & 0x0000FFFF0000FFFFull;
    rows[i + 2] ^= t;
    rows[i] ^= t << 16;
  }
  for (int i = 0; i < 4; ++i) {
    const uint64_t t = ((rows[i] >> 32) ^ rows[i + 4]) & 0x00000000FFFFFFFFull;
    rows[i + 4] ^= t;
    rows[i] ^= t << 32;
  }
}

// bytes [k_pad][kBlock] (k_pad: K rounded up to 8) = the code bytes of a [rows, K] transposed:
// the codes' bytes in one flat pass into `flat` (at least kBlock * K + 8 bytes), then 8x8 byte
// transposes. Lanes beyond `rows` and k beyond K hold leftover bytes (valid indices, never read).
template <typename Code>
void transpose_block(const Code* a, int64_t k_size, int64_t rows, uint8_t* flat, uint8_t* bytes) {
  for (int64_t i = 0; i < rows * k_size; ++i) flat[i] = static_cast<uint8_t>(byte_of(a[i]));
  const int64_t k_pad = (k_size + 7) / 8 * 8;
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    for (int64_t k0 = 0; k0 < k_pad; k0 += 8) {
      uint64_t words[8];
      for (int i = 0; i < 8; ++i) std::memcpy(&words[i], flat + (r0 + i) * k_size + k0, 8);
      transpose_8x8(words);
      for (int i = 0; i < 8; ++i) std::memcpy(bytes + (k0 + i) * kBlock + r0, &words[i], 8);
    }
  }
}

}  // namespace

bool permute_available() { return true; }

// out [G, M, N] (float64 or int64) = sum_k lut[byte(a)][byte(b)] with lut = low + u: `planes` [256,
// 512] uint8 (64-byte aligned) the byte planes of u's rows, `planes_t` those of its columns (the
// transposed LUT). With `transposed` the lanes run over rows of a instead of columns of b (narrow
// N): out^T = the GEMM of b^T and a^T through the transposed LUT. The caller proves K * 2**16 < 2**31.
torch::Tensor lut_gemm_permute(torch::Tensor a, torch::Tensor b, torch::Tensor planes, torch::Tensor planes_t,
                               int64_t low, bool transposed, torch::Tensor out) {
  TORCH_CHECK(planes.dtype() == torch::kUInt8 && planes.numel() == 256 * 512 && planes.is_contiguous() &&
              planes_t.dtype() == torch::kUInt8 && planes_t.numel() == 256 * 512 && planes_t.is_contiguous() &&
              reinterpret_cast<uintptr_t>(planes.data_ptr()) % 64 == 0 &&
              reinterpret_cast<uintptr_t>(planes_t.data_ptr()) % 64 == 0,
              "lut_gemm_permute: contiguous, 64-byte aligned uint8 planes [256, 512] expected (a misaligned "
              "plane splits every load across two cache lines)");
  const torch::Tensor result = out;
  as_groups("lut_gemm_permute", a, b, out);
  TORCH_CHECK(a.size(2) * 65536 < (int64_t(1) << 31), "lut_gemm_permute: K below 2**15 expected");
  const int64_t groups = a.size(0), m_size = a.size(1), k_size = a.size(2), n_size = b.size(2);
  const int64_t offset = k_size * low;
  with_output(out, "lut_gemm_permute", [&](auto* out_ptr) {
    if (!transposed) {  // lanes over the columns of b: its bytes in rows padded to 64 (index 0 there)
      a = a.contiguous();
      const int64_t stride = (n_size + 63) / 64 * 64;
      auto padded = torch::zeros({groups, k_size, stride}, torch::kUInt8);
      padded.narrow(2, 0, n_size).copy_(code_bytes(b));
      with_codes(a, "lut_gemm_permute", [&](auto* a_ptr) {
        for (int64_t g = 0; g < groups; ++g) {
          const auto* a_g = a_ptr + g * m_size * k_size;
          const uint8_t* b_g = padded.data_ptr<uint8_t>() + g * k_size * stride;
          const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, k_size * stride / 64));
          at::parallel_for(0, m_size, grain, [&](int64_t begin, int64_t end) {
            permute_tiles<2>(a_g, b_g, planes.data_ptr<uint8_t>(), k_size, stride, n_size, offset, begin, end,
                             out_ptr + g * m_size * n_size, n_size, 1);
          });
        }
      });
      return;
    }
    // lanes over the rows of a, in blocks of kBlock rows whose bytes are transposed into [K][kBlock] first
    auto b_t = code_bytes(b).transpose(1, 2).contiguous();  // [G, N, K]
    with_codes(a.contiguous(), "lut_gemm_permute", [&](auto* a_ptr) {
      for (int64_t g = 0; g < groups; ++g) {
        const auto* a_g = a_ptr + g * m_size * k_size;
        const uint8_t* b_g = b_t.data_ptr<uint8_t>() + g * n_size * k_size;
        // blocks of up to kBlock rows, a multiple of 64, and at least one per thread where M allows
        const int64_t per_thread = (m_size + at::get_num_threads() - 1) / at::get_num_threads();
        const int64_t block_rows = std::min(kBlock, std::max<int64_t>(64, (per_thread + 63) / 64 * 64));
        const int64_t blocks = (m_size + block_rows - 1) / block_rows, k_pad = (k_size + 7) / 8 * 8;
        at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
          std::vector<uint8_t> flat(kBlock * k_size + 8), bytes(k_pad * kBlock);
          for (int64_t block = begin; block < end; ++block) {
            const int64_t m0 = block * block_rows, rows = std::min(block_rows, m_size - m0);
            transpose_block(a_g + m0 * k_size, k_size, rows, flat.data(), bytes.data());
            permute_tiles<4>(b_g, bytes.data(), planes_t.data_ptr<uint8_t>(), k_size, kBlock, rows, offset, 0,
                             n_size, out_ptr + g * m_size * n_size + m0 * n_size, 1, n_size);
          }
        });
      }
    });
  });
  return result;
}
#else
bool permute_available() { return false; }

torch::Tensor lut_gemm_permute(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, bool,
                               torch::Tensor) {
  TORCH_CHECK(false, "lut_gemm_permute: built without AVX-512 VBMI");
}
#endif
