// LUT GEMM: out[g, m, n] = sum_k lut[a[g, m, k]][b[g, k, n]], exact (approxrun CUDA backend).
//
// Where the LUT lives
//   The LUT image (see lut_common.cuh) stays in global memory and is only read, through L1/L2
//   with 16-byte __ldg, to build *product slabs* in shared memory:
//       slab[v][kr, n] = image[b[k0 + kr, n]][v] = lut[v][b[k0 + kr, n]]   for all 256 codes v,
//   i.e. one 128-byte bank row per activation code v holding its products with a small k x n
//   tile of weights. A lookup of activation code v then reads one 16-byte chunk of row v: 8
//   products (16-bit image) or 4 (32-bit image) at once.
//   Why not the LUT itself in shared memory or L1: each of 32 lanes would fetch a random 2-byte
//   entry, and random addresses collide in the 32 banks (about 3.5 wavefronts per 32 lookups in
//   shared memory; one L1 sector per lane in L1). Here the 8 threads of a quarter-warp always
//   read the 8 different chunks of their bank rows, so every LDS.128 is conflict-free whatever
//   the codes: 128 bytes per clock per SM = 64 lookups per clock at 16 bits (32 at 32 bits).
//   Building costs one shared-memory word per code and lane (conflict-free too), a table of
//   256 x 64 entries per 512 x 64 lookups: 3 bytes of shared traffic per lookup at 16 bits, so
//   the on-paper bound is 128 / 3 = 42 lookups per clock per SM (about 11 T/s on an H100 SXM).
//
// Tiling
//   Block: LUT_GEMM_THREADS threads, 8 per row group, LUT_GEMM_ROWS_PER_THREAD consecutive rows
//   per group (512 rows for 256 x 16), one n-tile, and the block's k range (split-K: the host
//   splits k when the (m, n, group) grid is too small to fill the GPU; partial results are then
//   added with atomicAdd). n-tile = C chunks (C = 1, 2, 4, 8: the smallest that covers N), so a
//   slab holds KR = 8 / C values of k; thread `part` = kr * C + c of a row group reads chunk c of
//   slab k0 + kr. The KR partial sums of a row are combined at the end with warp shuffles
//   (reduce-scatter: each of the KR lanes ends up writing 1/KR of the rows).
//   Activation codes come transposed, a_t[g][k][m] (m padded to 16), so that a thread gets the
//   codes of its 16 rows for one k in a single 16-byte load. Slab s + 1's image rows and codes
//   are loaded into registers while slab s is looked up; one block per SM (the registers hold
//   16 rows x one chunk of sums per thread: 255 registers on sm_90, no spills).
//
// Exactness (the ops contract: exact integer sums)
//   16-bit image: entries e = lut - bias in [0, 65535], two per 32-bit word w (even column low).
//   Per word: sum += w and high += w >> 16 (uint32); the even column's sum is sum - (high << 16).
//   Both are exact while the number of terms times 65535 is below 2^32: the host caps the k
//   range of one block at 65536 (the shuffle reduction adds the KR partial sums mod 2^32, and
//   the total also stays below 2^32). 32-bit image: int64 sums of int32 entries.
//   Result = sum + (number of k) * bias in int64, stored as float64 (exact below 2^53, the
//   contract's float64 range); split-K partial results are integers, so atomicAdd on double is
//   exact and the result does not depend on the order of the additions.
#include "lut_common.cuh"

#ifndef LUT_GEMM_THREADS
#error "define LUT_GEMM_THREADS and LUT_GEMM_ROWS_PER_THREAD (approxrun.ops.cuda.KERNEL_DEFINES)"
#endif

namespace lut_gemm {

constexpr int THREADS = LUT_GEMM_THREADS;
constexpr int ROWS = LUT_GEMM_ROWS_PER_THREAD;     // rows per thread (and per row group)
constexpr int PARTS = BANK_ROW_BYTES / CHUNK_BYTES;  // 8 chunks per slab row = threads per row group
constexpr int WARPS = THREADS / 32;
constexpr int ROWS_PER_BLOCK = THREADS / PARTS * ROWS;
constexpr int CODES_PER_WARP = LUT_CODES / WARPS;  // slab rows each warp builds
constexpr int STAGED = CODES_PER_WARP / 4;          // uint4 per lane: one 32-bit slab word per code

static_assert(THREADS % 32 == 0 && LUT_CODES % WARPS == 0 && CODES_PER_WARP % 8 == 0, "block size");
static_assert(ROWS % 16 == 0, "rows per thread: whole 16-byte loads of codes");

// Running sums of one thread: ROWS rows x one chunk.
template <bool WIDE>
struct Sums;

template <>
struct Sums<false> {  // 16-bit entries, two per word
    using Value = unsigned;
    static constexpr int PER_CHUNK = 8;
    unsigned word[ROWS][4], high[ROWS][4];

