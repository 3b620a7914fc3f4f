// Definitions shared by the approxrun LUT kernels (plain CUDA C, compiled by NVRTC through CuPy).
//
// LUT image: the host turns the 256x256 LUT (lut[a][b], a = activation byte index, b = weight
// byte index, see approxrun/lut.py) into a *transposed* image image[b][a] = lut[a][b] - bias, so
// that the products of one weight code with every activation code are 512 (16-bit) or 1024
// (32-bit) contiguous bytes. 16-bit image (LUT range <= 65535): entries are uint16 (lut - min);
// 32-bit image: int32 entries. Every kernel adds count * bias back in int64.
//
// Launch geometry comes from the host as -D defines (approxrun/ops/cuda.py owns the numbers).
#ifndef APPROXRUN_LUT_COMMON_CUH
#define APPROXRUN_LUT_COMMON_CUH

enum LutGeometry : int {
    LUT_CODES = 256,       // byte indices per operand
    CHUNK_BYTES = 16,      // one uint4: the widest shared-memory access
    BANK_ROW_BYTES = 128,  // 32 banks x 4 bytes: one shared-memory wavefront
};

// Type selection without <type_traits> (NVRTC has no standard library headers).
template <bool FIRST, class A, class B>
struct Pick {
    using Type = A;
};
template <class A, class B>
struct Pick<false, A, B> {
    using Type = B;
};

__device__ __forceinline__ int min_int(int a, int b) { return a < b ? a : b; }

__device__ __forceinline__ unsigned word_of(const uint4& q, int i) {
    return i == 0 ? q.x : i == 1 ? q.y : i == 2 ? q.z : q.w;
}

__device__ __forceinline__ int byte_of(const uint4& q, int i) {
    return static_cast<int>((word_of(q, i >> 2) >> ((i & 3) * 8)) & 0xffu);
}

__device__ __forceinline__ uint4 zero4() { return make_uint4(0u, 0u, 0u, 0u); }

#endif
