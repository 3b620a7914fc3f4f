// Runs one kernel of approxrun/kernels on the CPU (simt.h), for tests/test_cuda_kernels.py.
//
// Usage: driver LAUNCH_FILE. The file names the kernel, grid and block, then one argument per
// line: "buf PATH BYTES" (a device buffer read from PATH, written back after the run), or
// "i32 V", "i64 V", "f64 V" (scalars). Each argument's kind must match the kernel's parameter
// type, so a launch the host builds with wrong types fails here instead of misbehaving.
// Build: g++ -std=c++20 -O2 -pthread -fno-strict-aliasing -I kernels -I tests/emulation -D... driver.cpp
#include "simt.h"

#include "lut_conv.cu"
#include "lut_gemm.cu"
#include "lut_grad.cu"

#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <utility>

namespace {

struct Argument {
    std::string kind;
    std::string path;
    std::size_t bytes = 0;
    unsigned char* data = nullptr;
    long long integer = 0;
    double real = 0.0;
};

struct Spec {
    std::string kernel;
    dim3 grid, block;
    std::vector<Argument> args;
};

template <class>
constexpr bool unsupported = false;

template <class P>
P convert(const Argument& arg) {
    auto expect = [&](const char* kind) {
        if (arg.kind != kind) throw std::invalid_argument("argument kind " + arg.kind + ", kernel expects " + kind);
    };
    if constexpr (std::is_pointer_v<P>) {
        expect("buf");
        return reinterpret_cast<P>(arg.data);
    } else if constexpr (std::is_same_v<P, int>) {
        expect("i32");
        return static_cast<int>(arg.integer);
    } else if constexpr (std::is_same_v<P, long long>) {
        expect("i64");
        return arg.integer;
    } else if constexpr (std::is_same_v<P, double>) {
        expect("f64");
        return arg.real;
    } else {
        static_assert(unsupported<P>, "parameter type not modelled by the driver");
    }
}

template <class... P, std::size_t... I>
void call(void (*kernel)(P...), const Spec& spec, std::index_sequence<I...>) {
    simt::launch(kernel, spec.grid, spec.block, convert<P>(spec.args[I])...);
}

template <class... P>
void run(void (*kernel)(P...), const Spec& spec) {
    if (spec.args.size() != sizeof...(P))
        throw std::invalid_argument(spec.kernel + " takes " + std::to_string(sizeof...(P)) + " arguments, got " +
                                    std::to_string(spec.args.size()));
    call(kernel, spec, std::index_sequence_for<P...>{});
}

#define KERNEL(name) {#name, [](const Spec& spec) { run(name, spec); }}

const std::map<std::string, std::function<void(const Spec&)>> kernels = {
    KERNEL(lut_gemm_narrow),      KERNEL(lut_gemm_wide), KERNEL(lut_depthwise_narrow),
    KERNEL(lut_depthwise_wide),   KERNEL(lut_im2col),    KERNEL(lut_grad_a),
    KERNEL(lut_grad_b),
};

Spec read_spec(const char* path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error(std::string("cannot read ") + path);
    Spec spec;
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream fields(line);
        std::string key;
        if (!(fields >> key)) continue;
        if (key == "kernel") {
            fields >> spec.kernel;
        } else if (key == "grid") {
            fields >> spec.grid.x >> spec.grid.y >> spec.grid.z;
        } else if (key == "block") {
            fields >> spec.block.x >> spec.block.y >> spec.block.z;
        } else {
            Argument arg;
            arg.kind = key;
            if (key == "buf") {
                fields >> arg.path >> arg.bytes;
            } else if (key == "i32" || key == "i64") {
                fields >> arg.integer;
            } else if (key == "f64") {
                fields >> arg.real;
            } else {
                throw std::invalid_argument("unknown line: " + line);
            }
            if (fields.fail()) throw std::invalid_argument("bad line: " + line);
            spec.args.push_back(arg);
        }
    }
    return spec;
}

void load(Argument& arg) {
    const std::size_t size = (arg.bytes + 255) / 256 * 256 + 256;  // aligned like a device allocation
    arg.data = static_cast<unsigned char*>(std::aligned_alloc(256, size));
    std::ifstream in(arg.path, std::ios::binary);
    if (!in.read(reinterpret_cast<char*>(arg.data), static_cast<std::streamsize>(arg.bytes)))
        throw std::runtime_error("cannot read " + arg.path);
}

void save(const Argument& arg) {
    std::ofstream out(arg.path, std::ios::binary | std::ios::trunc);
    if (!out.write(reinterpret_cast<const char*>(arg.data), static_cast<std::streamsize>(arg.bytes)))
        throw std::runtime_error("cannot write " + arg.path);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::cerr << "usage: driver LAUNCH_FILE\n";
        return 2;
    }
    try {
        Spec spec = read_spec(argv[1]);
        const auto kernel = kernels.find(spec.kernel);
        if (kernel == kernels.end()) throw std::invalid_argument("unknown kernel " + spec.kernel);
        for (Argument& arg : spec.args)
            if (arg.kind == "buf") load(arg);
        kernel->second(spec);
        for (const Argument& arg : spec.args)
            if (arg.kind == "buf") {
                save(arg);
                std::free(arg.data);
            }
    } catch (const std::exception& error) {
        std::cerr << "driver: " << error.what() << "\n";
        return 1;
    }
    return 0;
}
