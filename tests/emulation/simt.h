// simt.h: run the CUDA C kernels of approxrun/kernels on the CPU, for tests without a GPU.
//
// The .cu files are compiled unchanged as C++20 after this header. Model:
// - one std::thread per CUDA thread of a block; blocks run one after another, so __shared__
//   variables become function-local statics (one copy, reused by the next block, never
//   initialised between blocks, as on the GPU);
// - __syncthreads() is a std::barrier over the block; a thread that returns drops out of it
//   (on the GPU exited threads no longer count for bar.sync either);
// - warp shuffles need the 32 lanes in lockstep: each shuffle is one round on a per-warp
//   std::barrier over a double-buffered exchange slot (only full-warp masks are modelled);
// - atomicAdd is std::atomic_ref::fetch_add; __ldg is a plain load; vector types have the
//   CUDA alignment, so a misaligned vector access is as wrong here as on the device.
// Only what the kernels use is modelled; a kernel using anything else fails to compile here.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct uint3 {
    unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace simt {

constexpr unsigned WARP = 32;
constexpr unsigned FULL_MASK = 0xffffffffu;

struct Warp {
    explicit Warp(std::ptrdiff_t lanes) : lockstep(lanes) {}
    std::barrier<> lockstep;
    std::uint64_t slot[2][WARP] = {};
};

struct Block {
    explicit Block(std::ptrdiff_t threads) : sync(threads) {}
    std::barrier<> sync;
    std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block* this_block = nullptr;
inline thread_local Warp* this_warp = nullptr;
inline thread_local unsigned this_lane = 0;
inline thread_local unsigned shuffle_round = 0;

}  // namespace simt

inline void __syncthreads() { simt::this_block->sync.arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(std::uint64_t));
    if (mask != simt::FULL_MASK || width != 32)
        throw std::logic_error("simt: only full-warp __shfl_xor_sync is modelled");
    simt::Warp& warp = *simt::this_warp;
    const unsigned buffer = simt::shuffle_round++ & 1u;
    std::memcpy(&warp.slot[buffer][simt::this_lane], &value, sizeof(T));
    warp.lockstep.arrive_and_wait();  // every lane has published
    T other;
    std::memcpy(&other, &warp.slot[buffer][simt::this_lane ^ static_cast<unsigned>(lane_mask)], sizeof(T));
    return other;  // the next shuffle writes the other buffer, so no second round is needed
}

template <class T>
T __ldg(const T* address) {
    return *address;
}

inline double atomicAdd(double* address, double value) {
    return std::atomic_ref<double>(*address).fetch_add(value);
}

inline unsigned __byte_perm(unsigned x, unsigned y, unsigned selector) {
    const std::uint64_t bytes = (static_cast<std::uint64_t>(y) << 32) | x;
    unsigned result = 0;
    for (int i = 0; i < 4; ++i) {
        const unsigned nibble = (selector >> (4 * i)) & 0xfu;
        unsigned byte = static_cast<unsigned>(bytes >> (8 * (nibble & 7u))) & 0xffu;
        if (nibble & 8u) byte = (byte & 0x80u) ? 0xffu : 0u;  // sign-replicate mode
        result |= byte << (8 * i);
    }
    return result;
}

namespace simt {

// Runs kernel(args...) over grid x block, one block at a time; rethrows the first error of a thread.
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) {
    const unsigned threads = block.x * block.y * block.z;
    if (threads == 0 || threads > 1024) throw std::invalid_argument("simt: block must hold 1..1024 threads");
    std::exception_ptr failure;
    std::mutex failure_lock;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                Block ctx(threads);
                for (unsigned first = 0; first < threads; first += WARP)
                    ctx.warps.push_back(std::make_unique<Warp>(std::min(WARP, threads - first)));
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (unsigned t = 0; t < threads; ++t)
                    pool.emplace_back([&, t] {
                        threadIdx = uint3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
                        blockIdx = uint3{bx, by, bz};
                        blockDim = block;
                        gridDim = grid;
                        this_block = &ctx;
                        this_warp = ctx.warps[t / WARP].get();
                        this_lane = t % WARP;
                        shuffle_round = 0;
                        try {
                            kernel(args...);
                        } catch (...) {
                            std::lock_guard<std::mutex> hold(failure_lock);
                            if (!failure) failure = std::current_exception();
                        }
                        this_warp->lockstep.arrive_and_drop();
                        ctx.sync.arrive_and_drop();
                    });
                for (std::thread& thread : pool) thread.join();
                if (failure) std::rethrow_exception(failure);
            }
}

}  // namespace simt
