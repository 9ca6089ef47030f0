// Counter-based random numbers shared by the CPU (g++) and CUDA (nvcc) builds.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) maps a
// 128-bit counter and a 64-bit key to four independent 32-bit words with nothing but integer
// multiplies and xors, so both builds produce bit-identical streams. Dropout uses it to keep no
// mask: the key is a 64-bit seed drawn once per call and the counter is the element index, so
// backward (and recomputation under checkpointing) regenerates the forward's mask from the seed.
//
// Element i of a tensor uses word (i & 3) of philox(counter = i >> 2): one Philox call serves four
// consecutive elements ("a group"), which is what every kernel loops over.
#pragma once

#include <cstdint>

#include "tempo/common.h"

namespace tempo {

struct PhiloxWords {
    uint32_t w[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kPhiloxRounds = 10;

TEMPO_HD PhiloxWords philox4x32_10(uint64_t counter_lo, uint64_t counter_hi, uint64_t key) {
    uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
    uint32_t c2 = static_cast<uint32_t>(counter_hi), c3 = static_cast<uint32_t>(counter_hi >> 32);
    uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
#pragma unroll
    for (int round = 0; round < kPhiloxRounds; ++round) {
        const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
        const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
        const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
        const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
    }
    return PhiloxWords{{c0, c1, c2, c3}};
}

// Dropout keeps element i iff its 32-bit word is >= threshold, i.e. with probability
// 1 - threshold / 2^32 = 1 - p up to 2^-32. p * 2^32 is exact in double (a power-of-two scale).
TEMPO_HD uint32_t dropout_threshold(double p) {
    const double t = ceil(p * 4294967296.0);
    return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// What one dropout call needs on the device: the key, the cut and the scale of kept elements.
struct DropoutParams {
    uint64_t key;
    uint32_t threshold;
    double scale;  // 1 / (1 - p)
};

TEMPO_HD DropoutParams make_dropout_params(int64_t seed, double p) {
    return DropoutParams{static_cast<uint64_t>(seed), dropout_threshold(p), 1.0 / (1.0 - p)};
}

// Keep-bits of the four elements of group g (elements 4g .. 4g+3), as bits 0..3.
TEMPO_HD uint32_t dropout_keep_bits(const DropoutParams& d, int64_t group) {
    const PhiloxWords r = philox4x32_10(static_cast<uint64_t>(group), 0, d.key);
    return static_cast<uint32_t>(r.w[0] >= d.threshold) | (static_cast<uint32_t>(r.w[1] >= d.threshold) << 1) |
           (static_cast<uint32_t>(r.w[2] >= d.threshold) << 2) | (static_cast<uint32_t>(r.w[3] >= d.threshold) << 3);
}

// f(i, kept) for every element i in [begin, end) in order, one Philox draw per group of four of
// the flat index (a range may start or end mid-group, as a row of attention scores does).
template <typename F>
TEMPO_HD void for_each_keep(const DropoutParams& d, int64_t begin, int64_t end, const F& f) {
    for (int64_t g = begin >> 2; g * 4 < end; ++g) {
        const uint32_t keep = dropout_keep_bits(d, g);
        for (int k = 0; k < 4; ++k) {
            const int64_t i = 4 * g + k;
            if (i >= begin && i < end) f(i, ((keep >> k) & 1u) != 0);
        }
    }
}

// Keep-bit of element i alone, for kernels whose blocks need not start on a group boundary.
TEMPO_HD bool dropout_keep(const DropoutParams& d, int64_t i) { return (dropout_keep_bits(d, i >> 2) >> (i & 3)) & 1u; }

}  // namespace tempo
