// Convolution helpers of the approxrun CUDA backend: im2col into LUT byte indices, and the
// depthwise LUT GEMM (one output column per group).
//
// lut_im2col writes the transposed activation matrix a_t[g][kk][m] that lut_gemm_* and
// lut_depthwise_* read, straight from the byte indices of the input: kk = (c, i, j) in the order
// of the weight's [C/groups, kh, kw] axes, m = (batch, oh, ow); positions in the padding hold the
// pad code's index (the layer's zero point), rows m >= batch * oh * ow (up to m_padded) too.
// Each thread writes LUT_IM2COL_ROWS_PER_THREAD consecutive m as 32-bit words (coalesced).
// grid = (k, ceil(m_padded / (threads * rows per thread)), groups).
//
// Depthwise (n = 1): out[g, m] = sum_k lut[a[g, m, k]][b[g, k]]. Where the LUT lives: the k rows
// image[b[g, k]] (the products of the group's k weights with every activation code) are copied
// into shared memory, LUT_DEPTHWISE_TABLE_BYTES at most (k <= 64 for the 16-bit image, 32 for
// the 32-bit one; the host uses the GEMM kernel above that). A lookup is one random 2- or 4-byte
// read of that table, so 32 lanes meet the usual bank conflicts (about 3.5 wavefronts per 32
// lookups); there is no n to pack several products into one read. Tiling: one block per
// (group, LUT_DEPTHWISE_THREADS * LUT_DEPTHWISE_ROWS_PER_THREAD rows), each thread a few
// consecutive rows so that one 32-bit load brings 4 codes; the table costs 256 k entries per
// 1024 k lookups. Sums: uint32 for the 16-bit image (k * 65535 < 2^32 for k <= 64), int64 for
// the 32-bit one; result = sum + k * bias in int64, stored as float64.
#include "lut_common.cuh"

#ifndef LUT_DEPTHWISE_THREADS
#error "define LUT_DEPTHWISE_* and LUT_IM2COL_* (approxrun.ops.cuda.KERNEL_DEFINES)"
#endif

extern "C" __global__ void __launch_bounds__(LUT_IM2COL_THREADS)
    lut_im2col(const unsigned char* x, unsigned char* a_t, int batch, int channels, int height, int width,
               int groups, int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w,
               int dilation_h, int dilation_w, int out_h, int out_w, int m_padded, int pad_index) {
    constexpr int ROWS = LUT_IM2COL_ROWS_PER_THREAD;
    static_assert(ROWS % 4 == 0, "whole 32-bit stores");
    const int row0 = (blockIdx.y * LUT_IM2COL_THREADS + threadIdx.x) * ROWS;
    if (row0 >= m_padded) return;
    const int kk = blockIdx.x, group = blockIdx.z;
    const int taps = kernel_h * kernel_w;
    const int channel = group * (channels / groups) + kk / taps;
    const int i = kk % taps / kernel_w, j = kk % kernel_w;
    const int m = batch * out_h * out_w;
    const unsigned char* const plane = x + static_cast<long long>(channel) * height * width;
    const long long image_stride = static_cast<long long>(channels) * height * width;
    unsigned* const dst = reinterpret_cast<unsigned*>(
        a_t + (static_cast<long long>(group) * gridDim.x + kk) * m_padded + row0);
    // (sample, oh, ow) of row0 by division once; the following rows step through them
    int sample = row0 / (out_h * out_w), oh = row0 / out_w % out_h, ow = row0 % out_w;
#pragma unroll
    for (int w = 0; w < ROWS / 4; ++w) {
        unsigned word = 0;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            unsigned code = static_cast<unsigned>(pad_index);
            const int ih = oh * stride_h - pad_h + i * dilation_h, iw = ow * stride_w - pad_w + j * dilation_w;
            if (row0 + w * 4 + r < m && ih >= 0 && ih < height && iw >= 0 && iw < width)
                code = plane[sample * image_stride + static_cast<long long>(ih) * width + iw];
            word |= code << (8 * r);
            if (++ow == out_w) {
                ow = 0;
                if (++oh == out_h) {
                    oh = 0;
                    ++sample;
                }
            }
        }
        dst[w] = word;
    }
}

namespace lut_depthwise {

constexpr int THREADS = LUT_DEPTHWISE_THREADS;
constexpr int ROWS = LUT_DEPTHWISE_ROWS_PER_THREAD;
static_assert(ROWS % 4 == 0, "whole 32-bit loads of codes");

template <bool WIDE>
__device__ __forceinline__ void depthwise(const unsigned char* __restrict__ a_t, const unsigned char* __restrict__ b,
                                          const void* __restrict__ image, double* __restrict__ out, int m,
                                          int m_padded, int k, long long bias) {
    using Entry = typename Pick<WIDE, int, unsigned short>::Type;
    using Sum = typename Pick<WIDE, long long, unsigned>::Type;
    constexpr int ROW_CHUNKS = LUT_CODES * static_cast<int>(sizeof(Entry)) / CHUNK_BYTES;
    __shared__ uint4 table_chunks[LUT_DEPTHWISE_TABLE_BYTES / CHUNK_BYTES];
    const Entry* const table = reinterpret_cast<const Entry*>(table_chunks);

    const int group = blockIdx.y;
    const uint4* const rows = reinterpret_cast<const uint4*>(image);
    for (int i = threadIdx.x; i < k * ROW_CHUNKS; i += THREADS) {
        const int kk = i / ROW_CHUNKS;
        table_chunks[i] = __ldg(rows + b[static_cast<long long>(group) * k + kk] * ROW_CHUNKS + i % ROW_CHUNKS);
    }
    __syncthreads();

    const int row0 = (blockIdx.x * THREADS + threadIdx.x) * ROWS;
    if (row0 >= m) return;
    const unsigned char* const codes = a_t + static_cast<long long>(group) * k * m_padded + row0;
    Sum sums[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) sums[r] = 0;
    for (int kk = 0; kk < k; ++kk) {
        const unsigned* const src = reinterpret_cast<const unsigned*>(codes + static_cast<long long>(kk) * m_padded);
        const Entry* const products = table + kk * LUT_CODES;
#pragma unroll
        for (int w = 0; w < ROWS / 4; ++w) {
            const unsigned four = __ldg(src + w);
#pragma unroll
            for (int r = 0; r < 4; ++r) sums[w * 4 + r] += products[(four >> (8 * r)) & 0xffu];
        }
    }
    double* const dst = out + static_cast<long long>(group) * m;
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
        if (row0 + r < m) dst[row0 + r] = static_cast<double>(static_cast<long long>(sums[r]) + k * bias);
}

}  // namespace lut_depthwise

// a_t: [groups, k, m_padded]; b: [groups, k]; out: [groups, m] float64.
// grid = (ceil(m / (threads * rows per thread)), groups); block = LUT_DEPTHWISE_THREADS.
extern "C" __global__ void __launch_bounds__(LUT_DEPTHWISE_THREADS)
    lut_depthwise_narrow(const unsigned char* a_t, const unsigned char* b, const unsigned short* image, double* out,
                         int m, int m_padded, int k, long long bias) {
    lut_depthwise::depthwise<false>(a_t, b, image, out, m, m_padded, k, bias);
}

extern "C" __global__ void __launch_bounds__(LUT_DEPTHWISE_THREADS)
    lut_depthwise_wide(const unsigned char* a_t, const unsigned char* b, const int* image, double* out, int m,
                       int m_padded, int k, long long bias) {
    lut_depthwise::depthwise<true>(a_t, b, image, out, m, m_padded, k, bias);
}