    __device__ __forceinline__ void clear() {
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int j = 0; j < 4; ++j) word[r][j] = high[r][j] = 0u;
    }
    __device__ __forceinline__ void add(int r, const uint4& chunk) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const unsigned w = word_of(chunk, j);
            word[r][j] += w;
            high[r][j] += w >> 16;
        }
    }
    __device__ __forceinline__ Value value(int r, int e) const {  // column e of the chunk
        return (e & 1) ? high[r][e >> 1] : word[r][e >> 1] - (high[r][e >> 1] << 16);
    }
};

template <>
struct Sums<true> {  // 32-bit entries
    using Value = long long;
    static constexpr int PER_CHUNK = 4;
    long long sum[ROWS][4];

    __device__ __forceinline__ void clear() {
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int j = 0; j < 4; ++j) sum[r][j] = 0;
    }
    __device__ __forceinline__ void add(int r, const uint4& chunk) {
#pragma unroll
        for (int j = 0; j < 4; ++j) sum[r][j] += static_cast<int>(word_of(chunk, j));
    }
    __device__ __forceinline__ Value value(int r, int e) const { return sum[r][e]; }
};

// One reduce-scatter round over the lanes that differ in `mask` (a bit of kr): the lane keeps rows
// [0, HALF) or [HALF, 2 HALF) of its current rows, plus the partner's sums of them, in slots [0, HALF).
// Returns the row offset of the kept half.
template <int HALF, class Value, int PER_CHUNK>
__device__ __forceinline__ int fold(Value (&values)[ROWS][PER_CHUNK], int part, int mask) {
    const bool upper = (part & mask) != 0;
#pragma unroll
    for (int r = 0; r < HALF; ++r)
#pragma unroll
        for (int e = 0; e < PER_CHUNK; ++e) {
            const Value keep = upper ? values[r + HALF][e] : values[r][e];
            const Value give = upper ? values[r][e] : values[r + HALF][e];
            values[r][e] = keep + __shfl_xor_sync(0xffffffffu, give, mask);
        }
    return upper ? HALF : 0;
}

