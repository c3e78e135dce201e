// A table of transforming copies: each row one 2-D rectangle of elements, read in one format
// and written in another (a cast, or a quantization with its scales). The CPU path runs it on
// host memory (transform_cpu); the CUDA kernel (transform_copy.cu) runs it on the GPU, one
// thread block per 128 x 128 tile.
//
// Columns (int64, absolute addresses): src, dst, src_pitch / dst_pitch (bytes between rows),
// rows, cols (elements), src_fmt / dst_fmt (formats.h), scale (address of the scale of the
// rectangle's first block or group, 0 for casts), scale_pitch (bytes between scale rows). A
// quantized rectangle starts on a block (fp8_block128: 128 x 128; mxfp8: a 32-element group
// of its rows) of the global tensor; its last block may be partial only where the global
// tensor ends. Whoever builds the table checks that; the kernels trust it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace refit {

struct HostTransforms {
    std::vector<int64_t> src, dst, src_pitch, dst_pitch, rows, cols, src_fmt, dst_fmt, scale,
        scale_pitch;
    size_t size() const { return src.size(); }
    // Throws std::invalid_argument naming the first bad row (lengths, formats, sizes).
    void check() const;
};

// Runs every row on host memory, in order.
void transform_cpu(const HostTransforms& t);

}  // namespace refit
