// LUT-derived gradients of out[g, m, n] = sum_k lut[a[g, m, k]][b[g, k, n]] (grad="lut"):
//   grad_a[g, m, k] = sum_n grad_out[g, m, n] * da[a][b],  grad_b[g, k, n] = sum_m grad_out[g, m, n] * db[a][b],
// with da, db the 256x256 float64 gradient tables of approxrun/ops/gradients.py (byte-indexed).
//
// Where the tables live: global memory, read through L1 with __ldg, arranged so that a warp reads
// within one 2 KB table row: lut_grad_a takes da transposed (da_t[b][a]; the lanes share the
// weight code b and differ in the activation code), lut_grad_b takes db as is (db[a][b]; the lanes
// share the activation code of row m and differ in the weight code). These kernels serve the
// optional grad="lut" backward; the default straight-through backward runs on cuBLAS through torch.
// Sums are float64 in a fixed order (sequential over n, resp. over the rows of one split), so the
// results are deterministic; grad_b's row splits are summed by the host.
#include "lut_common.cuh"

#ifndef LUT_GRAD_THREADS
#error "define LUT_GRAD_THREADS (approxrun.ops.cuda.KERNEL_DEFINES)"
#endif

// a_t: [groups, k, m_padded]; b: [groups, k, n]; grad_out: [groups, m, n]; grad_a_t: [groups, k, m].
// grid = (ceil(m / threads), k, groups).
extern "C" __global__ void __launch_bounds__(LUT_GRAD_THREADS)
    lut_grad_a(const unsigned char* a_t, const unsigned char* b, const double* grad_out, const double* da_t,
               double* grad_a_t, int m, int m_padded, int k, int n) {
    const int row = blockIdx.x * LUT_GRAD_THREADS + threadIdx.x;
    if (row >= m) return;
    const long long slot = static_cast<long long>(blockIdx.z) * k + blockIdx.y;  // (group, k)
    const double* const table = da_t + a_t[slot * m_padded + row];                 // column of activation code
    const unsigned char* const weights = b + slot * n;
    const double* const upstream = grad_out + (static_cast<long long>(blockIdx.z) * m + row) * n;
    double sum = 0.0;
    for (int col = 0; col < n; ++col) sum += upstream[col] * __ldg(table + weights[col] * LUT_CODES);
    grad_a_t[slot * m + row] = sum;
}

// partial: [splits, groups, k, n], row split s covering rows [s * rows_per_split, (s + 1) * rows_per_split).
// grid = (ceil(k * n / threads), splits, groups).
extern "C" __global__ void __launch_bounds__(LUT_GRAD_THREADS)
    lut_grad_b(const unsigned char* a_t, const unsigned char* b, const double* grad_out, const double* db,
               double* partial, int m, int m_padded, int k, int n, int rows_per_split) {
    const int index = blockIdx.x * LUT_GRAD_THREADS + threadIdx.x;  // (k, n) within the group
    if (index >= k * n) return;
    const int group = blockIdx.z, col = index % n;
    const long long slot = static_cast<long long>(group) * k + index / n;
    const double* const table = db + b[static_cast<long long>(group) * k * n + index];  // column of weight code
    const unsigned char* const codes = a_t + slot * m_padded;
    const double* const upstream = grad_out + static_cast<long long>(group) * m * n + col;
    const int first = blockIdx.y * rows_per_split, last = min_int(m, first + rows_per_split);
    double sum = 0.0;
    for (int row = first; row < last; ++row)
        sum += upstream[static_cast<long long>(row) * n] * __ldg(table + codes[row] * LUT_CODES);
    partial[(static_cast<long long>(blockIdx.y) * gridDim.z + group) * k * n + index] = sum;
}