template <bool WIDE>
__device__ __forceinline__ void gemm(const unsigned char* __restrict__ a_t, const unsigned char* __restrict__ b,
                                     const void* __restrict__ image, double* __restrict__ out, int m,
                                     int m_padded, int k, int n, int log2_chunks, int splits, int k_per_split,
                                     long long bias, int accumulate) {
    __shared__ uint4 slab[LUT_CODES * PARTS];  // [code][chunk]: 32 KB
    unsigned* const slab_words = reinterpret_cast<unsigned*>(slab);
    using Value = typename Sums<WIDE>::Value;
    constexpr int PER_CHUNK = Sums<WIDE>::PER_CHUNK;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunks = 1 << log2_chunks;
    const int k_per_slab = PARTS >> log2_chunks;
    const int group = blockIdx.z / splits;
    const int k_begin = (blockIdx.z % splits) * k_per_split;
    const int k_end = min_int(k, k_begin + k_per_split);
    const int n0 = blockIdx.y * chunks * PER_CHUNK;
    const unsigned char* const b_group = b + static_cast<long long>(group) * k * n;
    const unsigned char* const a_group = a_t + static_cast<long long>(group) * k * m_padded;

    // Building: this lane fills 32-bit word `lane` of slab rows v0 .. v0 + CODES_PER_WARP - 1.
    const int build_part = lane >> 2;
    const int build_k = build_part >> log2_chunks;
    const int build_n = n0 + (build_part & (chunks - 1)) * PER_CHUNK + (WIDE ? 1 : 2) * (lane & 3);
    const int v0 = warp * CODES_PER_WARP;
    uint4 staged[STAGED];

    // Looking up: this thread reads chunk `part` for ROWS consecutive rows.
    const int part = lane & 7;
    const int look_k = part >> log2_chunks;
    const int row0 = blockIdx.x * ROWS_PER_BLOCK + (warp * 4 + (lane >> 3)) * ROWS;
    const bool rows_live = row0 < m;

    // Image rows (one per column this lane builds) for slab k0, into registers.
    auto stage = [&](int k0) {
        const int kk = k0 + build_k;
        constexpr int COLUMNS = WIDE ? 1 : 2;
        constexpr int PER_COLUMN = STAGED / COLUMNS;
#pragma unroll
        for (int c = 0; c < COLUMNS; ++c) {
            const int col = build_n + c;
            const uint4* row = nullptr;
            if (kk < k_end && col < n) {
                const long long code = b_group[static_cast<long long>(kk) * n + col];
                row = reinterpret_cast<const uint4*>(static_cast<const unsigned char*>(image) +
                                                     (code * LUT_CODES + v0) * (WIDE ? 4 : 2));
            }
#pragma unroll
            for (int i = 0; i < PER_COLUMN; ++i) staged[c * PER_COLUMN + i] = row ? __ldg(row + i) : zero4();
        }
    };
    // Registers -> slab: lanes write 32 consecutive words of one bank row, conflict-free.
    auto store = [&]() {
#pragma unroll
        for (int i = 0; i < STAGED; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if constexpr (WIDE) {
                    slab_words[(v0 + i * 4 + j) * 32 + lane] = word_of(staged[i], j);
                } else if (i < STAGED / 2) {  // word j of uint4 i: codes v0 + 8i + 2j and + 1
                    const unsigned even = word_of(staged[i], j), odd = word_of(staged[i + STAGED / 2], j);
                    const int v = v0 + i * 8 + j * 2;
                    slab_words[v * 32 + lane] = __byte_perm(even, odd, 0x5410);
                    slab_words[(v + 1) * 32 + lane] = __byte_perm(even, odd, 0x7632);
                }
            }
    };
    // Activation codes of this thread's rows for slab k0 (zero codes look up zero entries).
    auto load_codes = [&](int k0, uint4* codes) {
        const int kk = k0 + look_k;
        if (rows_live && kk < k_end) {
            const uint4* src = reinterpret_cast<const uint4*>(a_group + static_cast<long long>(kk) * m_padded + row0);
#pragma unroll
            for (int q = 0; q < ROWS / 16; ++q) codes[q] = __ldg(src + q);
        } else {
#pragma unroll
            for (int q = 0; q < ROWS / 16; ++q) codes[q] = zero4();
        }
    };

    Sums<WIDE> sums;
    sums.clear();
    uint4 codes[ROWS / 16], next_codes[ROWS / 16];
    stage(k_begin);
    load_codes(k_begin, next_codes);
    for (int k0 = k_begin; k0 < k_end; k0 += k_per_slab) {
        __syncthreads();  // nobody reads the previous slab any more
        store();
#pragma unroll
        for (int q = 0; q < ROWS / 16; ++q) codes[q] = next_codes[q];
        __syncthreads();  // the slab is complete
        if (k0 + k_per_slab < k_end) {
            stage(k0 + k_per_slab);
            load_codes(k0 + k_per_slab, next_codes);
        }
        if (rows_live) {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) sums.add(r, slab[byte_of(codes[r >> 4], r & 15) * PARTS + part]);
        }
    }

    // Combine the KR partial sums of each row: each round halves the rows a lane keeps.
    Value values[ROWS][PER_CHUNK];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int e = 0; e < PER_CHUNK; ++e) values[r][e] = sums.value(r, e);
    const int rounds = 3 - log2_chunks;  // log2(KR)
    int first_row = row0;
    if (rounds > 0) first_row += fold<ROWS / 2>(values, part, chunks);
    if (rounds > 1) first_row += fold<ROWS / 4>(values, part, chunks << 1);
    if (rounds > 2) first_row += fold<ROWS / 8>(values, part, chunks << 2);

    const int rows_kept = ROWS >> rounds;
    const long long offset = static_cast<long long>(k_end - k_begin) * bias;
    const int col0 = n0 + (part & (chunks - 1)) * PER_CHUNK;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = first_row + r;
        if (r < rows_kept && row < m) {
            double* const dst = out + (static_cast<long long>(group) * m + row) * n;
#pragma unroll
            for (int e = 0; e < PER_CHUNK; ++e) {
                if (col0 + e < n) {
                    const double result = static_cast<double>(static_cast<long long>(values[r][e]) + offset);
                    if (accumulate)
                        atomicAdd(dst + col0 + e, result);
                    else
                        dst[col0 + e] = result;
                }
            }
        }
    }
}

}  // namespace lut_gemm

// a_t: [groups, k, m_padded] activation byte indices; b: [groups, k, n] weight byte indices;
// image: [256 (weight code)][256 (activation code)] entries; out: [groups, m, n] float64.
// grid = (ceil(m / rows per block), ceil(n / n-tile), groups * splits); block = LUT_GEMM_THREADS.
extern "C" __global__ void __launch_bounds__(LUT_GEMM_THREADS, 1)
    lut_gemm_narrow(const unsigned char* a_t, const unsigned char* b, const unsigned short* image, double* out,
                    int m, int m_padded, int k, int n, int log2_chunks, int splits, int k_per_split,
                    long long bias, int accumulate) {
    lut_gemm::gemm<false>(a_t, b, image, out, m, m_padded, k, n, log2_chunks, splits, k_per_split, bias,
                          accumulate);
}

extern "C" __global__ void __launch_bounds__(LUT_GEMM_THREADS, 1)
    lut_gemm_wide(const unsigned char* a_t, const unsigned char* b, const int* image, double* out, int m,
                  int m_padded, int k, int n, int log2_chunks, int splits, int k_per_split, long long bias,
                  int accumulate) {
    lut_gemm::gemm<true>(a_t, b, image, out, m, m_padded, k, n, log2_chunks, splits, k_per_split, bias,
                         accumulate);
}
